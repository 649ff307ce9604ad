"""twistd integration: C{twistd -n gomodel [--listen ...] [--config ...]}."""

import dataclasses
import gc
import os
import sys

from twisted.python import usage

from gomodel.config import MAX_WORKERS, ConfigError, load_config
from gomodel.config.parsers import checked, whole


class Options(usage.Options):
    synopsis = "[--listen STRPORT ...] [--config gomodel.yaml] [--workers N]"
    longdesc = ("OpenAI-compatible AI gateway. Providers come from the environment "
                "(VLLM_BASE_URL, VLLM_<NAME>_BASE_URL, ...) and the YAML file; the environment wins.")
    optParameters = [
        ["config", "c", None, "YAML config file (default: $GOMODEL_CONFIG)."],
        ["workers", "w", None, "Processes sharing the listening port(s) (default: $GOMODEL_WORKERS or 1)."],
    ]
    optFlags = [
        ["worker-child", None, "Internal: run as a worker started by a primary gomodel process."],
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []

    def getUsage(self, width=None):
        """The options' help, without the internal C{--worker-child} (what a primary starts its workers with)."""
        shown, self.longOpt = self.longOpt, [opt for opt in self.longOpt if opt != "worker-child"]
        try:
            return super().getUsage(width)
        finally:
            self.longOpt = shown

    def opt_version(self):
        """Display gomodel's version (and Twisted's and Python's) and exit."""
        import platform

        from twisted import version

        from gomodel import __version__

        print(f"gomodel {__version__} (Twisted {version.short()}, {platform.python_implementation()} "
              f"{platform.python_version()})")
        sys.exit(0)

    def opt_listen(self, description):
        """Listen on a strports description, e.g. tcp:8080:interface=0.0.0.0 (repeatable; default tcp:$PORT)."""
        self["listen"].append(description)

    def parseOptions(self, options=None):
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def postOptions(self):
        try:
            config = load_config(os.environ, self["config"], self["listen"])
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}") from None
        if config.metrics.otel_enabled:
            from gomodel.accounting.tracing import check_installed

            try:
                check_installed()
            except ConfigError as e:
                raise usage.UsageError(f"configuration error: {e}") from None
        if self["workers"] is not None:
            try:  # ASCII digits, as GOMODEL_WORKERS (int() would take "1_0" or "\u0662")
                workers = checked(whole, self["workers"], "--workers")
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
            if not 1 <= workers <= MAX_WORKERS:
                raise usage.UsageError(f"--workers must be from 1 to {MAX_WORKERS}")
            config = dataclasses.replace(config, server=dataclasses.replace(config.server, workers=workers))
        if not any(p.base_url.startswith("https:") for p in config.upstreams.providers) and not any(
                d.startswith("ssl:") for d in config.server.listen):
            _keep_openssl_out()
        from gomodel.listeners import check_listen, parse_tcp

        for description in config.server.listen:
            try:
                check_listen(description)
            except ValueError as e:
                raise usage.UsageError(f"--listen {description!r}: {e}") from None
        if config.server.workers > 1 or self["worker-child"]:
            for description in config.server.listen:
                try:
                    parse_tcp(description)
                except ValueError as e:
                    raise usage.UsageError(f"--workers shares TCP ports only: {e}") from None
        self.gateway_config = config
        self.stdout_log = _twistd_logs_to_stdout(getattr(self, "parent", None))


def _twistd_logs_to_stdout(twistd) -> bool:
    """Whether twistd's options (C{twistd}, or None outside twistd) have it write its text lines to
    standard output: in the foreground, with no C{--logfile} (or C{-}), C{--syslog} or C{--logger}."""
    if twistd is None or "logger" not in twistd:
        return False
    return (twistd.get("logger") is None and not twistd.get("syslog") and bool(twistd.get("nodaemon"))
            and twistd.get("logfile") in (None, "", "-"))


def _keep_openssl_out():
    """With no https upstream, stop Twisted from loading OpenSSL (about 12 MB of every process).

    gomodel requires Twisted's TLS extra (for https upstreams), and Twisted's
    TCP module imports pyOpenSSL whenever it is installed; a None in
    C{sys.modules} makes that import fail, which Twisted handles by leaving
    TLS out. twistd loads this module before the reactor (and so before the
    TCP module); if something loaded OpenSSL earlier, nothing changes.
    """
    sys.modules.setdefault("OpenSSL", None)


def makeService(options):
    """Build the gateway service for twistd."""
    from twisted.internet import reactor

    config = options.gateway_config
    primary = config.server.workers > 1 and not options["worker-child"]
    if primary and config.metrics.enabled:
        _share_metrics(reactor, _runs_as(options))  # before prometheus_client is imported: it reads it then

    gc.disable()  # the plugin did already (gomodel_plugin); again for a caller without it
    reactor.callWhenRunning(_freeze_startup_objects)
    from gomodel._twistedcompat import dispatch_plainly, stop_once_on_signals

    dispatch_plainly(reactor)  # each socket event without the legacy log context
    stop_once_on_signals(reactor)  # a signal during the drain changes nothing (exit status 0 after it)

    from gomodel.build import build_gateway

    # What the imports freed (the compiled modules' bytes read, the import machinery's temporaries), handed back
    # before the gateway is built: once it is built too (L{_freeze_startup_objects}), the peak was both together.
    release_freed_heap()

    if options["worker-child"]:  # the primary's metrics directory came down in the environment
        gateway = build_gateway(config, reactor, role="worker",
                                shared_metrics="PROMETHEUS_MULTIPROC_DIR" in os.environ)
    elif primary:
        from twisted.logger import globalLogPublisher

        from gomodel.workers import worker_argv

        # A primary whose lines go elsewhere than its standard output (twistd's --logfile, --syslog, --logger)
        # publishes its workers' events in its own log; otherwise they write to that output themselves.
        forward = getattr(options, "parent", None) is not None and not options.stdout_log
        gateway = build_gateway(config, reactor, role="primary", worker_argv=worker_argv(options.argv, forward),
                                worker_env=os.environ, shared_metrics=config.metrics.enabled,
                                worker_logs=globalLogPublisher if forward else None)
    else:
        gateway = build_gateway(config, reactor)
    gateway.stdout_log = options.stdout_log
    twistd = getattr(options, "parent", None)
    if twistd is not None and twistd.get("logger") is None:  # (with --logger, twistd ignores gateway's observer)
        from functools import partial

        from gomodel._twistedcompat import twistd_log_observer

        gateway.twistd_log = partial(twistd_log_observer, twistd)
    return gateway


def _runs_as(options):
    """The C{(uid, gid)} twistd switches to once it listens (C{--uid}, C{--gid}; -1 for a gid not
    given), or None."""
    twistd = getattr(options, "parent", None)
    if twistd is None or twistd.get("uid") is None:
        return None
    gid = twistd.get("gid")
    return twistd["uid"], -1 if gid is None else gid


def _share_metrics(reactor, owner=None):
    """With several processes, every one writes its metrics to one directory, and any scrape sums them.

    prometheus_client's multiprocess mode reads C{PROMETHEUS_MULTIPROC_DIR}
    when its metrics are made; the workers inherit it. The directory is
    removed when the first process ends: once its reactor has stopped, or at
    its exit when it never ran (a port that could not be had).

    @param owner: C{(uid, gid)} to give the directory to: the user twistd
        switches to (C{--uid}), whom the workers run as.
    """
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="gomodel-metrics-")
    atexit.register(shutil.rmtree, path, True)
    if owner is not None and os.geteuid() == 0:  # (only root can switch to another user)
        os.chown(path, *owner)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, path, True)


# Container objects made (less those freed) between two collections of the youngest generation:
# Python's 700 means one every dozen requests under load, each visiting every young object of
# the requests in flight (3-4 % of the CPU at 64 in flight); almost all a request makes is freed
# by reference counting, so this many are rarely reached (about one collection per thousand
# requests, 0.3-0.5 ms each).
GC_YOUNG = 10_000


def _freeze_startup_objects():
    """Keep the objects of startup (modules, classes, the service) out of every later GC pass,
    collect the youngest objects less often (L{GC_YOUNG}), and turn collections back on.

    A full collection visits every tracked object: about 50,000 after startup,
    a 40-60 ms pause of every stream in flight, every few seconds under
    load. Frozen, they are skipped; a full pass then visits only what the
    gateway made since (Python's gc.freeze). Collections are off while the
    gateway is imported and built (L{makeService}): they would visit the
    long-lived objects as they are made, about 40 collections and 6 ms, and
    find almost nothing to free (about 100 objects of cyclic garbage, frozen
    with the rest: a collection before the freeze would cost another 16-29 ms
    before the first request).
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
    gc.enable()
    release_freed_heap()


def release_freed_heap() -> bool:
    """Hand back to the system the C heap's free pages (glibc's C{malloc_trim}); return whether it could.

    What startup allocated and freed (source read, code compiled or
    unmarshalled, the plugin's option parsing) stays in the process's heap as
    free chunks between live ones: glibc returns only the heap's free top by
    itself. Trimmed once startup is over, a gateway process holds about 0.85 MiB
    less under load (bench/results/2026-12-05-session45.md); the chunks are
    reused as before. Elsewhere than glibc (musl, macOS) nothing happens.
    """
    import ctypes  # (loaded already: twisted.python.win32 imports it on every platform)

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True

"""The C{gomodel} command: C{twistd -n --pidfile= gomodel} with the given options, lean.

It runs twistd's own runner (the same options, logging, signals and exit
statuses) but hands it gomodel's plugin directly: Twisted's plugin system is
never asked, so no plugin module of any installed package is imported and no
plugin cache is read. C{twistd -n gomodel} asks it: with a plugin cache that
is written, that costs twistd about 1 MB of interfaces it unpickles; with none
(a fresh C{pip install .}, or a site-packages the process cannot write) it
imports every plugin module of every installed package, Twisted's own
loading OpenSSL and SSH (about 12 MB). And twistd's script has imported its
runner (C{twisted.application.app}, C{pdb}, C{asyncio}, the standard library's
TLS...) before any of gomodel's code runs, without the import hooks that keep
those out (L{gomodel.lean}). So the gomodel plugin hands the process over to
this runner (L{leave_plugin_scan}): same pid, same arguments, none of those
modules: about 10 MiB less.

Nothing here imports Twisted at module level: the plugin imports this module.
"""

import os
import sys

# Whether this process is the gomodel runner (L{twistd}): twistd's plugin asks it to hand over no more.
_runner = False

# The command line a process hands itself over with: the original sys.path[0]
# (the twistd script's directory, or '' for python -c) and argv come along.
_HANDOVER = ("import sys; first = sys.argv.pop(1); del sys.argv[0]\n"
             "if not sys.flags.safe_path: sys.path[0] = first\n"
             "from gomodel.cli import twistd; twistd()")


def main(argv=None):
    """The console script: C{gomodel [--listen ...] [--config ...] [--workers N]}."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if sys.flags.optimize > 1 and "--help" in argv:
        _help_with_docstrings(argv)
    sys.argv = [sys.argv[0] if sys.argv else "gomodel", "-n", "--pidfile=", "gomodel", *argv]
    twistd(command="gomodel")


def _help_with_docstrings(argv):
    """Under C{-OO} (the image's C{PYTHONOPTIMIZE=2}) docstrings are gone, and with them the help texts
    of twistd's options: answer C{--help} from an interpreter that keeps them (C{exec}, same pid)."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONOPTIMIZE"}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "gomodel", *argv], env)


def twistd(command=None):
    """twistd's runner on C{sys.argv}, knowing gomodel's plugin only (no plugin scan, no cache).

    @param command: the name a bad option is reported under, alone on one line of stderr (exit
        status 1), as C{gomodel: <problem>}; None for twistd's way (its whole usage text, then
        the problem after the first two arguments).
    """
    global _runner
    _runner = True
    from gomodel.lean import (import_defer_without_asyncio, import_html_without_entities, leave_cookiejar_out,
                              leave_credentials_out, leave_email_out, leave_http_servers_out, leave_mimetypes_out,
                              leave_perspective_broker_out, leave_tls_out, leave_unicodedata_out, leave_zipfile_out,
                              leave_zlib_out, load_rare_modules_on_use)

    leave_tls_out()  # (before Twisted, which imports the standard library's TLS it does not use)
    load_rare_modules_on_use()
    leave_cookiejar_out()
    leave_zipfile_out()
    leave_http_servers_out()
    leave_mimetypes_out()
    leave_perspective_broker_out()
    leave_credentials_out()
    leave_zlib_out()
    leave_unicodedata_out()
    leave_email_out()
    import_html_without_entities()
    import_defer_without_asyncio()
    from twisted.application import app
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins
    from twisted.plugins.gomodel_plugin import gomodel as maker
    from twisted.scripts import twistd as script

    class ServerOptions(script.ServerOptions):
        @staticmethod
        def _getPlugins(interface, package=None):
            return [maker] if interface is IServiceMaker else getPlugins(interface, package)

    if command is None:
        return app.run(script.runApp, ServerOptions)
    from twisted.python import usage

    config = ServerOptions()
    config.synopsis = "Usage:"  # (its help reads "Usage: gomodel [--listen ...]", not twistd's options)
    try:
        config.parseOptions()
    except usage.error as e:
        sys.exit(f"{command}: {e}")
    script.runApp(config)


def leave_plugin_scan():
    """Under twistd's own script (with or without a plugin scan): become the C{gomodel} runner
    (L{twistd}) with the same arguments, in the same process (C{exec}), which imports what it
    runs with L{gomodel.lean}'s hooks in place (the script had imported Twisted without them).

    Nothing has happened yet that the new program would miss: twistd calls
    this while it parses its options, before a pid file, a log or a reactor.
    Returns (and twistd goes on) in that runner, and where there is no C{exec}.
    """
    if os.name != "posix" or not sys.executable or _runner:
        return
    import subprocess

    first = "" if sys.flags.safe_path else sys.path[0]
    argv = [sys.executable, *subprocess._args_from_interpreter_flags(), "-c", _HANDOVER, first, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)

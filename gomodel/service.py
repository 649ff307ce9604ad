"""The running gateway as one tree of Twisted services (built by L{gomodel.build.build_gateway})."""

from twisted.application.service import MultiService
from twisted.internet.defer import DeferredList, maybeDeferred
from twisted.logger import ILogObserver, Logger

from gomodel.logs import TextObserver, log_observer


class GatewayService(MultiService):
    """The whole running gateway.

    @ivar registry: the L{gomodel.routing.registry.ModelRegistry}; C{monitor} the
        L{gomodel.routing.health.ReplicaMonitor} of its providers' replicas.
    @ivar store: the store; C{batch_runner} the batch runner; C{keys} the managed keys (L{gomodel.auth.keys.KeyRing}).
    @ivar site: the L{gomodel.http.site.GatewaySite}; C{listeners} its
        L{gomodel.listeners.ListenerService}s.
    @ivar telemetry: the L{gomodel.accounting.tracing.Telemetry} when
        C{OTEL_ENABLED}, else None.
    @ivar pins: the L{gomodel.routing.pins.SharedPins} when C{REDIS_URL} is set, else None.
    @ivar background_watch: the L{gomodel.api.background.BackgroundWatch} of this process's background responses.
    """

    log = Logger()

    def __init__(self, config, reactor=None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.registry = self.monitor = self.store = self.batch_runner = self.site = self.metrics = None
        self.drain = self.supervisor = self.usage = self.keys = self.telemetry = self.pins = None
        self.background_watch = None
        self.listeners = []
        self.stdout_log = False  # twistd writes its log to standard output (see L{setServiceParent})
        self.twistd_log = None  # makes the observer twistd would log to, for LOG_LEVEL to filter (or None)

    def setServiceParent(self, parent):
        """Under twistd's application: hand it the log observer C{LOG_FORMAT}/C{LOG_LEVEL} ask for, or,
        where twistd would write its own text lines to standard output (L{stdout_log}), gomodel's.

        twistd asks its application for an L{ILogObserver} component when it
        starts logging, which is after the service was built and attached. gomodel's text observer
        holds access lines for a moment (L{gomodel.logs.TextObserver}): what it holds is written
        once the reactor has stopped.
        """
        super().setServiceParent(parent)
        observer = log_observer(self.config.metrics.log_format, self.config.metrics.log_level,
                                classic=self.stdout_log, clock=self.reactor, twistd=self.twistd_log)
        if observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, observer)
            if isinstance(observer, TextObserver) and self.reactor is not None:
                self.reactor.addSystemEventTrigger("after", "shutdown", observer.flush)

    def startService(self):
        for warning in self.config.warnings:
            self.log.warn("config: {warning}", warning=warning)
        if not self.config.upstreams.providers:
            self.log.warn(
                "no providers configured: /v1/models is empty. Add one with e.g. "
                "VLLM_BASE_URL=http://localhost:8000/v1 (and VLLM_API_KEY if that vLLM runs with --api-key), "
                "VLLM_<NAME>_BASE_URL for more instances, or a providers: block in the YAML config.")
        for p in self.config.upstreams.providers:
            self.log.info("provider {name} ({type}){keyed}", name=p.name, type=p.type,
                          keyed=" with API key" if p.api_key else "")
        if not self.config.auth.master_key:
            self.log.warn("GOMODEL_MASTER_KEY is not set: the gateway is open to anyone who can reach it.")
        quotas = self.config.quotas
        if self.supervisor is not None and not self.config.store.redis_url and quotas is not None and \
                quotas.rate_limits_enabled:
            self.log.warn("{workers} processes without REDIS_URL: each counts rate and concurrency limits alone (a key "
                          "may get up to {workers} times its limits) and its own budget sums; set REDIS_URL to share "
                          "them", workers=self.config.server.workers)
        super().startService()

    def stopService(self):
        """Drain (see L{gomodel.lifecycle}), workers at the same time, then stop every service.

        @return: a Deferred firing once all is stopped.
        """
        draining = [self.drain.drain()] if self.drain is not None else []
        if self.supervisor is not None:
            draining.append(maybeDeferred(self.supervisor.stopService))  # workers drain themselves meanwhile
        d = DeferredList(draining)
        d.addCallback(lambda _: MultiService.stopService(self))
        return d

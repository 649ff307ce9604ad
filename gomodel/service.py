"""The running gateway as a tree of Twisted services, and the services that own a pool or a port."""

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

class PoolService(Service):
    """Owns the upstream connection pool; closes it last on the way down."""

    def __init__(self, pool):
        self.pool = pool

    def stopService(self):
        super().stopService()
        return self.pool.closeCachedConnections()

class ListenerService(Service):
    """Listens on one endpoint; L{whenListening} fires with the port."""

    log = Logger()

    def __init__(self, endpoint, factory, description=None):
        self.description = description
        self._endpoint = endpoint
        self._factory = factory
        self._port = None
        self._waiting = []

    def whenListening(self) -> Deferred:
        """Fires with the L{IListeningPort} once listening."""
        if self._port is not None:
            return succeed(self._port)
        d = Deferred()
        self._waiting.append(d)
        return d

    def startService(self):
        super().startService()
        d = self._endpoint.listen(self._factory)

        def listening(port):
            self._port = port
            address = port.getHost()
            self.log.info("listening on {host}:{port}", host=address.host, port=address.port)
            waiting, self._waiting = self._waiting, []
            for w in waiting:
                w.callback(port)

        def failed(failure):
            waiting, self._waiting = self._waiting, []
            for w in waiting:
                w.errback(failure)
            if not waiting:
                return failure

        d.addCallbacks(listening, failed)

    def stopService(self):
        super().stopService()
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()
        return None

class GatewayService(MultiService):
    """The whole running gateway: a tree of services built by L{gomodel.build.build_gateway}.

    @ivar registry: the L{gomodel.routing.registry.ModelRegistry}.
    @ivar store: the store; C{batch_runner} the batch runner.
    @ivar site: the L{gomodel.http.site.GatewaySite}; C{listeners} its L{ListenerService}s.
    """

    log = Logger()

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.registry = self.store = self.batch_runner = self.site = None
        self.listeners = []

    def startService(self):
        for warning in self.config.warnings:
            self.log.warn("config: {warning}", warning=warning)
        if not self.config.providers:
            self.log.warn(
                "no providers configured: /v1/models is empty. Add one with e.g. "
                "VLLM_BASE_URL=http://localhost:8000/v1 (and VLLM_API_KEY if that vLLM runs with --api-key), "
                "VLLM_<NAME>_BASE_URL for more instances, or a providers: block in the YAML config.")
        for p in self.config.providers:
            self.log.info("provider {name} ({type}){keyed}", name=p.name, type=p.type,
                          keyed=" with API key" if p.api_key else "")
        if not self.config.master_key:
            self.log.warn("GOMODEL_MASTER_KEY is not set: the gateway is open to anyone who can reach it.")
        super().startService()

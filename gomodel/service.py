"""The running gateway as a tree of Twisted services: pool, model registry, listeners."""

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from gomodel.api.app import GatewayApp
from gomodel.api.site import GatewaySite
from gomodel.httpclient import make_agent, make_http_client, make_pool
from gomodel.providers import build_provider
from gomodel.registry import ModelRegistry


class PoolService(Service):
    """Owns the upstream connection pool; closes it last on the way down."""

    def __init__(self, pool):
        self.pool = pool

    def stopService(self):
        super().stopService()
        return self.pool.closeCachedConnections()


class ListenerService(Service):
    """Listens on one endpoint; L{whenListening} fires with the port."""

    def __init__(self, endpoint, factory):
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
    """The whole gateway, built from one L{gomodel.config.Config} and a reactor."""

    log = Logger()

    def __init__(self, config, reactor):
        super().__init__()
        self.config = config
        pool = make_pool(reactor, config)
        agent = make_agent(reactor, pool, config.timeouts.connect)
        http = make_http_client(agent)
        PoolService(pool).setServiceParent(self)
        providers = [build_provider(p, agent, http, reactor, config.timeouts) for p in config.providers]
        self.registry = ModelRegistry(providers, reactor, mode=config.models_mode,
                                      refresh_interval=config.models_refresh_interval)
        self.registry.setServiceParent(self)
        self.app = GatewayApp(config, self.registry, reactor)
        self.site = GatewaySite(self.app.resource(), config.body_size_limit)
        self.site.noisy = False
        self.listeners = []
        for description in config.listen:
            listener = ListenerService(serverFromString(reactor, description), self.site)
            listener.setServiceParent(self)
            self.listeners.append(listener)

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
        for description in self.config.listen:
            self.log.info("listening on {listen}", listen=description)

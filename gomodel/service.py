"""The running gateway as a tree of Twisted services: pool, model registry, listeners."""

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from gomodel.api.app import GatewayApp
from gomodel.api.batches import BatchesAPI
from gomodel.api.files import FilesAPI
from gomodel.api.site import GatewaySite
from gomodel.batches.runner import BatchRunner
from gomodel.batches.service import BatchServices
from gomodel.httpclient import CachingEndpointFactory, RelayClient, make_agent, make_http_client, make_pool
from gomodel.providers import build_provider
from gomodel.registry import ModelRegistry
from gomodel.responses_history import ResponseRetention
from gomodel.store import SQLiteStore, process_owner
from gomodel.store.sweeps import StoreSweeper
from gomodel.workers import ParentWatch, ReusePortEndpoint, WorkerSupervisor, parse_tcp


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
    """The whole gateway, built from one L{gomodel.config.Config} and a reactor."""

    log = Logger()

    def __init__(self, config, reactor, *, role="single", worker_argv=None):
        """
        @param role: C{"single"} (one process), C{"primary"} (listens with
            SO_REUSEPORT and supervises C{config.workers - 1} workers started
            with C{worker_argv}) or C{"worker"} (started by a primary).
        """
        super().__init__()
        self.config = config
        pool = make_pool(reactor, config)
        endpoints = CachingEndpointFactory(reactor, config.timeouts.connect)
        relay = RelayClient(pool, endpoints)
        http = make_http_client(make_agent(reactor, pool, endpoints))
        PoolService(pool).setServiceParent(self)
        providers = [build_provider(p, relay, http, reactor, config.timeouts) for p in config.providers]
        self.registry = ModelRegistry(providers, reactor, mode=config.models_mode,
                                      refresh_interval=config.models_refresh_interval)
        self.registry.setServiceParent(self)
        # The store, then its users (stopped in reverse, one after the other).
        # Any process on a data directory may run any batch or sweep: each is claimed.
        owner = process_owner()
        self.store = store = SQLiteStore(config.data_dir, reactor)
        self.batch_runner = BatchRunner(store.batches, store.blobs, self.registry, reactor, config.timeouts,
                                        concurrency=config.batch_concurrency_per_provider,
                                        max_attempts=config.batch_max_attempts, owner=owner)
        BatchServices(store, StoreSweeper(store.files, store.blobs, store.claims, reactor, owner),
                      ResponseRetention(store.responses, store.claims, reactor, config.responses_retention, owner),
                      self.batch_runner).setServiceParent(self)
        files = FilesAPI(store.files, store.blobs, config.files_max_bytes)
        self.app = GatewayApp(config, self.registry, reactor, files=files,
                              batches=BatchesAPI(store.batches, store.files, self.batch_runner),
                              store=store.responses)
        self.site = GatewaySite(self.app.resource(), config.body_size_limit, upload_sink=files.upload_sink)
        self.site.noisy = False
        self.listeners = []
        for description in config.listen:
            if role == "single":
                endpoint = serverFromString(reactor, description)
            else:
                endpoint = ReusePortEndpoint(reactor, *parse_tcp(description))
            listener = ListenerService(endpoint, self.site, description)
            listener.setServiceParent(self)
            self.listeners.append(listener)
        if role == "primary" and config.workers > 1:
            WorkerSupervisor(reactor, config.workers, self.listeners, worker_argv).setServiceParent(self)
        elif role == "worker":
            ParentWatch(reactor).setServiceParent(self)

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

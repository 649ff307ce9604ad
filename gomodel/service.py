"""The running gateway as a tree of Twisted services: pool, model registry, listeners."""

from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from gomodel.api.app import GatewayApp
from gomodel.api.batches import BatchesAPI
from gomodel.api.files import FilesAPI
from gomodel.api.site import GatewaySite
from gomodel.batches.service import BatchServices
from gomodel.httpclient import CachingEndpointFactory, RelayClient, make_agent, make_http_client, make_pool
from gomodel.listeners import ListenerService, PoolService
from gomodel.providers import build_provider
from gomodel.registry import ModelRegistry
from gomodel.responses_history import ResponseRetention
from gomodel.workers import ParentWatch, ReusePortEndpoint, WorkerSupervisor, parse_tcp


class GatewayService(MultiService):
    """The whole gateway, built from one L{gomodel.config.Config} and a reactor."""

    log = Logger()

    def __init__(self, config, reactor, *, role="single", worker_argv=None, worker_env=None):
        """
        @param role: C{"single"} (one process), C{"primary"} (listens with
            SO_REUSEPORT and supervises C{config.server.workers - 1} workers started
            with C{worker_argv} in the environment C{worker_env}) or C{"worker"}
            (started by a primary).
        """
        super().__init__()
        self.config = config
        pool = make_pool(reactor, config)
        endpoints = CachingEndpointFactory(reactor, config.upstreams.timeouts.connect)
        relay = RelayClient(pool, endpoints)
        http = make_http_client(make_agent(reactor, pool, endpoints))
        PoolService(pool).setServiceParent(self)
        providers = [build_provider(p, relay, http, reactor, config.upstreams.timeouts)
                     for p in config.upstreams.providers]
        self.registry = ModelRegistry(providers, reactor, mode=config.upstreams.models_mode,
                                      refresh_interval=config.upstreams.models_refresh_interval)
        self.registry.setServiceParent(self)
        # Files and batches: the store, then the runner (stopped in reverse, one
        # after the other). Of several processes on one data directory only the
        # first executes batches; workers store them for it.
        batches = BatchServices(config, self.registry, reactor, primary=role != "worker")
        batches.setServiceParent(self)
        self.store, self.batch_runner = batches.store, batches.runner
        if role != "worker":
            ResponseRetention(self.store, reactor, config.store.responses_retention).setServiceParent(self)
        files = FilesAPI(self.store, config.limits.files_max_bytes)
        self.app = GatewayApp(config, self.registry, reactor, files=files,
                              batches=BatchesAPI(self.store, self.batch_runner), store=self.store)
        self.site = GatewaySite(self.app.resource(), config.limits.body_size_limit, upload_sink=files.upload_sink)
        self.site.noisy = False
        self.listeners = []
        for description in config.server.listen:
            if role == "single":
                endpoint = serverFromString(reactor, description)
            else:
                endpoint = ReusePortEndpoint(reactor, *parse_tcp(description))
            listener = ListenerService(endpoint, self.site, description)
            listener.setServiceParent(self)
            self.listeners.append(listener)
        if role == "primary" and config.server.workers > 1:
            WorkerSupervisor(reactor, config.server.workers, self.listeners, worker_argv,
                             worker_env).setServiceParent(self)
        elif role == "worker":
            ParentWatch(reactor).setServiceParent(self)

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
        super().startService()

"""The one composition root: configuration in, the running gateway's service tree out.

Everything the gateway is made of is built here and only here, in the order
a request meets it: upstreams (pool, clients, providers), routing (the
registry), stores and batch work, the exchange and the routes, the site and
its listeners. No other module constructs a collaborator of another room.
"""

from twisted.internet.endpoints import serverFromString

from gomodel.api.app import GatewayApp
from gomodel.api.batches import BatchesAPI
from gomodel.api.files import FilesAPI
from gomodel.api.inference import InferenceRoutes
from gomodel.api.passthrough import Passthrough
from gomodel.api.responses import ResponsesRoute
from gomodel.auth.keys import MasterKeyAuth
from gomodel.batches.service import BatchServices
from gomodel.http.context import AccessLog
from gomodel.http.front import FrontResource
from gomodel.http.site import GatewaySite
from gomodel.proxy.exchange import Exchange
from gomodel.responses_history import ResponseRetention
from gomodel.routing.registry import ModelRegistry
from gomodel.listeners import ListenerService, PoolService
from gomodel.service import GatewayService
from gomodel.upstream import build_provider
from gomodel.upstream.client import CachingEndpointFactory, RelayClient, make_agent, make_http_client, make_pool
from gomodel.workers import ParentWatch, ReusePortEndpoint, WorkerSupervisor, parse_tcp


def build_gateway(config, reactor, *, role="single", worker_argv=None, worker_env=None) -> GatewayService:
    """The whole gateway for C{config}, not started.

    @param role: C{"single"} (one process), C{"primary"} (listens with
        SO_REUSEPORT and supervises C{config.server.workers - 1} workers started
        with C{worker_argv} in the environment C{worker_env}) or C{"worker"}
        (started by a primary).
    """
    gateway = GatewayService(config)

    # Upstreams: one pool (closed last), the relay client, treq for our own calls.
    pool = make_pool(reactor, config.upstreams.pool_max_per_host, config.upstreams.pool_idle_timeout)
    PoolService(pool).setServiceParent(gateway)
    endpoints = CachingEndpointFactory(reactor, config.upstreams.timeouts.connect)
    relay_client = RelayClient(pool, endpoints)
    http = make_http_client(make_agent(reactor, pool, endpoints))
    providers = [build_provider(p, relay_client, http, reactor, config.upstreams.timeouts) for p in config.upstreams.providers]

    # Routing.
    gateway.registry = ModelRegistry(providers, reactor, mode=config.upstreams.models_mode,
                                     refresh_interval=config.upstreams.models_refresh_interval)
    gateway.registry.setServiceParent(gateway)

    # Stores and batch work (stopped in reverse, one after the other).
    exchange = Exchange(reactor, config.upstreams.timeouts)
    batches = BatchServices(config, gateway.registry, reactor, exchange, primary=role != "worker")
    batches.setServiceParent(gateway)
    gateway.store, gateway.batch_runner = batches.store, batches.runner
    if role != "worker":
        ResponseRetention(gateway.store, reactor, config.store.responses_retention).setServiceParent(gateway)

    # Routes.
    responses = ResponsesRoute(exchange, reactor, gateway.registry, gateway.store)
    inference = InferenceRoutes(gateway.registry, exchange, responses)
    files = FilesAPI(gateway.store, config.limits.files_max_bytes)
    app = GatewayApp(gateway.registry, responses, Passthrough(config.upstreams.passthrough, gateway.registry, exchange),
                     files=files, batches=BatchesAPI(gateway.store, gateway.batch_runner))
    sinks = (AccessLog(),) if config.metrics.access_log else ()
    front = FrontResource(app.app.resource(), reactor, body_limit=config.limits.body_size_limit, sinks=sinks,
                          exact=inference.routes())
    gateway.site = GatewaySite(front, config.limits.body_size_limit, authenticate=MasterKeyAuth(config.auth.master_key),
                               upload_sink=files.upload_sink)
    gateway.site.noisy = False

    # Listeners, and the processes that share them.
    for description in config.server.listen:
        if role == "single":
            endpoint = serverFromString(reactor, description)
        else:
            endpoint = ReusePortEndpoint(reactor, *parse_tcp(description))
        listener = ListenerService(endpoint, gateway.site, description)
        listener.setServiceParent(gateway)
        gateway.listeners.append(listener)
    if role == "primary" and config.server.workers > 1:
        WorkerSupervisor(reactor, config.server.workers, gateway.listeners, worker_argv,
                         worker_env).setServiceParent(gateway)
    elif role == "worker":
        ParentWatch(reactor).setServiceParent(gateway)
    return gateway

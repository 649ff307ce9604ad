"""The one composition root: configuration in, the running gateway's service tree out.

Everything the gateway is made of is built here and only here, in the order
a request meets it: upstreams (pool, clients, providers), routing (the
registry), stores and batch work, the exchange and the routes, the site and
its listeners. No other module constructs a collaborator of another room.
"""

from functools import partial
from urllib.parse import urlsplit

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IResolutionReceiver
from zope.interface import implementer

from gomodel.accounting.tokens import Pricing
from gomodel.accounting.usage import UsageLedger
from gomodel.anthropic.batch_lines import MessagesLines
from gomodel.anthropic.file_sources import FileSources
from gomodel.api.inference import InferenceRoutes
from gomodel.api.lazy import LazyRoutes
from gomodel.api.messages import MessagesRoutes
from gomodel.api.passthrough import dialect_below as passthrough_dialect
from gomodel.api.plain import PlainRoutes
from gomodel.api.responses import ResponsesRoute
from gomodel.auth.keys import GatewayAuth, KeyRing
from gomodel.auth.tenancy import CacheSalts
from gomodel.batches.runner import BatchRunner
from gomodel.batches.service import BatchServices
from gomodel.dashboard import SHELL_PATHS, STATIC_PREFIX
from gomodel.http import render
from gomodel.http.context import AccessLog
from gomodel.http.front import FrontResource
from gomodel.http.site import IDLE_SWEEP, GatewaySite
from gomodel.lifecycle import Drain, Readiness
from gomodel.limits.budgets import LEDGER_FRESH, BudgetBook
from gomodel.limits.counters import LocalCounters, RedisCounters
from gomodel.limits.gate import Gate
from gomodel.limits.limiter import Limiter
from gomodel.periodic import Repeating
from gomodel.proxy.exchange import Exchange
from gomodel.redis_client import connect as connect_redis
from gomodel.redis_client import tagged as tag_redis_prefix
from gomodel.responses_history import ResponseRetention
from gomodel.routing.health import ReplicaMonitor
from gomodel.routing.pins import SharedPins
from gomodel.routing.lag import LoopLag
from gomodel.routing.pool import Replica, ReplicaPool
from gomodel.routing.registry import ModelRegistry
from gomodel.listeners import ListenerService, PoolService, RedisService, listen_endpoint
from gomodel.service import GatewayService
from gomodel.store.records import process_owner
from gomodel.store.sweeps import StoreSweeper
from gomodel.timers import Timers
from gomodel.translate.responses_chat import NativeResponses
from gomodel.upstream import build_server
from gomodel.upstream.client import POOL_SWEEP, CachingEndpointFactory, RelayClient, make_pool

# The health probes (load balancers', orchestrators'): no span, and counted in no request series.
PROBES = (b"/health", b"/health/ready")


def build_gateway(config, reactor, *, role="single", worker_argv=None, worker_env=None,
                  shared_metrics=False, worker_logs=None, timeouts_clock=None) -> GatewayService:
    """The whole gateway for C{config}, not started.

    @param role: C{"single"} (one process), C{"primary"} (listens, deals its
        connections round robin to itself and the C{config.server.workers - 1}
        workers it supervises, started with C{worker_argv} in the environment
        C{worker_env}) or C{"worker"} (started by a primary; serves the
        connections it passes on).
    @param shared_metrics: the processes share prometheus_client's multiprocess
        directory (set up by L{gomodel.tap}): every scrape sums them.
    @param worker_logs: a primary's log publisher, which its workers' log events are published in
        (their C{worker_argv} has them write those for it: L{gomodel.workers.WorkerLog}); or None: the
        workers write to its standard output.
    @param timeouts_clock: the clock the upstreams' timeouts run on (L{Timers}): the reactor (None), or a test's
        L{twisted.internet.task.Clock}, which it advances to time one out.
    """
    gateway = GatewayService(config, reactor)
    if config.metrics.otel_enabled:  # OpenTelemetry (its SDK imported only now): started before the listeners
        from gomodel.accounting.tracing import Telemetry

        gateway.telemetry = Telemetry(reactor, quiet=PROBES + (config.metrics.endpoint.encode("ascii"),))
        gateway.telemetry.setServiceParent(gateway)

    # Upstreams: one pool (closed last), the relay client (relayed requests and our own calls), and
    # the timer their timeouts share.
    timers = Timers(reactor if timeouts_clock is None else timeouts_clock)
    timers.setServiceParent(gateway)
    pool = make_pool(reactor, config.upstreams.pool_max_per_host, config.upstreams.pool_idle_timeout)
    PoolService(pool).setServiceParent(gateway)
    Repeating(POOL_SWEEP, partial(pool.close_idle, POOL_SWEEP), clock=reactor).setServiceParent(gateway)
    endpoints = CachingEndpointFactory(reactor, config.upstreams.timeouts.connect)
    relay_client = RelayClient(pool, endpoints)
    routing = config.routing
    # Redis (REDIS_URL), one client: shared session pins here, shared limit counters below.
    redis = pins = None
    if config.store.redis_url:
        cluster = config.store.redis_cluster
        redis = connect_redis(config.store.redis_url, cluster=cluster)
        # (on a Redis Cluster, under one hash tag: every key of this deployment in one slot, for the scripts)
        redis_prefix = tag_redis_prefix(config.store.redis_key_prefix) if cluster else config.store.redis_key_prefix
        gateway.pins = pins = SharedPins(redis, reactor, channel=redis_prefix + "pins",
                                         key_prefix=redis_prefix + "pins:")
    pools = [_pool(p, routing, relay_client, reactor, timers, config.upstreams.timeouts, pins)
             for p in config.upstreams.providers]
    resolver = getattr(reactor, "nameResolver", None)  # (none in a test's clock)
    for p in pools:  # (the addresses a replica's host name resolves to, hidden as its name is)
        for replica in p.replicas:
            host = urlsplit(replica.base_url).hostname
            if host:
                noted = partial(p.hide_too, replica.server)
                endpoints.on_peer(host.encode(), noted)  # (each a connection reaches, as DNS changes)
                if resolver is not None and not (isIPAddress(host) or isIPv6Address(host)):
                    resolver.resolveHostName(_Resolved(noted), host)  # (each it resolves to now, reached or not)
    if pins is not None:
        pins.attach([p for p in pools if p.pins is not None])

    # Routing: what each provider serves, and how its replicas are doing.
    gateway.registry = ModelRegistry(pools, reactor, mode=config.upstreams.models_mode,
                                     virtual_models=routing.virtual_models, failover_rules=routing.failover_rules)
    if gateway.telemetry is not None:
        gateway.telemetry.listed = gateway.registry.lists  # (its metrics name only the models listed)
    gateway.monitor = ReplicaMonitor(
        gateway.registry, reactor, mode=config.upstreams.models_mode,
        refresh_interval=config.upstreams.models_refresh_interval, health_interval=routing.health_interval,
        metrics_interval=routing.metrics_interval, stall_timeout=routing.stall_timeout)
    gateway.monitor.setServiceParent(gateway)
    if routing.strategy == "load":  # (its paces count only there: L{gomodel.routing.lag})
        LoopLag(reactor, pools).setServiceParent(gateway)
    exchange = Exchange(reactor, config.upstreams.timeouts, max_attempts=routing.max_attempts, timers=timers)
    owner = process_owner()
    # (A worker is one of several whatever its configuration says: its command line has no --workers.)
    several = config.server.workers > 1 or role == "worker"
    gateway.store = store = _store(config.store, reactor, several)

    # Limits and budgets: counters in this process, or shared through Redis (REDIS_URL).
    gateway.keys = KeyRing(store.keys, reactor)
    shared_counters = None
    if redis is not None:
        counters = shared_counters = RedisCounters(redis, redis_prefix + "limits:", reactor)
        RedisService(redis, counters, pins).setServiceParent(gateway)
    else:
        counters = LocalCounters(reactor)
    pricing = Pricing(config.usage.pricing, config.upstreams.providers)
    usage = config.usage
    if usage.enabled:
        gateway.usage = UsageLedger(store.usage, store.claims, reactor, owner, flush_interval=usage.flush_interval,
                                    retention=usage.retention_days * 86400.0, pricing=pricing)
    # A budget's sums start from the ledger: what it wrote, and what it holds still.
    ledger = store.usage if gateway.usage is None else gateway.usage
    book = BudgetBook(counters, reactor, seed=ledger.spent, seed_many=ledger.spent_many,
                      seed_counts_kept=gateway.usage is not None) if config.quotas.budgets_enabled else None
    gateway.gate = Gate(Limiter(counters, reactor), book, config.quotas, store.budgets, reactor, pricing=pricing)
    gateway.keys.budgets_changed = gateway.gate.renew
    if book is not None and shared_counters is None and (config.store.storage_type == "postgresql" or several):
        # The ledger is shared with other processes, the counters are not: each follows what the others spent.
        Repeating(LEDGER_FRESH, gateway.gate.follow_ledger, clock=reactor).setServiceParent(gateway)
    exchange.admit = gateway.gate.admit

    # The store, then its users (stopped in reverse, one after the other; the usage ledger after the
    # others: what they record is written). Any process on a data directory may run any batch or sweep:
    # each is claimed in the store.
    salts = CacheSalts(config.auth.cache_salt_mode, config.auth.cache_salt_secret, config.auth.master_key)
    messages = MessagesRoutes(gateway.registry, exchange, reactor, salts, gateway.gate,
                              FileSources(store.files, store.blobs), keepalive=config.upstreams.messages_keepalive)
    native = NativeResponses(reactor)  # (which providers have no /responses: online and batch lines learn it alike)
    responses = ResponsesRoute(exchange, reactor, gateway.registry, store.responses, salts, gateway.gate,
                               gateway.usage, store.background, owner, gateway.keys, native)
    gateway.batch_runner = BatchRunner(store.batches, store.blobs, gateway.registry, reactor, exchange,
                                       concurrency=config.limits.batch_concurrency_per_provider,
                                       max_attempts=config.limits.batch_max_attempts, owner=owner,
                                       lease=config.limits.batch_lease_timeout,
                                       max_claimed=config.limits.batch_max_claimed,
                                       usage=gateway.usage, keys=gateway.keys, salts=salts, gate=gateway.gate,
                                       responses=store.responses, messages=MessagesLines(messages),
                                       native_responses=native, over=responses.over)
    gateway.background_watch = responses.watch
    users = [gateway.keys, gateway.gate]
    users += [gateway.usage] if gateway.usage is not None else []
    users += [StoreSweeper(store.files, store.blobs, store.claims, reactor, owner, batches=store.batches),
              ResponseRetention(store.responses, store.claims, reactor, config.store.responses_retention, owner),
              responses.watch, gateway.batch_runner]  # (the runner stopped first: it cuts what is in flight at once)
    BatchServices(store, *users).setServiceParent(gateway)

    # Routes: the front serves the inference routes and the plain ones (health checks, the model
    # list); Klein's, every other, are built at the first request for one (gomodel.api.lazy).
    inference = InferenceRoutes(gateway.registry, exchange, responses, salts, gateway.gate)
    plain = PlainRoutes(gateway.registry)
    if config.auth.admin_endpoints:  # (a fleet's readiness check and key provisioning, served without Klein)
        plain.serve_admin(reactor, partial(_keys, store, gateway.keys, reactor, book))
    # The dashboard is a page over the admin API: served only with it.
    dashboard = config.auth.admin_ui and config.auth.admin_endpoints
    routes = LazyRoutes(lambda: _klein_app(config, reactor, gateway, store, book, plain, responses, exchange,
                                           dashboard, salts))
    # What every request feeds when it ends (the drain last: the other sinks have their
    # record before a drain can end).
    gateway.drain = Drain(reactor, gateway.listeners, config.server.shutdown_timeout)
    gateway.drain.background.append(gateway.batch_runner.drain)  # (no new batch line once it begins)
    sinks, starts, pages, open_paths = [], [gateway.drain.started], {}, []
    # The scrape's path, with a trailing slash too, as every Klein route (/health/, /v1/models/).
    scrape = config.metrics.endpoint
    metrics_paths = [scrape, scrape + "/"] if scrape != "/" else [scrape]
    if dashboard:  # its page and assets hold no data: every data call needs the master key
        open_paths.extend(SHELL_PATHS)
    if config.metrics.access_log:
        sinks.append(AccessLog())
    if config.metrics.enabled:
        from gomodel.accounting.metrics import GatewayMetrics, MetricsFlush

        gateway.metrics = GatewayMetrics(pools, shared=shared_metrics, in_flight=lambda: gateway.drain.live,
                                         probes=PROBES, pricing=pricing, listed=gateway.registry.lists)
        exchange.retried = gateway.metrics.retried
        gateway.batch_runner.lines_recorded = gateway.metrics.batch_lines
        MetricsFlush(gateway.metrics, reactor).setServiceParent(gateway)
        sinks.append(gateway.metrics)
        for path in metrics_paths:
            pages[path.encode("ascii")] = gateway.metrics.page
        if not config.metrics.require_key:
            open_paths.extend(metrics_paths)
    # The tokens no request's end counts (batch lines, background responses): the metrics' and OpenTelemetry's.
    counters = [sink.tokens_apart for sink in (gateway.metrics, gateway.telemetry) if sink is not None]
    if counters:
        counted = counters[0] if len(counters) == 1 else partial(_each, counters)
        gateway.batch_runner.tokens_counted = counted
        if responses.watch is not None:
            responses.watch.tokens_counted = counted
    if gateway.usage is not None:
        sinks.append(gateway.usage)
    sinks.append(gateway.gate.completed)
    if gateway.telemetry is not None:
        sinks.append(gateway.telemetry)
    sinks.append(gateway.drain)
    # A request no limit or budget applies to (the master key's, an open gateway's) holds nothing to settle where
    # no provider or model has limits: it does without the gate's sink.
    bare = None if gateway.gate.settles_bare else [sink for sink in sinks if sink != gateway.gate.completed]
    front = FrontResource(routes, reactor, body_limit=config.limits.body_size_limit, sinks=sinks, bare_sinks=bare,
                          starts=starts, exact={**inference.routes(), **messages.routes()}, pages=pages,
                          dialects={**messages.dialects(), b"/v1/responses": render.RESPONSES},
                          dialect_below=_dialect_below,
                          tracer=gateway.telemetry.trace if gateway.telemetry is not None else None, plain=plain.find)
    gateway.site = GatewaySite(front, config.limits.body_size_limit,
                               authenticate=GatewayAuth(config.auth.master_key, gateway.keys, open_paths,
                                                        closed_to_keys=metrics_paths,
                                                        open_prefixes=[STATIC_PREFIX] if dashboard else []),
                               upload_sink=routes.upload_sink, early=front.answered_early, reactor=reactor,
                               audio_limit=max(config.limits.audio_body_size_limit, config.limits.body_size_limit),
                               dialect=front.dialect)
    gateway.site.noisy = False
    Repeating(IDLE_SWEEP, gateway.site.sweep_idle, clock=reactor).setServiceParent(gateway)
    gateway.drain.site = gateway.site
    plain.readiness = Readiness(gateway.drain, gateway.registry, store, shared_counters, pins)

    # Listeners, and the processes that share them.
    if role == "worker":  # its connections come from the primary
        from gomodel.workers import HandedConnections, ParentWatch

        handed = HandedConnections(reactor, gateway.site, ready=gateway.registry.ready)
        handed.setServiceParent(gateway)
        gateway.listeners.append(handed)
        ParentWatch(reactor).setServiceParent(gateway)
        return gateway
    handoff = None
    if role == "primary" and config.server.workers > 1:
        from gomodel.workers import Handoff

        handoff = Handoff(gateway.site)
    for description in config.server.listen:
        listener = ListenerService(listen_endpoint(reactor, description), handoff or gateway.site, description)
        listener.setServiceParent(gateway)
        gateway.listeners.append(listener)
    if handoff is not None:
        from gomodel.accounting.metrics import forget_process
        from gomodel.workers import STOP_GRACE, WorkerSupervisor

        gateway.supervisor = WorkerSupervisor(reactor, config.server.workers, handoff, worker_argv,
                                              worker_env, grace=config.server.shutdown_timeout + STOP_GRACE,
                                              dead=forget_process if shared_metrics else None,
                                              publish=worker_logs)
        gateway.supervisor.setServiceParent(gateway)
    return gateway


def _each(functions, *args):
    """Call each of C{functions} with C{args}."""
    for function in functions:
        function(*args)


def _dialect_below(request):
    """The error dialect of a request no exact path names, or None (OpenAI's): Anthropic's below C{/v1/messages}
    and on an Anthropic client's model list (L{MessagesRoutes.dialect_below}), a passthrough's API's on
    C{/p/{provider}/v1/messages} and C{/p/{provider}/v1/responses} (L{gomodel.api.passthrough.dialect_below})."""
    return MessagesRoutes.dialect_below(request) or passthrough_dialect(request)


def _klein_app(config, reactor, gateway, store, book, plain, responses, exchange, dashboard, salts):
    """Klein's routes (imported now: at the first request for one of them) and the APIs they mount, each imported and
    made at the first request for it (L{gomodel.api.lazy.LazyAPI})."""
    from gomodel.lean import (leave_hyperlink_out, leave_markupsafe_out, leave_pprint_out, leave_templates_out,
                              leave_werkzeug_http_out, package_without_init)

    package_without_init("werkzeug")  # (its __init__ imports its development server and test client: never used here)
    # (its data structures' imports all of them: the routing takes four; HTTP headers' parsers, never run here, the rest)
    package_without_init("werkzeug.datastructures", Headers="werkzeug.datastructures.headers",
                         **dict.fromkeys(("ImmutableDict", "MultiDict", "iter_multi_items"), "werkzeug.datastructures.structures"))
    package_without_init("klein", Klein="klein._app")  # (its __init__ imports its forms: Twisted's templates)
    leave_templates_out()  # (Klein's routes take two names of them: see gomodel.lean)
    leave_hyperlink_out()  # (and one of hyperlink, for a dependency they never inject here)
    leave_markupsafe_out()  # (werkzeug's HTML pages' escaping: never rendered here)
    leave_pprint_out()  # (and its routing map's repr)
    leave_werkzeug_http_out()  # (its data structures' header quoting and parsing: never run for routing)
    from gomodel.api.app import GatewayApp
    from gomodel.api.lazy import LazyAPI
    from gomodel.api.passthrough import Passthrough
    from gomodel.api.self_usage import SelfUsage
    from gomodel.dashboard import Dashboard

    def admin():
        from gomodel.api.admin import AdminAPI

        return AdminAPI(gateway.registry, gateway.monitor, reactor, store.usage if config.usage.enabled else None,
                        keys=LazyAPI(keys), budgets=LazyAPI(budgets) if book is not None else None)

    def keys():
        from gomodel.api.key_routes import KeysAPI

        return KeysAPI(store.keys, gateway.keys, reactor, book)

    def budgets():
        from gomodel.api.budgets import BudgetsAPI

        return BudgetsAPI(store.budgets, gateway.gate, book, config.quotas, reactor)

    def files():
        from gomodel.api.files import FilesAPI

        return FilesAPI(store.files, store.blobs, config.limits.files_max_bytes,
                        config.limits.batch_input_expires_after or None, store.batches)

    def batches():
        from gomodel.api.batches import BatchesAPI

        return BatchesAPI(store.batches, store.files, gateway.batch_runner, gateway.gate,
                          config.limits.batch_output_expires_after or None)

    def message_batches():
        from gomodel.anthropic.batches import MessageBatchesAPI

        return MessageBatchesAPI(store.batches, store.files, store.blobs, gateway.batch_runner, gateway.registry,
                                 gateway.gate, config.limits.message_batch_results_expire_after or None, reactor)

    passthrough = Passthrough(config.upstreams.passthrough, gateway.registry, exchange, salts, store.responses)
    return GatewayApp(plain, responses, passthrough, files=LazyAPI(files), batches=LazyAPI(batches),
                      admin=LazyAPI(admin) if config.auth.admin_endpoints else None,
                      message_batches=LazyAPI(message_batches),
                      dashboard=Dashboard(open_gateway=not config.auth.master_key) if dashboard else None,
                      self_usage=SelfUsage(gateway.usage, gateway.gate, reactor))


def _keys(store, ring, clock, book):
    """The admin API's keys' handlers without their Klein routes (L{gomodel.api.keys.Keys}, imported now)."""
    from gomodel.api.keys import Keys

    return Keys(store.keys, ring, clock, book)


def _store(settings, reactor, shared):
    """The store service of C{STORAGE_TYPE}: SQLite in C{GOMODEL_DATA_DIR} (one host; C{shared} by several
    processes, C{--workers}), or PostgreSQL (C{POSTGRES_URL}, shared by every host; psycopg is imported only
    then)."""
    if settings.storage_type == "postgresql":
        from gomodel.store.postgresql import PostgreSQLStore

        return PostgreSQLStore(settings.postgres_url, reactor, max_conns=settings.postgres_max_conns)
    from gomodel.store import SQLiteStore

    return SQLiteStore(settings.data_dir, reactor, shared=shared)


@implementer(IResolutionReceiver)
class _Resolved:
    """What a replica's host name resolves to (the reactor's resolver, at start): C{noted} called with each address
    (text: C{10.0.0.5}, C{fd00::5}), hidden as the name is (L{ReplicaPool.hide_too}) whether or not a connection
    ever reaches it; a name that resolves to none, none."""

    def __init__(self, noted):
        self._noted = noted

    def resolutionBegan(self, resolution):
        pass

    def addressResolved(self, address):
        self._noted(address.host)

    def resolutionComplete(self):
        pass


def _pool(provider, routing, relay_client, clock, timers, timeouts, pins) -> ReplicaPool:
    """A provider's pool: a client and a state per replica (its timeouts on C{timers}), and the routing
    settings."""
    replicas = []
    for index, replica in enumerate(provider.replica_configs):
        limit = routing.max_concurrency if replica.max_concurrency is None else replica.max_concurrency
        server = build_server(provider, replica, relay_client, timers, timeouts)
        replicas.append(Replica(index, server, replica.base_url, clock, weight=replica.weight, max_concurrency=limit,
                                failure_threshold=routing.failure_threshold))
    # A load report is fresh for three scrapes (or six seconds without scraping).
    load_max_age = 3 * routing.metrics_interval if routing.metrics_interval else 6.0
    return ReplicaPool(provider.name, provider.type, replicas, clock, configured_models=provider.models,
                       strategy=routing.strategy, queue_timeout=routing.queue_timeout, load_max_age=load_max_age,
                       affinity_max_ratio=routing.affinity_max_ratio, affinity_slack=routing.affinity_slack,
                       priority_scheduling=provider.priority_scheduling, max_stops=provider.max_stop_sequences,
                       pins=pins if len(replicas) > 1 else None)

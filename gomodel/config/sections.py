"""The configuration's shape: one frozen dataclass per section, each its own table.

A section's settings are its fields, one line each, declared with
L{setting}: the field name and type, the environment variable, the parser,
the default and (where it differs from the field name) the YAML key. The
loader walks these fields, so adding a setting is one line in one class::

    retention: float = setting("RESPONSES_RETENTION", parsers.positive_duration, 30 * 86400.0)

A field declared with L{group} is a nested dataclass whose settings sit in
the same YAML section as its parent's (L{Timeouts} in C{upstreams:}). Fields
with neither (C{UpstreamsConfig.providers}) are filled by the loader from
elsewhere.

YAML keys must be unique across all sections, because the flat C{server:}
section of older files accepts every one of them.
"""

from dataclasses import dataclass, field, fields
from typing import Callable, Iterator, Optional
from urllib.parse import urlsplit

from gomodel.config import parsers


@dataclass(frozen=True)
class Setting:
    """One row of a section's table: where a value comes from and how it is read.

    @ivar env: the environment variable; it wins over YAML.
    @ivar parse: the parser from L{gomodel.config.parsers}.
    @ivar yaml: the YAML key, or C{None} for the field's name.
    @ivar aliases: other environment variables read when C{env} is unset.
    @ivar secret: never shown in messages (nor in the section's repr).
    """

    env: str
    parse: Callable
    yaml: Optional[str] = None
    aliases: tuple = ()
    secret: bool = False


def setting(env, parse, default, *, yaml=None, aliases=(), secret=False):
    """A dataclass field that is one setting (see the module docstring)."""
    return field(default=default, repr=not secret,
                 metadata={"setting": Setting(env, parse, yaml, tuple(aliases), secret)})


def group(cls):
    """A dataclass field holding a nested settings class, read from the parent's YAML section."""
    return field(default_factory=cls, metadata={"group": cls})


def section(cls):
    """A field of L{Config}: one section, read from the YAML section of the field's name."""
    return field(default_factory=cls, metadata={"section": cls})


def settings_of(cls, prefix="") -> Iterator[tuple]:
    """Every setting of C{cls}, nested ones included.

    @return: C{(attribute path, YAML key, Setting, default)} tuples, e.g.
        C{("upstreams.timeouts.connect", "connect_timeout", Setting(...), 10.0)}
        for C{settings_of(Config)}.
    """
    for f in fields(cls):
        path = prefix + f.name
        if "setting" in f.metadata:
            s = f.metadata["setting"]
            yield path, s.yaml or f.name, s, f.default
        else:
            nested = f.metadata.get("group") or f.metadata.get("section")
            if nested is not None:
                yield from settings_of(nested, path + ".")


@dataclass(frozen=True)
class ReplicaConfig:
    """One server of a provider: the same models as its siblings, on another machine or GPU."""

    base_url: str  # the OpenAI API base, e.g. http://h:8000/v1 (no trailing slash)
    root_url: str  # the server root, e.g. http://h:8000 (vLLM's /tokenize lives here)
    api_key: Optional[str] = field(default=None, repr=False)  # None: the provider's
    weight: float = 1.0
    max_concurrency: Optional[int] = None  # None: ROUTING's default; 0: no limit

    @property
    def host(self) -> str:
        """The server's host name: never shown to clients."""
        return urlsplit(self.base_url).hostname or ""

    @property
    def netloc(self) -> str:
        """The server's host and port as its URL spells them: never shown to clients."""
        return urlsplit(self.base_url).netloc


@dataclass(frozen=True)
class ProviderConfig:
    """One upstream provider instance, e.g. C{vllm-test}: one server, or a pool of replicas."""

    name: str
    type: str
    base_url: str  # the first replica's API base
    root_url: str  # the first replica's server root
    api_key: Optional[str] = field(default=None, repr=False)
    models: tuple = ()
    replicas: tuple = ()  # ReplicaConfigs; empty: the one server at base_url
    priority_scheduling: bool = False  # the servers run --scheduling-policy priority
    max_stop_sequences: Optional[int] = None  # the most chat stop sequences it is sent (its type's); None: all

    @property
    def host(self) -> str:
        """The first replica's host name: never shown to clients."""
        return urlsplit(self.base_url).hostname or ""

    @property
    def replica_configs(self) -> tuple:
        """Every replica, in configuration order (the index is the replica's number)."""
        return self.replicas or (ReplicaConfig(self.base_url, self.root_url),)


@dataclass(frozen=True)
class Timeouts:
    """Upstream timeouts in seconds; 0 means "no limit" where allowed."""

    connect: float = setting("HTTP_CONNECT_TIMEOUT", parsers.positive_duration, 10.0, yaml="connect_timeout")
    response_header: float = setting("HTTP_RESPONSE_HEADER_TIMEOUT", parsers.positive_duration, 600.0,
                                     yaml="response_header_timeout")
    stream_idle: float = setting("HTTP_STREAM_IDLE_TIMEOUT", parsers.duration, 300.0, yaml="stream_idle_timeout")
    client_stall: float = setting("HTTP_CLIENT_STALL_TIMEOUT", parsers.duration, 600.0, yaml="client_stall_timeout")
    stream_max: float = setting("HTTP_STREAM_MAX_DURATION", parsers.duration, 0.0, yaml="stream_max_duration")


@dataclass(frozen=True)
class PassthroughConfig:
    """The C{/p/<provider>/...} routes: on or off, for which provider types, which vLLM admin routes."""

    enabled: bool = setting("ENABLE_PASSTHROUGH_ROUTES", parsers.boolean, True, yaml="passthrough_enabled")
    types: tuple = setting("ENABLED_PASSTHROUGH_PROVIDERS", parsers.provider_types,
                           ("vllm", "openai", "openrouter", "ollama"), yaml="passthrough_types")
    # vLLM admin routes let through /p/ anyway
    admin_allowed: tuple = setting("PASSTHROUGH_ALLOWED_ADMIN_ROUTES", parsers.names, (),
                                   yaml="passthrough_admin_allowed")


@dataclass(frozen=True)
class ServerConfig:
    """Where and in how many processes the gateway listens."""

    # PORT (or server.port) gives ("tcp:PORT",); --listen replaces it.
    listen: tuple = setting("PORT", parsers.listen_port, ("tcp:8080",), yaml="port")
    # processes sharing the listening port(s), at most parsers.MAX_WORKERS (--workers too)
    workers: int = setting("GOMODEL_WORKERS", parsers.workers, 1)
    # On SIGTERM/SIGINT, how long requests and streams in flight may go on before they are cut.
    shutdown_timeout: float = setting("SHUTDOWN_TIMEOUT", parsers.duration, 30.0)


@dataclass(frozen=True)
class UpstreamsConfig:
    """The providers and how the gateway talks to them."""

    providers: tuple = ()  # ProviderConfigs, from providers: in YAML and <TYPE>[_<SUFFIX>]_* variables
    models_mode: str = setting("CONFIGURED_PROVIDER_MODELS_MODE", parsers.models_mode, "fallback",
                               yaml="configured_provider_models_mode")
    models_refresh_interval: float = setting("MODELS_REFRESH_INTERVAL", parsers.positive_duration, 300.0,
                                             aliases=("CACHE_REFRESH_INTERVAL",))  # GoModel's name too
    timeouts: Timeouts = group(Timeouts)
    # Seconds of upstream silence after which a /v1/messages stream sends its client a ping (Anthropic's, while a
    # long prefill goes on): a proxy or client with a read timeout keeps the stream; 0: none.
    messages_keepalive: float = setting("GOMODEL_MESSAGES_KEEPALIVE_SECONDS", parsers.duration, 10.0)
    pool_max_per_host: int = setting("HTTP_POOL_MAX_PER_HOST", parsers.count, 256)
    pool_idle_timeout: float = setting("HTTP_POOL_IDLE_TIMEOUT", parsers.positive_duration, 4.0)
    passthrough: PassthroughConfig = group(PassthroughConfig)


@dataclass(frozen=True)
class StoreConfig:
    """Files, batches, stored responses, keys and usage: where they live and for how long."""

    # sqlite: one host (GOMODEL_DATA_DIR); postgresql: any number of hosts on POSTGRES_URL
    storage_type: str = setting("STORAGE_TYPE", parsers.storage_type, "sqlite")
    data_dir: str = setting("GOMODEL_DATA_DIR", parsers.directory, "./data")  # the SQLite database and contents
    postgres_url: Optional[str] = setting("POSTGRES_URL", parsers.postgres_url, None, secret=True)
    # connections to PostgreSQL at most per process (and the threads that use them)
    postgres_max_conns: int = setting("POSTGRES_MAX_CONNS", parsers.count, 10)
    # stored responses older than this are swept
    responses_retention: float = setting("RESPONSES_RETENTION", parsers.positive_duration, 30 * 86400.0)
    # Shared rate-limit, concurrency and budget counters and session pins for several processes or hosts.
    redis_url: Optional[str] = setting("REDIS_URL", parsers.redis_url, None, secret=True)
    # What every Redis key and channel of this deployment starts with: deployments sharing one Redis each set their own.
    redis_key_prefix: str = setting("REDIS_KEY_PREFIX", parsers.redis_key_prefix, "gomodel:")
    # REDIS_URL is a node of a Redis Cluster (cluster mode enabled): the keys of this deployment carry one hash tag.
    redis_cluster: bool = setting("REDIS_CLUSTER", parsers.boolean, False)


@dataclass(frozen=True)
class AuthConfig:
    """Who may call the gateway."""

    master_key: Optional[str] = setting("GOMODEL_MASTER_KEY", parsers.secret, None, secret=True)
    admin_endpoints: bool = setting("ADMIN_ENDPOINTS_ENABLED", parsers.boolean, True, yaml="admin_endpoints_enabled")
    # The admin dashboard at /admin/dashboard (a page over the admin API: served only with it).
    admin_ui: bool = setting("ADMIN_UI_ENABLED", parsers.boolean, True, yaml="admin_ui_enabled")
    # vLLM prefix-cache isolation: requests of managed keys carry a cache_salt per tenant.
    cache_salt_mode: str = setting("CACHE_SALT_MODE", parsers.cache_salt_mode, "tenant")
    # The secret cache salts are derived with (shared by every process and host); by default
    # derived from the master key.
    cache_salt_secret: Optional[str] = setting("CACHE_SALT_SECRET", parsers.secret, None, secret=True)


@dataclass(frozen=True)
class LimitsConfig:
    """Sizes and counts the gateway enforces."""

    body_size_limit: int = setting("BODY_SIZE_LIMIT", parsers.size, 10 * 1024 * 1024)
    # The audio routes' (transcriptions, translations): OpenAI takes a 25 MB file; its form's fields come with it.
    audio_body_size_limit: int = setting("AUDIO_BODY_SIZE_LIMIT", parsers.size, 26 * 1024 * 1024)
    files_max_bytes: int = setting("FILES_MAX_BYTES", parsers.file_size, 512 * 1024 * 1024)
    batch_concurrency_per_provider: int = setting("BATCH_CONCURRENCY_PER_PROVIDER", parsers.count, 4)
    batch_max_attempts: int = setting("BATCH_MAX_ATTEMPTS", parsers.count, 4)
    # A host running a batch renews its lease every third of this; another host takes the
    # batch over once it lapsed (the host died, or lost the database).
    batch_lease_timeout: float = setting("BATCH_LEASE_TIMEOUT", parsers.positive_duration, 30.0)
    # How many batches one process runs at once at most; the others wait, unclaimed, for a
    # process (on any host) with room, and fresh ones go to the least busy process first.
    batch_max_claimed: int = setting("BATCH_MAX_CLAIMED", parsers.count, 8)
    # The output_expires_after[seconds] of a batch made without one; 0: its files and results are kept.
    batch_output_expires_after: int = setting("BATCH_OUTPUT_EXPIRES_AFTER", parsers.output_expiry, 30 * 86400)
    # How long a message batch's results are kept once it ended (Anthropic's 29 days); 0: until it is deleted.
    message_batch_results_expire_after: int = setting("MESSAGE_BATCH_RESULTS_EXPIRE_AFTER", parsers.output_expiry,
                                                      29 * 86400)
    # The expires_after[seconds] of a purpose "batch" upload made without one (OpenAI's 30 days); 0: kept.
    batch_input_expires_after: int = setting("BATCH_INPUT_EXPIRES_AFTER", parsers.output_expiry, 30 * 86400)


@dataclass(frozen=True)
class MetricsConfig:
    """What the gateway records about its traffic."""

    access_log: bool = setting("GOMODEL_ACCESS_LOG", parsers.boolean, True)
    # None: twistd's own log (text, to --logfile or stdout) at every level.
    log_format: Optional[str] = setting("LOG_FORMAT", parsers.log_format, None)
    log_level: Optional[str] = setting("LOG_LEVEL", parsers.log_level, None)
    enabled: bool = setting("METRICS_ENABLED", parsers.boolean, True, yaml="metrics_enabled")
    endpoint: str = setting("METRICS_ENDPOINT", parsers.route_path, "/metrics", yaml="metrics_endpoint")
    require_key: bool = setting("METRICS_REQUIRE_KEY", parsers.boolean, True, yaml="metrics_require_key")
    # OpenTelemetry traces and GenAI metrics over OTLP/HTTP (gomodel.accounting.tracing); everything
    # else is the SDK's own OTEL_* environment (endpoint, headers, service name, sampler, intervals).
    otel_enabled: bool = setting("OTEL_ENABLED", parsers.boolean, False)


@dataclass(frozen=True)
class UsageConfig:
    """The usage ledger: one record per request that reached an upstream."""

    enabled: bool = setting("USAGE_ENABLED", parsers.boolean, True, yaml="usage_enabled")
    flush_interval: float = setting("USAGE_FLUSH_INTERVAL", parsers.positive_duration, 5.0,
                                    yaml="usage_flush_interval")
    retention_days: int = setting("USAGE_RETENTION_DAYS", parsers.days, 90, yaml="usage_retention_days")
    # Filled by the loader from the top-level YAML pricing: (per million tokens, by model as routed).
    pricing: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RoutingConfig:
    """How requests are spread over a provider's replicas, and when a replica is out."""

    strategy: str = setting("ROUTING_STRATEGY", parsers.routing_strategy, "load")
    health_interval: float = setting("REPLICA_HEALTH_INTERVAL", parsers.positive_duration, 5.0)
    metrics_interval: float = setting("REPLICA_METRICS_INTERVAL", parsers.duration, 2.0)  # 0: no scrape
    failure_threshold: int = setting("REPLICA_FAILURE_THRESHOLD", parsers.count, 3,
                                     aliases=("CIRCUIT_BREAKER_FAILURE_THRESHOLD",))  # GoModel's name too
    stall_timeout: float = setting("REPLICA_STALL_TIMEOUT", parsers.duration, 60.0)  # 0: never stalled
    max_concurrency: int = setting("REPLICA_MAX_CONCURRENCY", parsers.limit, 0)  # per replica; 0: no limit
    queue_timeout: float = setting("ROUTING_QUEUE_TIMEOUT", parsers.duration, 5.0)
    max_attempts: int = setting("ROUTING_MAX_ATTEMPTS", parsers.count, 3)
    # A session or prefix stays on its replica while that replica's load is at most
    # this many times the least loaded one's (plus affinity_slack requests).
    affinity_max_ratio: float = setting("ROUTING_AFFINITY_MAX_RATIO", parsers.ratio, 1.5)
    affinity_slack: int = setting("ROUTING_AFFINITY_SLACK", parsers.limit, 2)
    # Filled by the loader from VIRTUAL_MODELS / virtual_models: and FAILOVER_RULES_JSON / failover_rules:.
    virtual_models: tuple = ()  # VirtualModels
    failover_rules: dict = field(default_factory=dict)  # model -> (candidate selector, ...)


@dataclass(frozen=True)
class Config:
    """The whole configuration; each section is read from the YAML section of its name."""

    server: ServerConfig = section(ServerConfig)
    upstreams: UpstreamsConfig = section(UpstreamsConfig)
    store: StoreConfig = section(StoreConfig)
    auth: AuthConfig = section(AuthConfig)
    limits: LimitsConfig = section(LimitsConfig)
    metrics: MetricsConfig = section(MetricsConfig)
    routing: RoutingConfig = section(RoutingConfig)
    usage: UsageConfig = section(UsageConfig)
    # Rate limits and budgets by user path, provider and model (SET_RATE_LIMIT_*, SET_BUDGET_*,
    # YAML rate_limits: and budgets:), read by the loader: a gomodel.limits.specs.LimitsConfig.
    quotas: object = None
    warnings: tuple = ()  # things worth telling the operator at start


SECTIONS = {f.name: f.metadata["section"] for f in fields(Config) if "section" in f.metadata}

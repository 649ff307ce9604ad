"""Configuration from the environment and YAML."""

import pytest

from gomodel.config import ConfigError, load_config


def names(config):
    return [(p.name, p.type) for p in config.upstreams.providers]


def test_vllm_keyless_and_suffixed_instances():
    config = load_config({
        "VLLM_BASE_URL": "http://gpu-a:8000/v1",
        "VLLM_TEST_BASE_URL": "http://gpu-b:8000",
        "VLLM_TEST_API_KEY": "token-abc",
        "VLLM_GPU_A_BASE_URL": "http://gpu-c:8000/v1/",
        "VLLM_GPU_A_MODELS": " Qwen/Qwen3-8B, ,meta-llama/X ",
    })
    by_name = {p.name: p for p in config.upstreams.providers}
    assert sorted(by_name) == ["vllm", "vllm-gpu-a", "vllm-test"]
    assert by_name["vllm"].api_key is None
    assert by_name["vllm"].base_url == "http://gpu-a:8000/v1"
    assert by_name["vllm"].root_url == "http://gpu-a:8000"
    assert by_name["vllm-test"].base_url == "http://gpu-b:8000/v1"  # /v1 added
    assert by_name["vllm-test"].root_url == "http://gpu-b:8000"
    assert by_name["vllm-test"].api_key == "token-abc"
    assert "token-abc" not in repr(by_name["vllm-test"])
    assert by_name["vllm-gpu-a"].base_url == "http://gpu-c:8000/v1"
    assert by_name["vllm-gpu-a"].models == ("Qwen/Qwen3-8B", "meta-llama/X")


def test_openai_compatible_types_need_keys_except_keyless_ones():
    config = load_config({
        "OPENAI_API_KEY": "sk-1", "GROQ_BASE_URL": "https://example.invalid/v1",
        "OLLAMA_BASE_URL": "http://localhost:11434", "DEEPSEEK_API_KEY": "d", "XAI_FAST_API_KEY": "x",
        "OPENROUTER_API_KEY": "o",
    })
    by_name = {p.name: p for p in config.upstreams.providers}
    assert set(by_name) == {"openai", "ollama", "deepseek", "xai-fast", "openrouter"}
    assert by_name["openai"].base_url == "https://api.openai.com/v1"
    assert by_name["ollama"].base_url == "http://localhost:11434/v1"
    assert by_name["xai-fast"].base_url == "https://api.x.ai/v1"
    assert by_name["openrouter"].base_url == "https://openrouter.ai/api/v1"
    assert any("groq" in w for w in config.warnings)


def test_no_provider_is_fine():
    config = load_config({})
    assert config.upstreams.providers == ()
    assert config.server.listen == ("tcp:8080",)
    assert config.auth.master_key is None


def test_port_and_listen():
    assert load_config({"PORT": "9000"}).server.listen == ("tcp:9000",)
    assert load_config({"PORT": "9000"}, listen=["tcp:0"]).server.listen == ("tcp:0",)


def test_env_wins_over_yaml(tmp_path):
    path = tmp_path / "gomodel.yaml"
    path.write_text("""
server:
  master_key: from-yaml
  body_size_limit: 1M
  stream_idle_timeout: 2m
  configured_provider_models_mode: allowlist
providers:
  gpu-a:
    type: vllm
    base_url: http://gpu-a:8000/v1
    models: [meta-llama/X, {id: Qwen/Y}]
  remote:
    type: openai
    api_key: ${REMOTE_KEY}
    base_url: ${REMOTE_URL:-https://api.example.invalid/v1}
""")
    config = load_config({"GOMODEL_MASTER_KEY": "from-env", "VLLM_BASE_URL": "http://override:8000/v1",
                          "REMOTE_KEY": "rk", "HTTP_STREAM_IDLE_TIMEOUT": "45s"}, str(path))
    assert config.auth.master_key == "from-env"
    assert config.limits.body_size_limit == 1024 * 1024
    assert config.upstreams.timeouts.stream_idle == 45
    assert config.upstreams.models_mode == "allowlist"
    by_name = {p.name: p for p in config.upstreams.providers}
    # The unsuffixed VLLM_* variables overlay the YAML file's only vllm provider.
    assert by_name["gpu-a"].base_url == "http://override:8000/v1"
    assert by_name["gpu-a"].models == ("meta-llama/X", "Qwen/Y")
    assert by_name["remote"].api_key == "rk"
    assert by_name["remote"].base_url == "https://api.example.invalid/v1"
    assert "vllm" not in by_name


def test_config_file_from_gomodel_config(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("server: {port: 9999}\n")
    assert load_config({"GOMODEL_CONFIG": str(path)}).server.listen == ("tcp:9999",)


@pytest.mark.parametrize("env, named", [
    ({"BODY_SIZE_LIMIT": "lots"}, "BODY_SIZE_LIMIT"),
    ({"BODY_SIZE_LIMIT": "10"}, "BODY_SIZE_LIMIT"),
    ({"HTTP_CONNECT_TIMEOUT": "0"}, "HTTP_CONNECT_TIMEOUT"),
    ({"HTTP_RESPONSE_HEADER_TIMEOUT": "soon"}, "HTTP_RESPONSE_HEADER_TIMEOUT"),
    ({"HTTP_STREAM_IDLE_TIMEOUT": "-1"}, "HTTP_STREAM_IDLE_TIMEOUT"),
    ({"CONFIGURED_PROVIDER_MODELS_MODE": "sometimes"}, "CONFIGURED_PROVIDER_MODELS_MODE"),
    ({"PORT": "http"}, "PORT"),
    ({"VLLM_BASE_URL": "localhost:8000"}, "VLLM_BASE_URL"),
    ({"VLLM_BASE_URL": "ftp://h/v1"}, "VLLM_BASE_URL"),
    ({"VLLM_TEST__X_BASE_URL": "http://h"}, "VLLM_TEST__X_BASE_URL"),
    ({"VLLM_API_KEY": "${UNSET}"}, "VLLM_API_KEY"),
    ({"VLLM_BASE_URL": "http://h", "VLLM_API_KEY": "k\r\nX-Injected: 1"}, "VLLM_API_KEY"),
    # the health checks' paths, which need no key: the metrics there were served to anyone, in place of them
    ({"METRICS_ENDPOINT": "/health"}, "METRICS_ENDPOINT"),
    ({"METRICS_ENDPOINT": "/health/"}, "METRICS_ENDPOINT"),
    ({"METRICS_ENDPOINT": "/health/ready"}, "METRICS_ENDPOINT"),
    ({"METRICS_ENDPOINT": "/métriques"}, "METRICS_ENDPOINT"),  # (a UnicodeEncodeError traceback at start)
    ({"METRICS_ENDPOINT": "/a\tb"}, "METRICS_ENDPOINT"),
    # an empty query or fragment: kept in the base URL, every request went to /v1 with its route as the query
    ({"VLLM_BASE_URL": "http://h:8000/v1?"}, "VLLM_BASE_URL"),
    ({"VLLM_BASE_URL": "http://h:8000/v1/chat/completions"}, "VLLM_BASE_URL"),  # (an endpoint, not a server)
    ({"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "https://api.example.com/v1/responses/"}, "OPENAI_BASE_URL"),
    ({"VLLM_BASE_URL": "http://h:8000/v1#"}, "VLLM_BASE_URL"),
    # two spellings of one instance: the second silently replaced the first's URL (or key)
    ({"VLLM_GPU_A_BASE_URL": "http://a:1", "VLLM_GPU_a_BASE_URL": "http://b:1"}, "VLLM_GPU_a_*"),
    ({"VLLM_GPU_A_BASE_URL": "http://a:1", "VLLM_gpu_a_API_KEY": "k"}, "'vllm-gpu-a'"),
])
def test_bad_values_name_the_variable(env, named):
    with pytest.raises(ConfigError) as raised:
        load_config(env)
    assert named in str(raised.value)


@pytest.mark.parametrize("path, route", [
    ("/rerank", "/rerank"), ("/score/", "/score"), ("/classify", "/classify"), ("/pooling", "/pooling"),
    ("/v2/rerank", "/v2/rerank"), ("/v2/embed", "/v2/embed"), ("/v1/models", "/v1/"), ("/health", "/health"),
    ("/health/ready", "/health/"), ("/admin/api/v1/usage", "/admin/"), ("/p/vllm/metrics", "/p/"),
])
def test_a_metrics_endpoint_on_another_routes_path_is_refused_naming_both(path, route):
    """The scrape took a route's GETs (vLLM's /rerank at the root: its GET was the metrics, silently)."""
    with pytest.raises(ConfigError) as raised:
        load_config({"METRICS_ENDPOINT": path})
    assert "METRICS_ENDPOINT" in str(raised.value) and f"{route}" in str(raised.value), str(raised.value)
    assert "route" in str(raised.value)


def test_the_metrics_endpoint_is_checked_against_every_root_route():
    """The config's list of the gateway's paths outside its reserved prefixes is the routes' own."""
    from gomodel.api.inference import InferenceRoutes
    from gomodel.api.plain import PlainRoutes

    paths = set(InferenceRoutes(None, None, None, None, None).routes()) | set(PlainRoutes(None)._exact)
    root = {p.decode() for p in paths if not p.decode().startswith(parsers.RESERVED_PREFIXES)}
    assert root == set(parsers.ROOT_ROUTES)


@pytest.mark.parametrize("url, says", [
    ("http://fd00::5:8000/v1", "an IPv6 address goes in brackets"),
    ("http://h:99999/v1", "the port must be a number from 1 to 65535"),
    ("http://h:80a/v1", "the port must be a number from 1 to 65535"),
    ("http://[fd00::5:8000/v1", "not a valid URL"),
])
def test_a_base_url_whose_port_cannot_be_read_says_why(url, says):
    """(Before, each was only 'not a valid URL'.)"""
    with pytest.raises(ConfigError) as raised:
        load_config({"VLLM_BASE_URL": url})
    assert str(raised.value).startswith("VLLM_BASE_URL: ") and says in str(raised.value)


@pytest.mark.parametrize("env, yaml_key", [
    ({"OPENAI_API_KEY": " "}, None),  # (registered the provider, every request sent "Bearer  ": a 401 each)
    ({"VLLM_BASE_URL": "http://h", "VLLM_API_KEY": "token "}, None),  # (a key pasted with its trailing space)
    ({}, "' token'"),
    ({}, "' '"),
])
def test_a_provider_key_with_whitespace_around_it_is_refused_as_the_master_key_is(tmp_path, env, yaml_key):
    """An upstream's key is sent as C{Authorization: Bearer <key>}: whitespace around it is never the key."""
    if yaml_key is not None:
        path = tmp_path / "c.yaml"
        path.write_text(f"providers:\n  gpu: {{type: vllm, base_url: 'http://h', api_key: {yaml_key}}}\n")
        env = {"GOMODEL_CONFIG": str(path)}
    with pytest.raises(ConfigError) as raised:
        load_config(env)
    where = f"{tmp_path / 'c.yaml'}: providers.gpu.api_key" if yaml_key else next(k for k in env if "API_KEY" in k)
    assert str(raised.value) == f"{where}: must not be blank nor start or end with whitespace"


@pytest.mark.parametrize("env, message", [
    ({"RATE_LIMITS_ENABLED": "maybe"}, "RATE_LIMITS_ENABLED: invalid value 'maybe': must be true or false"),
    ({"BUDGETS_ENABLED": "x"}, "BUDGETS_ENABLED: invalid value 'x': must be true or false"),
    ({"SET_BUDGET_TEAM": "abc"}, "SET_BUDGET_TEAM: budget limit 'abc' must use period=amount"),
    ({"SET_PROVIDER_RATE_LIMIT_VLLM": "rpm=0"},
     "SET_PROVIDER_RATE_LIMIT_VLLM: rate limit rpm must be from 1 to 9007199254740991, not 0"),
])
def test_a_bad_limit_variable_is_named_first_as_every_other_variable_is(env, message):
    """(Before: C{invalid value for SET_BUDGET_TEAM: ...} and C{RATE_LIMITS_ENABLED must be true or false, not
    'maybe'}, where every other bad value reads C{NAME: ...}.)"""
    with pytest.raises(ConfigError) as raised:
        load_config(env)
    assert str(raised.value) == message


def test_a_bad_limit_variable_beside_a_yaml_file_is_not_blamed_on_the_file(tmp_path):
    """(Its message started with the file's path, which had no such setting.)"""
    path = tmp_path / "c.yaml"
    path.write_text("rate_limits: {user_paths: [{path: /team, limits: [{period: minute, max_requests: 5}]}]}\n")
    with pytest.raises(ConfigError) as raised:
        load_config({"GOMODEL_CONFIG": str(path), "SET_BUDGET_TEAM": "abc"})
    assert str(raised.value) == "SET_BUDGET_TEAM: budget limit 'abc' must use period=amount"


@pytest.mark.parametrize("value", ["{reset_prefix_cache: true}", "true", "[[reset_prefix_cache]]"])
def test_a_list_of_names_given_as_anything_but_text_or_a_list_of_texts_is_refused(tmp_path, value):
    """(A mapping was read as its Python text, one name "{'reset_prefix_cache': True}": nothing let through,
    and nothing said so.)"""
    path = tmp_path / "c.yaml"
    path.write_text(f"upstreams: {{passthrough_admin_allowed: {value}}}\n")
    with pytest.raises(ConfigError) as raised:
        load_config({"GOMODEL_CONFIG": str(path)})
    assert str(raised.value).startswith(f"{path}: upstreams.passthrough_admin_allowed: invalid value ")
    assert str(raised.value).endswith(": must be names separated by commas, or a list of names")


@pytest.mark.parametrize("document", ["rate_limits: &r {user_paths: [*r]}", "storage: &s {type: *s}",
                                      "logging: &l {x: [*l]}"])
def test_a_yaml_alias_inside_what_it_names_is_one_line_not_a_traceback(tmp_path, document):
    """(A loop of aliases reached a reader that walks the document: a RecursionError's traceback at start.)
    An alias used twice, not inside itself, is still read."""
    path = tmp_path / "c.yaml"
    path.write_text(document + "\n")
    with pytest.raises(ConfigError) as raised:
        load_config({"GOMODEL_CONFIG": str(path)})
    assert str(raised.value) == f"{path}: an alias (*name) is used inside the mapping or list it names"
    path.write_text("rate_limits: {user_paths: [{path: /a, limits: [&k {period: minute, max_requests: 5}]}, "
                    "{path: /b, limits: [*k]}]}\n")
    assert sorted(load_config({"GOMODEL_CONFIG": str(path)}).quotas.user_paths) == ["/a", "/b"]


def test_secrets_never_appear_in_errors():
    with pytest.raises(ConfigError) as raised:
        load_config({"VLLM_BASE_URL": "http://h", "HTTP_POOL_MAX_PER_HOST": "0", "GOMODEL_MASTER_KEY": "s3cret"})
    assert "s3cret" not in str(raised.value)


def yaml_error(tmp_path, text) -> str:
    """The ConfigError's message for a YAML file (C{g.yaml} in C{tmp_path}) holding C{text}."""
    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config({}, str(path))
    return str(raised.value)


def test_bad_yaml(tmp_path):
    for text, expected in [("providers: [1]", "providers"), ("server: {nope: 1}", "nope"),
                           ("providers: {a: {type: nope}}", "providers.a.type"), (":\n  - [", "YAML"),
                           ("providers: {a: {type: vllm, base_url: 'http://h', extra: 1}}", "extra")]:
        assert expected in yaml_error(tmp_path, text)
    with pytest.raises(ConfigError):
        load_config({}, str(tmp_path / "missing.yaml"))


def test_durations_and_sizes():
    config = load_config({"HTTP_CONNECT_TIMEOUT": "500ms", "HTTP_RESPONSE_HEADER_TIMEOUT": "1h30m",
                          "BODY_SIZE_LIMIT": "512KB", "MODELS_REFRESH_INTERVAL": "90"})
    assert config.upstreams.timeouts.connect == 0.5
    assert config.upstreams.timeouts.response_header == 5400
    assert config.limits.body_size_limit == 512 * 1024
    assert config.upstreams.models_refresh_interval == 90
    assert load_config({"CACHE_REFRESH_INTERVAL": "10m"}).upstreams.models_refresh_interval == 600


@pytest.mark.parametrize("var, value", [
    ("HTTP_CONNECT_TIMEOUT", "٣٠s"), ("HTTP_CONNECT_TIMEOUT", "３０"), ("BODY_SIZE_LIMIT", "５１２KB"),
    ("PORT", "８０８０"), ("PORT", "80_80"), ("HTTP_POOL_MAX_PER_HOST", "1_000"), ("HTTP_POOL_MAX_PER_HOST", "٣"),
])
def test_numbers_take_ascii_digits_only(var, value):
    with pytest.raises(ConfigError) as raised:
        load_config({var: value})
    assert var in str(raised.value)


def test_data_dir_default_env_and_yaml(tmp_path):
    assert load_config({}).store.data_dir == "./data"
    assert load_config({"GOMODEL_DATA_DIR": "/var/lib/gomodel"}).store.data_dir == "/var/lib/gomodel"
    path = tmp_path / "g.yaml"
    path.write_text("server: {data_dir: /srv/gomodel}\n")
    assert load_config({}, str(path)).store.data_dir == "/srv/gomodel"
    assert load_config({"GOMODEL_DATA_DIR": "/env/wins"}, str(path)).store.data_dir == "/env/wins"
    with pytest.raises(ConfigError) as raised:
        load_config({"GOMODEL_DATA_DIR": "   "})
    assert "GOMODEL_DATA_DIR" in str(raised.value)


def test_files_max_bytes_allows_up_to_8gb():
    assert load_config({}).limits.files_max_bytes == 512 * 1024 * 1024
    assert load_config({"FILES_MAX_BYTES": "2G"}).limits.files_max_bytes == 2 * 1024**3
    assert load_config({"FILES_MAX_BYTES": "8GB"}).limits.files_max_bytes == 8 * 1024**3
    for bad in ("9G", "10", "lots"):
        with pytest.raises(ConfigError) as raised:
            load_config({"FILES_MAX_BYTES": bad})
        assert "FILES_MAX_BYTES" in str(raised.value)
    with pytest.raises(ConfigError):  # the request body limit keeps its 1 GB ceiling
        load_config({"BODY_SIZE_LIMIT": "2G"})


def test_batch_output_expires_after_takes_openais_bounds_or_0():
    """OpenAI's C{output_expires_after[seconds]} bounds (an hour to 30 days), or 0: never."""
    assert load_config({}).limits.batch_output_expires_after == 30 * 86400
    for text, seconds in (("0", 0), ("1h", 3600), ("30d", 30 * 86400), ("7200", 7200)):
        assert load_config({"BATCH_OUTPUT_EXPIRES_AFTER": text}).limits.batch_output_expires_after == seconds
    for bad in ("59m", "31d", "-1h", "never"):
        with pytest.raises(ConfigError) as raised:
            load_config({"BATCH_OUTPUT_EXPIRES_AFTER": bad})
        assert "BATCH_OUTPUT_EXPIRES_AFTER" in str(raised.value)


def test_batch_input_expires_after_takes_openais_bounds_or_0():
    """A purpose C{batch} upload's default C{expires_after}: OpenAI's 30 days, its bounds, or 0: kept."""
    assert load_config({}).limits.batch_input_expires_after == 30 * 86400
    for text, seconds in (("0", 0), ("1h", 3600), ("30d", 30 * 86400)):
        assert load_config({"BATCH_INPUT_EXPIRES_AFTER": text}).limits.batch_input_expires_after == seconds
    for bad in ("59m", "31d", "never"):
        with pytest.raises(ConfigError) as raised:
            load_config({"BATCH_INPUT_EXPIRES_AFTER": bad})
        assert "BATCH_INPUT_EXPIRES_AFTER" in str(raised.value)


def test_message_batch_results_expire_after_29_days_or_as_set():
    """Anthropic keeps a message batch's results 29 days; an hour to 30 days, or 0: until it is deleted."""
    assert load_config({}).limits.message_batch_results_expire_after == 29 * 86400
    for text, seconds in (("0", 0), ("1h", 3600), ("30d", 30 * 86400)):
        config = load_config({"MESSAGE_BATCH_RESULTS_EXPIRE_AFTER": text})
        assert config.limits.message_batch_results_expire_after == seconds
    for bad in ("59m", "31d", "never"):
        with pytest.raises(ConfigError) as raised:
            load_config({"MESSAGE_BATCH_RESULTS_EXPIRE_AFTER": bad})
        assert "MESSAGE_BATCH_RESULTS_EXPIRE_AFTER" in str(raised.value)


def test_the_messages_keepalive_is_10_seconds_or_as_set_and_0_is_none(tmp_path):
    """C{GOMODEL_MESSAGES_KEEPALIVE_SECONDS} (YAML C{upstreams: messages_keepalive}): the seconds of upstream
    silence before a Messages stream pings its client, 10 unless set; 0 turns the pings off; a bad one is named."""
    assert load_config({}).upstreams.messages_keepalive == 10.0
    assert load_config({"GOMODEL_MESSAGES_KEEPALIVE_SECONDS": "2.5"}).upstreams.messages_keepalive == 2.5
    assert load_config({"GOMODEL_MESSAGES_KEEPALIVE_SECONDS": "0"}).upstreams.messages_keepalive == 0.0
    yaml_file = tmp_path / "gateway.yaml"
    yaml_file.write_text("upstreams:\n  messages_keepalive: 30s\n")
    assert load_config({}, str(yaml_file)).upstreams.messages_keepalive == 30.0
    assert load_config({"GOMODEL_MESSAGES_KEEPALIVE_SECONDS": "5"}, str(yaml_file)).upstreams.messages_keepalive == 5
    with pytest.raises(ConfigError, match="GOMODEL_MESSAGES_KEEPALIVE_SECONDS"):
        load_config({"GOMODEL_MESSAGES_KEEPALIVE_SECONDS": "-1"})


def test_batch_concurrency_per_provider():
    assert load_config({}).limits.batch_concurrency_per_provider == 4
    assert load_config({"BATCH_CONCURRENCY_PER_PROVIDER": "16"}).limits.batch_concurrency_per_provider == 16
    with pytest.raises(ConfigError) as raised:
        load_config({"BATCH_CONCURRENCY_PER_PROVIDER": "0"})
    assert "BATCH_CONCURRENCY_PER_PROVIDER" in str(raised.value)


def test_batch_max_attempts():
    assert load_config({}).limits.batch_max_attempts == 4
    assert load_config({"BATCH_MAX_ATTEMPTS": "1"}).limits.batch_max_attempts == 1
    with pytest.raises(ConfigError) as raised:
        load_config({"BATCH_MAX_ATTEMPTS": "never"})
    assert "BATCH_MAX_ATTEMPTS" in str(raised.value)


# Sections: each built from its own table of settings.

from gomodel.config import SECTIONS, Config, parsers, settings_of  # noqa: E402


def attribute(config, path):
    for name in path.split("."):
        config = getattr(config, name)
    return config


# A valid text per parser, with the value it gives (each differs from every default).
SAMPLES = {
    parsers.duration: ("7s", 7.0),
    parsers.positive_duration: ("7s", 7.0),
    parsers.size: ("2M", 2 * 1024**2),
    parsers.file_size: ("2G", 2 * 1024**3),
    parsers.directory: ("/srv/x", "/srv/x"),
    parsers.listen_port: ("9001", ("tcp:9001",)),
    parsers.count: ("5", 5),
    parsers.workers: ("5", 5),
    parsers.days: ("5", 5),
    parsers.output_expiry: ("2h", 7200),
    parsers.routing_strategy: ("round_robin", "round_robin"),
    parsers.limit: ("7", 7),
    parsers.ratio: ("2.5", 2.5),
    parsers.route_path: ("/stats", "/stats"),
    parsers.log_format: ("json", "json"),
    parsers.log_level: ("warn", "warn"),
    parsers.models_mode: ("allowlist", "allowlist"),
    parsers.boolean: ("false", False),
    parsers.names: ("a,/b/", ("a", "b")),
    parsers.provider_types: ("groq", ("groq",)),
    parsers.secret: ("s3cret", "s3cret"),
    parsers.cache_salt_mode: ("OFF", "off"),
    parsers.redis_url: ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    parsers.redis_key_prefix: ("staging:", "staging:"),
    parsers.storage_type: ("PostgreSQL", "postgresql"),
    parsers.postgres_url: ("postgresql://gw@db:5432/gomodel", "postgresql://gw@db:5432/gomodel"),
}
TABLE = list(settings_of(Config))


def test_the_table_has_every_setting_once():
    envs = [s.env for _, _, s, _ in TABLE] + [a for _, _, s, _ in TABLE for a in s.aliases]
    assert len(envs) == len(set(envs))
    keys = [key for _, key, _, _ in TABLE]
    assert len(keys) == len(set(keys))  # server: of older files takes any section's key
    assert set(SECTIONS) == {"server", "upstreams", "store", "auth", "limits", "metrics", "routing", "usage"}
    assert {path.split(".")[0] for path, _, _, _ in TABLE} == set(SECTIONS)
    # the environment variable names of today, every one
    assert set(envs) == {
        "PORT", "GOMODEL_WORKERS", "CONFIGURED_PROVIDER_MODELS_MODE", "MODELS_REFRESH_INTERVAL",
        "CACHE_REFRESH_INTERVAL", "CIRCUIT_BREAKER_FAILURE_THRESHOLD", "HTTP_CONNECT_TIMEOUT",
        "HTTP_RESPONSE_HEADER_TIMEOUT",
        "HTTP_STREAM_IDLE_TIMEOUT", "HTTP_CLIENT_STALL_TIMEOUT", "HTTP_STREAM_MAX_DURATION",
        "HTTP_POOL_MAX_PER_HOST", "HTTP_POOL_IDLE_TIMEOUT", "ENABLE_PASSTHROUGH_ROUTES",
        "ENABLED_PASSTHROUGH_PROVIDERS", "PASSTHROUGH_ALLOWED_ADMIN_ROUTES", "GOMODEL_DATA_DIR",
        "RESPONSES_RETENTION", "GOMODEL_MASTER_KEY", "BODY_SIZE_LIMIT", "AUDIO_BODY_SIZE_LIMIT", "FILES_MAX_BYTES",
        "BATCH_CONCURRENCY_PER_PROVIDER", "BATCH_MAX_ATTEMPTS", "GOMODEL_ACCESS_LOG",
        "ROUTING_STRATEGY", "REPLICA_HEALTH_INTERVAL", "REPLICA_METRICS_INTERVAL", "REPLICA_FAILURE_THRESHOLD",
        "REPLICA_STALL_TIMEOUT", "REPLICA_MAX_CONCURRENCY", "ROUTING_QUEUE_TIMEOUT", "ROUTING_MAX_ATTEMPTS",
        "ROUTING_AFFINITY_MAX_RATIO", "ROUTING_AFFINITY_SLACK", "METRICS_ENABLED", "METRICS_ENDPOINT",
        "METRICS_REQUIRE_KEY", "SHUTDOWN_TIMEOUT", "LOG_FORMAT", "LOG_LEVEL",
        "ADMIN_ENDPOINTS_ENABLED", "ADMIN_UI_ENABLED", "USAGE_ENABLED", "USAGE_FLUSH_INTERVAL", "USAGE_RETENTION_DAYS",
        "CACHE_SALT_MODE", "CACHE_SALT_SECRET", "REDIS_URL", "REDIS_KEY_PREFIX", "REDIS_CLUSTER", "OTEL_ENABLED",
        "STORAGE_TYPE", "POSTGRES_URL", "POSTGRES_MAX_CONNS", "BATCH_LEASE_TIMEOUT",
        "BATCH_MAX_CLAIMED", "BATCH_OUTPUT_EXPIRES_AFTER", "BATCH_INPUT_EXPIRES_AFTER",
        "MESSAGE_BATCH_RESULTS_EXPIRE_AFTER", "GOMODEL_MESSAGES_KEEPALIVE_SECONDS",
    }


@pytest.mark.parametrize("path, key, setting, default", TABLE, ids=[row[0] for row in TABLE])
def test_each_row_drives_env_section_yaml_and_server_yaml(tmp_path, path, key, setting, default):
    text, value = SAMPLES[setting.parse]
    if setting.parse is parsers.boolean and default is False:  # a switch that is off by default
        text, value = "true", True
    assert value != default
    section = path.split(".")[0]
    # STORAGE_TYPE=postgresql is refused without its database
    base = {"POSTGRES_URL": "postgresql://gw@db/g"} if setting.env == "STORAGE_TYPE" else {}
    assert attribute(load_config({}), path) == default
    assert attribute(load_config({**base, setting.env: text}), path) == value
    for alias in setting.aliases:
        assert attribute(load_config({**base, alias: text}), path) == value
    for place in {section, "server"}:
        yaml_file = tmp_path / f"{place}.yaml"
        yaml_file.write_text(f"{place}:\n  {key}: {text!r}\n")
        assert attribute(load_config(base, str(yaml_file)), path) == value
    try:
        setting.parse("-1x")
    except ValueError:  # a bad value names the variable
        with pytest.raises(ConfigError) as raised:
            load_config({setting.env: "-1x"})
        assert setting.env in str(raised.value)
    else:
        assert setting.parse in (parsers.names, parsers.directory, parsers.secret, parsers.redis_key_prefix)


def test_postgresql_storage_needs_its_url_and_never_shows_it():
    with pytest.raises(ConfigError) as raised:
        load_config({"STORAGE_TYPE": "postgresql"})
    assert "POSTGRES_URL" in str(raised.value)
    config = load_config({"STORAGE_TYPE": "postgresql", "POSTGRES_URL": "postgresql://gw:s3cret@db:5432/g"})
    assert (config.store.storage_type, config.store.postgres_max_conns) == ("postgresql", 10)
    assert config.limits.batch_lease_timeout == 30.0
    assert "s3cret" not in repr(config)
    with pytest.raises(ConfigError) as raised:
        load_config({"POSTGRES_URL": "mysql://db/g"})
    assert "POSTGRES_URL" in str(raised.value)
    # A URL no server could be reached by fails the start (it was retried for ever), naming no part of it.
    for url, words in (("postgresql://gw:s3cret@db:99999/g", "port"), ("postgresql://gw:s3cret@db:5432x/g", "port"),
                       ("postgresql://gw:s3cret@db:5432,db2:0/g", "port"),
                       ("postgresql://gw:s3cret@db/g?sslmode=requir", "sslmode"),
                       ("postgresql://gw:s3cret@db/g?sslmod=require", "libpq reads"),
                       ("postgresql://gw:s3cret@db/g?connect_timeout=5&s3cret", "libpq reads"),
                       ("postgresql://gw:s3cret@db/g?target_session_attrs=s3cret", "target_session_attrs"),
                       ("postgresql://gw:s3cret@db/g?gssencmode=s3cret", "gssencmode"),
                       ("postgresql://gw:s3cret@db/g?channel_binding=s3cret", "channel_binding"),
                       ("postgresql://gw:s3cret@db/g?load_balance_hosts=s3cret", "load_balance_hosts"),
                       ("postgresql://gw:s3cret@db/g?keepalives_idle=5s3cret", "keepalives_idle"),
                       ("postgresql://gw:s3cret@db/g?connect_timeout=s3cret", "connect_timeout")):
        with pytest.raises(ConfigError) as raised:
            load_config({"STORAGE_TYPE": "postgresql", "POSTGRES_URL": url})
        assert "POSTGRES_URL" in str(raised.value) and words in str(raised.value), (url, str(raised.value))
        assert "s3cret" not in str(raised.value) and "requir" not in str(raised.value).replace("require", "")
    for url in ("postgresql://gw:s3cret@db1:5432,db2:5433/g?sslmode=verify-full&target_session_attrs=read-write",
                "postgres://gw@[::1]/g", "postgresql:///g?host=/run/postgresql",
                "postgresql://gw@db/g?gssencmode=disable&channel_binding=prefer&keepalives_idle=10&connect_timeout="):
        assert load_config({"STORAGE_TYPE": "postgresql", "POSTGRES_URL": url}).store.postgres_url == url


def test_section_yaml_keys(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("""
server: {port: 9001, workers: 2}
upstreams:
  configured_provider_models_mode: allowlist
  connect_timeout: 3s
  passthrough_enabled: false
  passthrough_types: [vllm]
store: {data_dir: /srv/g, responses_retention: 1d}
auth: {master_key: k}
limits: {body_size_limit: 1M, batch_max_attempts: 2}
metrics: {access_log: off}
providers:
  a: {type: vllm, base_url: "http://a:8000"}
""")
    config = load_config({}, str(path))
    assert config.server.listen == ("tcp:9001",) and config.server.workers == 2
    assert config.upstreams.models_mode == "allowlist"
    assert config.upstreams.timeouts.connect == 3
    assert config.upstreams.passthrough.enabled is False and config.upstreams.passthrough.types == ("vllm",)
    assert [p.name for p in config.upstreams.providers] == ["a"]
    assert (config.store.data_dir, config.store.responses_retention) == ("/srv/g", 86400)
    assert config.auth.master_key == "k" and "'k'" not in repr(config)
    assert (config.limits.body_size_limit, config.limits.batch_max_attempts) == (1024**2, 2)
    assert config.metrics.access_log is False
    # the environment still wins over a section key
    assert load_config({"HTTP_CONNECT_TIMEOUT": "4s"}, str(path)).upstreams.timeouts.connect == 4


def test_section_yaml_errors_name_the_key(tmp_path):
    for text, expected in [
        ("store: {master_key: k}", "unknown key(s) under store: master_key"),  # another section's key
        ("upstreams: {timeouts: {connect: 1}}", "unknown key(s) under upstreams: timeouts"),
        ("auth: [1]", "'auth' must be a mapping"),
        ("limits: {body_size_limit: huge}", "limits.body_size_limit"),
        ("server: {data_dir: /a}\nstore: {data_dir: /b}", "data_dir is set under both store: and server:"),
        ("upstreams:\n  providers: {}", "unknown key(s) under upstreams: providers"),  # providers: is top-level
        ("sever: {port: 1}", "unknown top-level key(s): sever"),
    ]:
        assert expected in yaml_error(tmp_path, text)


def test_refresh_interval_prefers_its_own_name_over_the_alias():
    env = {"MODELS_REFRESH_INTERVAL": "1m", "CACHE_REFRESH_INTERVAL": "10m"}
    assert load_config(env).upstreams.models_refresh_interval == 60


def test_listen_replaces_port_but_port_is_still_checked():
    assert load_config({"PORT": "9000"}, listen=["tcp:1", "tcp:2"]).server.listen == ("tcp:1", "tcp:2")
    with pytest.raises(ConfigError, match="PORT"):
        load_config({"PORT": "70000"}, listen=["tcp:1"])


# Placeholders: substituted in the parsed YAML, never into its text.

@pytest.mark.parametrize("value", ["abc #s3cr3t", "s3cr3t: value", "*s3cr3tkey", "a\nmetrics: {enabled: false}",
                                   "'quoted\" s3cr3t", "{s3cr3t}", "- s3cr3t"])
def test_a_placeholder_is_exactly_the_variables_text(tmp_path, value):
    path = tmp_path / "g.yaml"
    path.write_text("server:\n  master_key: ${GATEWAY_KEY}\nauth: {cache_salt_secret: 'salt-${GATEWAY_KEY}'}\n")
    if "\n" in value:  # a line break is no key a client can send: refused, never shown
        with pytest.raises(ConfigError) as raised:
            load_config({"GATEWAY_KEY": value}, str(path))
        assert "master_key" in str(raised.value) and value not in str(raised.value)
        return
    config = load_config({"GATEWAY_KEY": value}, str(path))
    assert config.auth.master_key == value
    assert config.auth.cache_salt_secret == "salt-" + value
    assert config.metrics.enabled is True


def test_placeholders_in_typed_keys_lists_and_defaults(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("""
server: {port: "${PORT}", workers: "${WORKERS:-3}"}
upstreams:
  connect_timeout: ${CONNECT}
  passthrough_enabled: ${PASSTHROUGH}
  passthrough_types: ["${TYPE}", openai]
providers:
  ${NAME}: {type: "${TYPE}", base_url: "http://${HOST}:8000"}
pricing:
  a/m: {input_per_mtok: "${PRICE}"}
rate_limits:
  providers: [{name: a, limits: [{period: minute, max_requests: "${RPM}"}]}]
budgets:
  enabled: ${BUDGETS}
  user_paths: [{path: /team, limits: [{period: daily, amount: "${DAILY}"}]}]
""")
    config = load_config({"PORT": "8081", "CONNECT": "2s", "PASSTHROUGH": "false", "TYPE": "vllm", "NAME": "a",
                          "HOST": "gpu-a", "PRICE": "1.5", "RPM": "60", "BUDGETS": "true", "DAILY": "10"},
                         str(path))
    assert config.server.listen == ("tcp:8081",) and config.server.workers == 3
    assert config.upstreams.timeouts.connect == 2
    assert config.upstreams.passthrough.enabled is False
    assert config.upstreams.passthrough.types == ("vllm", "openai")
    assert [(p.name, p.type, p.base_url) for p in config.upstreams.providers] == [("a", "vllm", "http://gpu-a:8000/v1")]
    assert config.usage.pricing == {"a/m": {"input_per_mtok": 1.5}}
    assert config.quotas.providers["a"].rpm == 60
    assert config.quotas.budgets_enabled is True and config.quotas.budgets["/team"][0].max_cost == 10


def test_an_unset_placeholder_stays_as_written(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("providers: {a: {type: vllm, base_url: 'http://h:1', api_key: '${UNSET_VAR}'}}\n")
    with pytest.raises(ConfigError) as raised:
        load_config({}, str(path))
    assert "providers.a.api_key" in str(raised.value) and "placeholder" in str(raised.value)
    path.write_text("auth: {master_key: 'k-${UNSET_VAR}'}\n")  # a secret is refused so too (see below)
    with pytest.raises(ConfigError, match="placeholder"):
        load_config({}, str(path))


def test_yaml_errors_show_the_place_never_the_text(tmp_path):
    for text in ("server:\n  master_key: s3cr3t: x\n", "server:\n  master_key: *s3cr3t\n",
                 "server: {master_key: \"s3cr3t\n", "server:\n\tmaster_key: s3cr3t\n"):
        error = yaml_error(tmp_path, text)
        assert "not valid YAML" in error and "s3cr3t" not in error
        assert "line 2" in error or "line 1" in error


@pytest.mark.parametrize("text, line", [
    ("providers:\n  a: {type: vllm, base_url: 'http://h:1'}\n  a: {type: vllm, base_url: 'http://h:2'}\n", 3),
    ("server: {port: 1}\nserver: {port: 2}\n", 2),
    ("server: {master_key: s3cr3t, master_key: other}\n", 1),
    ("budgets:\n  user_paths:\n    - {path: /t, limits: [{period: daily, amount: 1, amount: 2}]}\n", 3),
], ids=["provider", "section", "setting", "nested"])
def test_a_key_given_twice_in_a_mapping_is_refused_naming_its_place(tmp_path, text, line):
    error = yaml_error(tmp_path, text)  # (PyYAML kept the last one silently)
    assert "given twice" in error and f"line {line}" in error and "s3cr3t" not in error


def test_a_merged_mapping_may_still_be_overridden(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("providers:\n  a: &a {type: vllm, base_url: 'http://h:1'}\n  b: {<<: *a, base_url: 'http://h:2'}\n")
    assert [p.base_url for p in load_config({}, str(path)).upstreams.providers] == ["http://h:1/v1", "http://h:2/v1"]


# NaN, infinity and huge numbers: refused everywhere, naming the setting.

@pytest.mark.parametrize("text, named", [
    ("upstreams: {stream_idle_timeout: .nan}", "upstreams.stream_idle_timeout"),
    ("upstreams: {connect_timeout: .nan}", "upstreams.connect_timeout"),
    ("upstreams: {connect_timeout: .inf}", "upstreams.connect_timeout"),
    ("server: {shutdown_timeout: .nan}", "server.shutdown_timeout"),
    ("server: {shutdown_timeout: -.inf}", "server.shutdown_timeout"),
    ("store: {responses_retention: 1e300}", "store.responses_retention"),
    ("store: {responses_retention: 100000000000000000000000000000000000000000000}", "store.responses_retention"),
    ("routing: {affinity_max_ratio: .inf}", "routing.affinity_max_ratio"),
    ("routing: {affinity_max_ratio: .nan}", "routing.affinity_max_ratio"),
    ("pricing: {m: {input_per_mtok: .nan}}", "pricing.m.input_per_mtok"),
    ("pricing: {m: {output_per_mtok: .inf}}", "pricing.m.output_per_mtok"),
    ("pricing: {m: {output_per_mtok: 1e300}}", "pricing.m.output_per_mtok"),
    ("server: {workers: 1000000000000000000000}", "server.workers"),
])
def test_nan_infinity_and_huge_numbers_in_yaml_are_refused(tmp_path, text, named):
    assert named in yaml_error(tmp_path, text + "\n")


@pytest.mark.parametrize("var, value", [
    ("ROUTING_AFFINITY_MAX_RATIO", "inf"), ("ROUTING_AFFINITY_MAX_RATIO", "1e308"),
    ("ROUTING_AFFINITY_MAX_RATIO", "nan"), ("HTTP_CONNECT_TIMEOUT", "9" * 400),
    ("RESPONSES_RETENTION", "1000000000000000000000000000000"), ("RESPONSES_RETENTION", "36600d"),
    ("SHUTDOWN_TIMEOUT", "876001h"), ("GOMODEL_WORKERS", "1000000000000000000000"), ("GOMODEL_WORKERS", "257"),
    ("USAGE_RETENTION_DAYS", "36501"), ("HTTP_POOL_MAX_PER_HOST", "1000000000000"),
    ("POSTGRES_MAX_CONNS", "1000000000000"), ("REPLICA_MAX_CONCURRENCY", "1" + "0" * 30),
    ("BATCH_MAX_CLAIMED", "1" + "0" * 30),
])
def test_nan_infinity_and_huge_numbers_in_the_environment_are_refused(var, value):
    with pytest.raises(ConfigError) as raised:
        load_config({var: value})
    assert var in str(raised.value)


def test_the_largest_values_still_pass():
    from gomodel.config import MAX_WORKERS

    config = load_config({"RESPONSES_RETENTION": "36500d", "GOMODEL_WORKERS": str(MAX_WORKERS),
                          "ROUTING_AFFINITY_MAX_RATIO": "1000", "USAGE_RETENTION_DAYS": "36500"})
    assert config.store.responses_retention == 36500 * 86400.0
    assert config.server.workers == MAX_WORKERS == 256
    assert config.routing.affinity_max_ratio == 1000.0
    assert config.usage.retention_days == 36500


# Wrongly typed YAML: a configuration error naming the place, never a traceback.

@pytest.mark.parametrize("text, named", [
    ("server: {1: 2}", "unknown key(s) under server: 1"),
    ("1: 2", "unknown top-level key(s): 1"),
    ("null: 2\nsever: 1", "unknown top-level key(s): None, sever"),
    ("providers: {a: {type: vllm, 1: 2}}", "providers.a: unknown key(s) 1"),
    ("providers: {a: {type: [vllm]}}", "providers.a.type"),
    ("providers: {a: {type: {vllm: 1}}}", "providers.a.type"),
    ("providers: {1: {type: vllm}}", "providers: the provider name 1"),
    ("providers: {a: {type: vllm, api_key: [k]}}", "providers.a.api_key"),
    ("providers: {a: {type: vllm, base_url: {h: 1}}}", "providers.a.base_url"),
    ("providers: {a: {type: vllm, replicas: [{base_url: 'http://h:1', 2: 3}]}}", "providers.a.replicas[0]"),
    ("providers: {a: {type: vllm, replicas: [{base_url: ['http://h:1']}]}}", "providers.a.replicas[0].base_url"),
    ("auth: {master_key: [k]}", "auth.master_key"),
    ("auth: {master_key: 0123}", "auth.master_key"),
    ("pricing: {m: {1: 2}}", "pricing.m"),
    ("pricing: {m: {input_per_mtok: [1]}}", "pricing.m.input_per_mtok"),
    ("virtual_models: [{source: v, target: a/m, 1: 2}]", "virtual_models[0]: unknown key(s) 1"),
    ("virtual_models: [{source: v, target: a/m, strategy: [round_robin]}]", "virtual_models[0].strategy"),
    ("virtual_models: [{source: v, target: a/m, enabled: [x]}]", "virtual_models[0].enabled"),
    ("failover_rules: [a]", "failover_rules"),
    ("store: {data_dir: [/srv/g]}", "store.data_dir"),  # (the directory "['/srv/g']" before)
    ("store: {data_dir: {a: 1}}", "store.data_dir"),
    ("store: {data_dir: true}", "store.data_dir"),
])
def test_wrongly_typed_yaml_is_a_configuration_error(tmp_path, text, named):
    error = yaml_error(tmp_path, text + "\n")
    assert named in error and str(tmp_path / "g.yaml") in error


def test_a_config_file_that_is_not_utf8_is_a_configuration_error(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_bytes("server: {master_key: 's3cr\xe9t'}\n".encode("latin-1"))
    with pytest.raises(ConfigError) as raised:
        load_config({}, str(path))
    assert str(path) in str(raised.value) and "UTF-8" in str(raised.value)
    assert "s3cr" not in str(raised.value)


# Master keys and provider names.

@pytest.mark.parametrize("key", ["   ", "mk ", " mk", "a\nb", "a\tb", "a\x7fb", "\x00"])
def test_a_master_key_no_client_can_send_is_refused(key):
    with pytest.raises(ConfigError) as raised:
        load_config({"GOMODEL_MASTER_KEY": key})
    assert "GOMODEL_MASTER_KEY" in str(raised.value)
    assert repr(key) not in str(raised.value) and (key.strip() or "   ") not in str(raised.value)


def test_a_master_key_left_an_unset_placeholder_is_refused(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("server:\n  master_key: ${GATEWAY_KEY}\n")
    with pytest.raises(ConfigError) as raised:  # else the key would be the text anyone reads in the file
        load_config({}, str(path))
    assert "master_key" in str(raised.value) and "placeholder" in str(raised.value)
    assert load_config({"GATEWAY_KEY": "s3cr3t"}, str(path)).auth.master_key == "s3cr3t"


@pytest.mark.parametrize("name", ["a/b", "", "/a", "a b", "a?b", "-a", "a--b", "ä"])
def test_provider_names_that_cannot_be_routed_are_refused(tmp_path, name):
    path = tmp_path / "g.yaml"
    path.write_text(f"providers: {{{name!r}: {{type: vllm, base_url: 'http://h:1'}}}}\n".replace("\\", "\\\\"))
    with pytest.raises(ConfigError) as raised:
        load_config({}, str(path))
    assert "providers" in str(raised.value) and "name" in str(raised.value)


def test_provider_names_like_the_variables_are_accepted(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("providers: {gpu-a: {type: vllm, base_url: 'http://a:1'}, "
                    "GPU_B2: {type: vllm, base_url: 'http://b:1'}}\n")
    assert names(load_config({}, str(path))) == [("GPU_B2", "vllm"), ("gpu-a", "vllm")]


def test_only_secrets_are_hidden_in_errors():
    with pytest.raises(ConfigError) as raised:
        load_config({"METRICS_REQUIRE_KEY": "perhaps"})
    assert "'perhaps'" in str(raised.value) and "METRICS_REQUIRE_KEY" in str(raised.value)
    with pytest.raises(ConfigError) as raised:
        load_config({"REDIS_URL": "http://user:s3cret@h"})
    assert "REDIS_URL" in str(raised.value) and "s3cret" not in str(raised.value)
    # a URL redis-py cannot read was a ValueError traceback from the start of the gateway, not the setting's error
    for url in ("redis://:s3cret@h:notaport/0", "redis://:s3cret@h:99999/0", "rediss://:s3cret@h/0?socket_timeout=x",
                "unix:///run/redis.sock?db=s3cret"):
        with pytest.raises(ConfigError) as raised:
            load_config({"REDIS_URL": url})
        assert "REDIS_URL" in str(raised.value) and "port" in str(raised.value), str(raised.value)
        assert "s3cret" not in str(raised.value) and "notaport" not in str(raised.value)


@pytest.mark.parametrize("yaml_type, env", [
    ("openai", {"VLLM_BASE_URL": "http://v:8000"}),
    ("vllm", {"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": "http://o:1/v1"}),
    ("openai", {"VLLM_X_BASE_URL": "http://v:8000"}),
])
def test_variables_of_a_type_never_overlay_a_yaml_provider_of_another_type_named_as_they_would(tmp_path, yaml_type,
                                                                                               env):
    name = "vllm-x" if "VLLM_X_BASE_URL" in env else "vllm" if yaml_type == "openai" else "openai"
    path = tmp_path / "g.yaml"
    path.write_text(f"providers: {{{name}: {{type: {yaml_type}, base_url: 'http://y:1/v1', api_key: k}}}}\n")
    config = load_config(env, str(path))  # (the unsuffixed ones made the YAML's provider send to their URL)
    (provider,) = config.upstreams.providers
    assert (provider.name, provider.type, provider.base_url) == (name, yaml_type, "http://y:1/v1")
    assert any("ignored" in w and repr(name) in w for w in config.warnings)


def test_a_provider_rate_limit_that_names_no_provider_is_warned_of(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("providers: {gpu_a: {type: vllm, base_url: 'http://a:1'}}\n"
                    "rate_limits: {providers: [{name: GPU_A, limits: [{period: minute, max_requests: 5}]}]}\n")
    assert not load_config({}, str(path)).warnings  # (names are matched in any case)
    # an environment name cannot say gpu_a (SET_PROVIDER_RATE_LIMIT_GPU_A is gpu-a): it was silently no limit
    config = load_config({"SET_PROVIDER_RATE_LIMIT_GPU_A": "rpm=5"}, str(path))
    (warning,) = config.warnings
    assert "'gpu-a'" in warning and "gpu_a" in warning


def test_a_local_provider_without_a_base_url_is_warned_of():
    """A misspelt base URL variable beside a key (VLLM_GPU_A_BASE_ULR, VLLM_GPU_A_API_KEY) registered the
    instance at vLLM's default address, localhost:8000, its key sent there, without a word."""
    config = load_config({"VLLM_GPU_A_BASE_ULR": "http://gpu-a:8000/v1", "VLLM_GPU_A_API_KEY": "k"})
    (provider,) = config.upstreams.providers
    assert provider.base_url == "http://localhost:8000/v1"
    assert any("'vllm-gpu-a'" in w and "no base URL" in w and "localhost:8000" in w for w in config.warnings)
    assert not load_config({"VLLM_BASE_URL": "http://h:8000/v1"}).warnings


def test_a_redis_key_prefix_is_printable_text_without_a_pattern_character():
    assert load_config({}).store.redis_key_prefix == "gomodel:"
    assert load_config({"REDIS_KEY_PREFIX": "prod-eu:gomodel:"}).store.redis_key_prefix == "prod-eu:gomodel:"
    for bad in ("a b", "gw*", "x" * 101, "a\tb", "stagé"):
        with pytest.raises(ConfigError) as raised:
            load_config({"REDIS_KEY_PREFIX": bad})
        assert "REDIS_KEY_PREFIX" in str(raised.value)


def test_redis_cluster_is_off_by_default_and_refuses_a_url_a_cluster_client_cannot_use():
    assert load_config({"REDIS_URL": "redis://h:6379/0"}).store.redis_cluster is False
    config = load_config({"REDIS_URL": "redis://:s3cret@h:7000", "REDIS_CLUSTER": "true"})
    assert config.store.redis_cluster is True and not config.warnings
    # (before the setting, such a URL was a standalone server's: accepted, and still is without it)
    for url in ("unix:///run/s3cret.sock", "redis://:s3cret@h:7000/2"):
        with pytest.raises(ConfigError) as raised:
            load_config({"REDIS_URL": url, "REDIS_CLUSTER": "yes"})
        assert "REDIS_URL" in str(raised.value) and "REDIS_CLUSTER" in str(raised.value)
        assert "s3cret" not in str(raised.value)
    assert any("REDIS_CLUSTER is set but REDIS_URL is not" in w for w in load_config({"REDIS_CLUSTER": "1"}).warnings)


def test_a_prefix_on_a_redis_cluster_is_tagged_once():
    from gomodel.redis_client import tagged

    assert tagged("gomodel:") == "{gomodel:}"
    assert tagged("prod-eu:gomodel:") == "{prod-eu:gomodel:}"
    assert tagged("{prod}:gomodel:") == "{prod}:gomodel:"  # its own tag
    assert tagged("a{}b:") == "{a{}b:}" and tagged("}x:") == "{_}x:}"


def test_a_redis_url_with_an_option_redis_py_does_not_know_is_refused_at_start():
    # accepted before: the first connection raised a TypeError traceback in the pins' thread, which then died
    for url in ("redis://:s3cret@h:6379/0?sockettimeout=1", "unix:///run/redis.sock?bogus=s3cret"):
        with pytest.raises(ConfigError) as raised:
            load_config({"REDIS_URL": url})
        assert "REDIS_URL" in str(raised.value) and "options redis-py reads" in str(raised.value), str(raised.value)
        assert "s3cret" not in str(raised.value) and "sockettimeout" not in str(raised.value)
    for url in ("redis://h:6379/0?socket_timeout=2&client_name=gw", "rediss://h:6380/0?ssl_cert_reqs=none",
                "unix:///run/redis.sock?db=1"):
        assert load_config({"REDIS_URL": url}).store.redis_url == url


GOMODEL_EXAMPLE = """\
server:
  port: "8080"
  master_key: "your-secret-key"
  body_size_limit: "10M"
  pprof_enabled: false
  enable_passthrough_routes: true
  allow_passthrough_v1_alias: true
  enabled_passthrough_providers: ["openai", "anthropic"]
models:
  enabled_by_default: true
  overrides_enabled: true
cache:
  model:
    refresh_interval: 3600
    local:
      cache_dir: ".cache"
storage:
  type: "sqlite"
  sqlite:
    path: "data/gomodel.db"
  postgresql:
    url: "postgres://user:pass@localhost/gomodel"
    max_conns: 10
logging:
  enabled: false
  log_bodies: true
usage:
  enabled: true
  enforce_returning_usage_data: true
  buffer_size: 1000
  flush_interval: 5
  retention_days: 90
metrics:
  enabled: false
  endpoint: "/metrics"
http:
  timeout: 600
  response_header_timeout: 300
admin:
  endpoints_enabled: true
  ui_enabled: false
workflows:
  refresh_interval: 1m
resilience:
  retry:
    max_retries: 3
  circuit_breaker:
    failure_threshold: 4
guardrails:
  enabled: false
  rules:
    - name: "safety-prompt"
      type: "system_prompt"
fallback:
  default_mode: "manual"
providers:
  vllm:
    type: vllm
    base_url: "http://127.0.0.1:8000/v1"
    api_version: "2024-10-21"
"""


def test_gomodels_config_yaml_starts_the_gateway_its_settings_read_as_ours(tmp_path):
    """A C{config.yaml} in GoModel's layout (its example's sections) loads: each setting gomodel has moves to
    gomodel's key, the others are named in a warning, the environment still wins (before: "unknown top-level
    key(s)" for ten sections, and GoModel's C{metrics: enabled/endpoint} refused)."""
    path = tmp_path / "config.yaml"
    path.write_text(GOMODEL_EXAMPLE)
    config = load_config({}, yaml_path=str(path))
    assert (config.metrics.enabled, config.metrics.endpoint) == (False, "/metrics")
    assert (config.store.storage_type, config.store.data_dir.rstrip("/").rsplit("/", 1)[-1]) == ("sqlite", "data")
    assert (config.usage.enabled, config.usage.flush_interval, config.usage.retention_days) == (True, 5.0, 90)
    assert config.upstreams.passthrough.enabled is True and config.upstreams.passthrough.types == ("openai",)
    assert config.upstreams.timeouts.response_header == 300.0 and config.upstreams.models_refresh_interval == 3600
    assert (config.auth.admin_endpoints, config.auth.admin_ui) == (True, False)
    assert config.routing.failure_threshold == 4 and config.server.listen and config.auth.master_key
    warnings = "\n".join(config.warnings)
    assert "resilience.retry.max_retries" in warnings and "providers.vllm: GoModel's api_version" in warnings
    assert "anthropic" in warnings and "guardrails" not in warnings and "logging" not in warnings
    assert load_config({"METRICS_ENABLED": "true"}, yaml_path=str(path)).metrics.enabled is True


@pytest.mark.parametrize("text, named", [
    ("guardrails:\n  enabled: true\n", "guardrails.enabled"),
    ("models:\n  enabled_by_default: false\n", "models.enabled_by_default"),
    ("metrics:\n  enabled: true\n  metrics_enabled: false\n", "metrics.enabled and metrics.metrics_enabled"),
    ("storage:\n  sqlite:\n    path: 7\n", "storage.sqlite.path"),
])
def test_gomodel_settings_it_cannot_honour_or_given_twice_are_refused(tmp_path, text, named):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config({}, yaml_path=str(path))


def test_gomodels_sqlite_path_variable_places_the_database_as_its_yaml_key_does(tmp_path):
    """GoModel's C{SQLITE_PATH} (its C{storage.sqlite.path}'s variable) is the database's directory here, as that
    key is; a file name other than C{gomodel.db} is warned of; given with C{GOMODEL_DATA_DIR} (or with the key
    under C{store.data_dir}), refused (before, passed over in silence: the database went to ./data)."""
    place = str(tmp_path / "state")
    config = load_config({"SQLITE_PATH": place + "/gomodel.db"})
    assert config.store.data_dir.rstrip("/") == place and not config.warnings
    (warning,) = load_config({"SQLITE_PATH": place + "/usage.db"}).warnings
    assert "SQLITE_PATH" in warning and "gomodel.db" in warning
    assert load_config({"SQLITE_PATH": "gomodel.db"}).store.data_dir.rstrip("/") in (".", "")
    path = tmp_path / "config.yaml"
    path.write_text("storage:\n  sqlite:\n    path: elsewhere/gomodel.db\n")
    assert load_config({"SQLITE_PATH": place + "/gomodel.db"}, str(path)).store.data_dir.rstrip("/") == place
    with pytest.raises(ConfigError, match="SQLITE_PATH and GOMODEL_DATA_DIR"):
        load_config({"SQLITE_PATH": place + "/gomodel.db", "GOMODEL_DATA_DIR": place})
    with pytest.raises(ConfigError, match="SQLITE_PATH"):
        load_config({"SQLITE_PATH": place + "/"})


def test_providers_whose_names_differ_only_in_case_are_refused(tmp_path):
    """Their rate limits (C{SET_PROVIDER_RATE_LIMIT_VLLM}, YAML by name in any case) were one bucket for both."""
    path = tmp_path / "config.yaml"
    path.write_text("providers:\n  vllm: {type: vllm, base_url: 'http://a:8000/v1'}\n"
                    "  VLLM: {type: vllm, base_url: 'http://b:8000/v1'}\n")
    with pytest.raises(ConfigError, match="'VLLM' and 'vllm' differ only in case"):
        load_config({}, yaml_path=str(path))


def test_a_postgres_url_with_the_default_sqlite_storage_is_warned_of():
    """POSTGRES_URL set without STORAGE_TYPE=postgresql leaves state in this host's SQLite file: said at start
    (before, silently: hosts meant to share one database each kept their own)."""
    (warning,) = load_config({"POSTGRES_URL": "postgresql://gw:s3cret@db:5432/g"}).warnings
    assert "STORAGE_TYPE=postgresql" in warning and "s3cret" not in warning and "db:5432" not in warning
    assert not load_config({"STORAGE_TYPE": "postgresql", "POSTGRES_URL": "postgresql://gw@db/g"}).warnings
    assert not load_config({}).warnings


def _readme() -> str:
    """The README's text."""
    import os

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"),
              encoding="utf-8") as f:
        return f.read()


def _readme_settings():
    """The README's settings tables: C{{variable: (YAML key or None, section or None, default text)}}, from
    each table whose header starts C{| variable |} and names a C{default} column."""
    import re

    rows, columns, table_section = {}, None, None
    for line in _readme().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            columns = None
        elif cells[0] == "variable":
            columns = cells if "default" in cells else None
            found = re.search(r"\(`(\w+):`\)", line)
            table_section = found.group(1) if found else None
        elif columns is not None and not set(cells[0]) <= set("- "):
            variable = re.match(r"`([A-Z][A-Z0-9_]*)`", cells[0])
            yaml = next((cells[i] for i, name in enumerate(columns) if name.startswith("YAML")), None)
            key = re.fullmatch(r"`(\w+)`(?: \((\w+)\))?", yaml) if yaml else None
            rows[variable.group(1)] = (key and key.group(1), key and (key.group(2) or table_section),
                                       cells[columns.index("default")])
    return rows


def test_the_readmes_settings_tables_say_what_the_loader_reads():
    """Each row of the README's settings tables is a setting the loader reads under that variable, that
    YAML key in that section, and whose default is the one the row shows; and every setting is named."""
    import re

    from gomodel.config import Config, settings_of

    settings = {s.env: (path.split(".")[0], key, s, default) for path, key, s, default in settings_of(Config)}
    rows = _readme_settings()
    assert len(rows) > 30
    for variable, (yaml_key, section, default_text) in rows.items():
        assert variable in settings, f"README's {variable} is no setting of the loader"
        section_of, key, setting, default = settings[variable]
        if yaml_key is not None:
            assert (yaml_key, section) == (key, section_of), variable
        shown = re.sub(r"\s*\(none\)$", "", default_text).strip("`")
        if shown not in ("unset", "none", "everything", "twistd's text"):
            assert setting.parse(shown) == default, f"README's default of {variable} is {default_text}"
        elif shown == "none":
            assert default in ((), None), variable
        else:
            assert default is None, variable
    readme = _readme()
    unnamed = [env for env in settings if not re.search(f"`{env}[`=]", readme)]
    assert not unnamed, f"settings the README never names: {unnamed}"


def test_cache_salt_mode_off_written_bare_in_yaml_is_off(tmp_path):
    """C{auth: {cache_salt_mode: off}}, as the README writes it: YAML reads a bare C{off} as false, which was
    refused ("invalid value False: must be one of: tenant, off"); it is C{off}. A YAML true stays refused."""
    path = tmp_path / "g.yaml"
    path.write_text("auth: {cache_salt_mode: off}\n")
    assert load_config({}, yaml_path=str(path)).auth.cache_salt_mode == "off"
    path.write_text("auth: {cache_salt_mode: on}\n")
    with pytest.raises(ConfigError, match="cache_salt_mode"):
        load_config({}, yaml_path=str(path))


def test_gomodels_manual_failover_rules_file_is_read_from_its_variable_and_its_yaml_key(tmp_path):
    """GoModel's failover rules are a JSON file, C{{"source": ["candidate", ...]}} (the shape of
    C{FAILOVER_RULES_JSON}), named by C{FALLBACK_MANUAL_RULES_PATH} or C{fallback.manual_rules_path}; its
    C{FEATURE_FALLBACK_MODE} (C{fallback.default_mode}) C{off} turns them off. Before, a GoModel user's rules were
    not read: no failover, with the YAML key in a warning and the variable not even that."""
    rules = tmp_path / "fallback.json"
    rules.write_text('{"vllm-a/m": ["vllm-b/m", "openai/gpt-4o-mini"]}')
    env = {"VLLM_A_BASE_URL": "http://a:8000/v1", "VLLM_B_BASE_URL": "http://b:8000/v1", "OPENAI_API_KEY": "k"}
    expected = {"vllm-a/m": ("vllm-b/m", "openai/gpt-4o-mini")}
    assert load_config(dict(env, FALLBACK_MANUAL_RULES_PATH=str(rules))).routing.failover_rules == expected
    assert load_config(dict(env, FALLBACK_MANUAL_RULES_PATH=str(rules), FEATURE_FALLBACK_MODE="manual")
                       ).routing.failover_rules == expected
    assert load_config(dict(env, FALLBACK_MANUAL_RULES_PATH=str(rules), FEATURE_FALLBACK_MODE="off")
                       ).routing.failover_rules == {}
    path = tmp_path / "config.yaml"
    path.write_text(f"fallback:\n  default_mode: manual\n  manual_rules_path: {rules}\n")
    config = load_config(env, yaml_path=str(path))
    assert config.routing.failover_rules == expected and "fallback" not in "\n".join(config.warnings)
    path.write_text(f"fallback:\n  default_mode: \"off\"\n  manual_rules_path: {rules}\n")
    assert load_config(env, yaml_path=str(path)).routing.failover_rules == {}


@pytest.mark.parametrize("env, text, named", [
    ({"FALLBACK_MANUAL_RULES_PATH": "{missing}"}, None, "FALLBACK_MANUAL_RULES_PATH: cannot read"),
    ({"FALLBACK_MANUAL_RULES_PATH": "{rules}"}, '{"a": ["b"], "a": ["c"]}', "duplicate key 'a'"),
    ({"FALLBACK_MANUAL_RULES_PATH": "{rules}"}, '{"a": null}', "FALLBACK_MANUAL_RULES_PATH.a must be a list"),
    ({"FALLBACK_MANUAL_RULES_PATH": "{rules}", "FAILOVER_RULES_JSON": '{"a": ["b"]}'}, '{"a": ["b"]}',
     "FAILOVER_RULES_JSON and FALLBACK_MANUAL_RULES_PATH"),
    ({"FALLBACK_MANUAL_RULES_PATH": "{rules}", "FEATURE_FALLBACK_MODE": "sometimes"}, '{"a": ["b"]}',
     "FEATURE_FALLBACK_MODE: invalid value 'sometimes'"),
])
def test_gomodels_manual_failover_rules_file_that_cannot_be_used_stops_the_start_naming_it(tmp_path, env, text,
                                                                                              named):
    rules = tmp_path / "fallback.json"
    if text is not None:
        rules.write_text(text)
    env = {k: v.replace("{rules}", str(rules)).replace("{missing}", str(tmp_path / "nope.json"))
           for k, v in env.items()}
    with pytest.raises(ConfigError, match=named):
        load_config(env)


@pytest.mark.parametrize("env, named", [
    ({"GUARDRAILS_ENABLED": "true"}, "GUARDRAILS_ENABLED"),
    ({"MODELS_ENABLED_BY_DEFAULT": "false"}, "MODELS_ENABLED_BY_DEFAULT"),
    ({"USERS": '[{"path": "/acme/eng", "allowed_models": ["vllm/*"]}]'}, "USERS"),
])
def test_gomodel_variables_it_cannot_honour_are_refused_as_their_yaml_keys_are(env, named):
    """GoModel's C{.env} turning guardrails on, or models off by default, or limiting user paths' models
    (C{USERS}: its users' allowlists): clients would do more than it allows, as with the same settings in its YAML
    (refused). Before, all three were ignored without a word."""
    with pytest.raises(ConfigError, match=named):
        load_config(env)
    assert load_config({"GUARDRAILS_ENABLED": "false", "MODELS_ENABLED_BY_DEFAULT": "true"}).warnings == ()
    assert load_config({"USERS": " [ ] "}).warnings == ()  # (no policy: nothing is limited)


def test_gomodel_variables_it_has_are_read_and_those_it_has_not_are_named_in_a_warning():
    """GoModel's C{CIRCUIT_BREAKER_FAILURE_THRESHOLD} is C{REPLICA_FAILURE_THRESHOLD} (its YAML key,
    C{resilience.circuit_breaker.failure_threshold}, already was); GoModel's variables that this gateway has not
    are named at start unless they hold GoModel's default, as its YAML keys are. Before, both went unread silently."""
    assert load_config({"CIRCUIT_BREAKER_FAILURE_THRESHOLD": "7"}).routing.failure_threshold == 7
    config = load_config({"RETRY_MAX_RETRIES": "5", "HTTP_TIMEOUT": "60", "BASE_PATH": "/g", "LOGGING_ENABLED": "true",
                          "HTTP_TIMEOUT_UNRELATED": "x", "PPROF_ENABLED": "false", "SWAGGER_ENABLED": "false"})
    warning = "\n".join(config.warnings)
    for name in ("RETRY_MAX_RETRIES", "HTTP_TIMEOUT", "BASE_PATH", "LOGGING_ENABLED"):
        assert name in warning
    assert "PPROF_ENABLED" not in warning and "SWAGGER_ENABLED" not in warning and "UNRELATED" not in warning
    assert load_config({"HTTP_TIMEOUT": "600", "BASE_PATH": "/", "LOGGING_ENABLED": "false"}).warnings == ()


def test_gomodels_session_keeping_settings_are_named_unless_they_hold_its_defaults(tmp_path):
    """GoModel's session keeping (C{SESSION_KEEPING_ENABLED}, C{SESSION_AUTO_DETECT}, C{SESSION_BUILTIN_RULES},
    C{SESSION_HEADER_<n>}; YAML C{session:}): here sessions are always read from the same headers and fields, so
    turning any off, or naming more headers, is named in the start's warning; their defaults change nothing. Before,
    the variables went unread without a word and a C{session:} section stopped the start as an unknown key."""
    quiet = {"SESSION_KEEPING_ENABLED": "true", "SESSION_AUTO_DETECT": "1", "SESSION_BUILTIN_RULES": "true"}
    assert load_config(quiet).warnings == ()
    warning = "\n".join(load_config({"SESSION_KEEPING_ENABLED": "false", "SESSION_HEADER_1": "X-My-Session",
                                     "SESSION_HEADER_1_TRANSFORM": "session-uuid"}).warnings)
    for name in ("SESSION_KEEPING_ENABLED", "SESSION_HEADER_1", "SESSION_HEADER_1_TRANSFORM"):
        assert name in warning
    assert "SESSION_AUTO_DETECT" not in warning
    path = tmp_path / "config.yaml"
    path.write_text("session:\n  enabled: true\n  auto_detect: true\n  builtin_rules: true\n")
    assert load_config({}, yaml_path=str(path)).warnings == ()
    path.write_text("session:\n  auto_detect: false\n  headers:\n    - header: X-My-Session\n")
    warning = "\n".join(load_config({}, yaml_path=str(path)).warnings)
    assert "session.auto_detect" in warning and "session.headers" in warning


def test_gomodels_per_model_fallback_mode_off_leaves_that_models_rule_out(tmp_path):
    """GoModel's C{fallback.overrides: {model: {mode: off}}} turns that model's failover off: its rule in the
    manual rules file is not read (before, the override was only named in a warning and the rule, once the file was
    read, applied)."""
    rules = tmp_path / "fallback.json"
    rules.write_text('{"vllm-a/m": ["vllm-b/m"], "vllm-b/m": ["vllm-a/m"]}')
    path = tmp_path / "config.yaml"
    path.write_text(f"fallback:\n  manual_rules_path: {rules}\n  overrides:\n    vllm-a/m: {{mode: off}}\n"
                    "    vllm-b/m: {mode: manual}\n")
    env = {"VLLM_A_BASE_URL": "http://a:8000/v1", "VLLM_B_BASE_URL": "http://b:8000/v1"}
    config = load_config(env, yaml_path=str(path))
    assert config.routing.failover_rules == {"vllm-b/m": ("vllm-a/m",)}
    assert "fallback" not in "\n".join(config.warnings)


def test_gomodels_per_model_metadata_pricing_is_the_pricing_table_of_that_model(tmp_path):
    """A provider's C{models: [{id, metadata: {pricing}}]} (GoModel's) prices C{<provider>/<id>}; its
    C{currency} and the rest of its C{metadata} change nothing; a model priced both there and under C{pricing:} is
    refused, as is a price that is no amount."""
    path = tmp_path / "config.yaml"
    path.write_text("providers:\n  gpu-a:\n    type: vllm\n    base_url: http://a:8000/v1\n    models:\n"
                    "      - plain/model\n      - id: org/m\n        metadata:\n          context_window: 8192\n"
                    "          pricing: {currency: EUR, input_per_mtok: 0.5, output_per_mtok: 2,"
                    " cached_input_per_mtok: 0.1}\n")
    config = load_config({}, yaml_path=str(path))
    assert config.usage.pricing == {"gpu-a/org/m": {"input_per_mtok": 0.5, "output_per_mtok": 2.0,
                                                    "cached_input_per_mtok": 0.1}}
    assert config.upstreams.providers[0].models == ("plain/model", "org/m")
    path.write_text(path.read_text() + "pricing:\n  gpu-a/org/m: {input_per_mtok: 1}\n")
    with pytest.raises(ConfigError, match="gpu-a/org/m"):
        load_config({}, yaml_path=str(path))
    path.write_text("providers:\n  gpu-a:\n    type: vllm\n    base_url: http://a:8000/v1\n    models:\n"
                    "      - {id: org/m, metadata: {pricing: {input_per_mtok: lots}}}\n")
    with pytest.raises(ConfigError, match="input_per_mtok"):
        load_config({}, yaml_path=str(path))


def test_gomodels_configured_provider_models_mode_and_base_path_keys_are_read(tmp_path):
    """GoModel's YAML C{models.configured_provider_models_mode} is C{CONFIGURED_PROVIDER_MODELS_MODE} (it was named
    in the "not read" warning, so a GoModel allowlist served every discovered model); its C{server.base_path} is
    known: C{/} (its default) changes nothing, another prefix is named in that warning (before, either stopped the
    start: "unknown key(s) under server")."""
    path = tmp_path / "config.yaml"
    path.write_text("models:\n  configured_provider_models_mode: allowlist\nserver:\n  base_path: /\n")
    config = load_config({}, yaml_path=str(path))
    assert config.upstreams.models_mode == "allowlist" and config.warnings == ()
    assert load_config({"CONFIGURED_PROVIDER_MODELS_MODE": "fallback"}, yaml_path=str(path)).upstreams.models_mode \
        == "fallback"
    path.write_text("server:\n  base_path: /g\n")
    assert "server.base_path" in "\n".join(load_config({}, yaml_path=str(path)).warnings)


def test_gomodels_auto_fallback_mode_without_a_rules_file_is_warned_of(tmp_path):
    """GoModel's C{FEATURE_FALLBACK_MODE=auto} adds candidates of its own; here none are: said at start (before,
    nothing was said); C{off} and C{manual} (its default) change nothing without a rules file; with one, once."""
    assert "FEATURE_FALLBACK_MODE" in "\n".join(load_config({"FEATURE_FALLBACK_MODE": "auto"}).warnings)
    assert load_config({"FEATURE_FALLBACK_MODE": "manual"}).warnings == ()
    assert load_config({"FEATURE_FALLBACK_MODE": "off"}).warnings == ()
    rules = tmp_path / "fallback.json"
    rules.write_text("{}")
    warnings = load_config({"FEATURE_FALLBACK_MODE": "auto", "FALLBACK_MANUAL_RULES_PATH": str(rules)}).warnings
    assert "\n".join(warnings).count("FEATURE_FALLBACK_MODE") == 1


def test_gomodels_fallback_variables_win_over_its_yaml_fallback_keys(tmp_path):
    """The environment wins: C{FEATURE_FALLBACK_MODE=off} turns off the rules file the YAML names, and the rules of
    C{FALLBACK_MANUAL_RULES_PATH} (or C{FAILOVER_RULES_JSON}) replace the YAML's, whose file is then not read."""
    rules = tmp_path / "fallback.json"
    rules.write_text('{"a/m": ["b/m"]}')
    path = tmp_path / "config.yaml"
    path.write_text(f"fallback:\n  manual_rules_path: {rules}\n")
    assert load_config({"FEATURE_FALLBACK_MODE": "off"}, yaml_path=str(path)).routing.failover_rules == {}
    path.write_text(f"fallback:\n  default_mode: \"off\"\n  manual_rules_path: {rules}\n")
    assert load_config({"FEATURE_FALLBACK_MODE": "manual"}, yaml_path=str(path)).routing.failover_rules == \
        {"a/m": ("b/m",)}
    path.write_text(f"fallback:\n  manual_rules_path: {tmp_path / 'gone.json'}\n")
    assert load_config({"FAILOVER_RULES_JSON": '{"c/m": ["d/m"]}'}, yaml_path=str(path)).routing.failover_rules == \
        {"c/m": ("d/m",)}
    assert load_config({"FALLBACK_MANUAL_RULES_PATH": str(rules)}, yaml_path=str(path)).routing.failover_rules == \
        {"a/m": ("b/m",)}

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
])
def test_bad_values_name_the_variable(env, named):
    with pytest.raises(ConfigError) as raised:
        load_config(env)
    assert named in str(raised.value)


def test_secrets_never_appear_in_errors():
    with pytest.raises(ConfigError) as raised:
        load_config({"VLLM_BASE_URL": "http://h", "HTTP_POOL_MAX_PER_HOST": "0", "GOMODEL_MASTER_KEY": "s3cret"})
    assert "s3cret" not in str(raised.value)


def test_bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    for text, expected in [("providers: [1]", "providers"), ("server: {nope: 1}", "nope"),
                           ("providers: {a: {type: nope}}", "providers.a.type"), (":\n  - [", "YAML"),
                           ("providers: {a: {type: vllm, base_url: 'http://h', extra: 1}}", "extra")]:
        path.write_text(text)
        with pytest.raises(ConfigError) as raised:
            load_config({}, str(path))
        assert expected in str(raised.value)
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
        "CACHE_REFRESH_INTERVAL", "HTTP_CONNECT_TIMEOUT", "HTTP_RESPONSE_HEADER_TIMEOUT",
        "HTTP_STREAM_IDLE_TIMEOUT", "HTTP_CLIENT_STALL_TIMEOUT", "HTTP_STREAM_MAX_DURATION",
        "HTTP_POOL_MAX_PER_HOST", "HTTP_POOL_IDLE_TIMEOUT", "ENABLE_PASSTHROUGH_ROUTES",
        "ENABLED_PASSTHROUGH_PROVIDERS", "PASSTHROUGH_ALLOWED_ADMIN_ROUTES", "GOMODEL_DATA_DIR",
        "RESPONSES_RETENTION", "GOMODEL_MASTER_KEY", "BODY_SIZE_LIMIT", "FILES_MAX_BYTES",
        "BATCH_CONCURRENCY_PER_PROVIDER", "BATCH_MAX_ATTEMPTS", "GOMODEL_ACCESS_LOG",
        "ROUTING_STRATEGY", "REPLICA_HEALTH_INTERVAL", "REPLICA_METRICS_INTERVAL", "REPLICA_FAILURE_THRESHOLD",
        "REPLICA_STALL_TIMEOUT", "REPLICA_MAX_CONCURRENCY", "ROUTING_QUEUE_TIMEOUT", "ROUTING_MAX_ATTEMPTS",
        "ROUTING_AFFINITY_MAX_RATIO", "ROUTING_AFFINITY_SLACK", "METRICS_ENABLED", "METRICS_ENDPOINT",
        "METRICS_REQUIRE_KEY", "SHUTDOWN_TIMEOUT", "LOG_FORMAT", "LOG_LEVEL",
        "ADMIN_ENDPOINTS_ENABLED", "ADMIN_UI_ENABLED", "USAGE_ENABLED", "USAGE_FLUSH_INTERVAL", "USAGE_RETENTION_DAYS",
        "CACHE_SALT_MODE", "CACHE_SALT_SECRET", "REDIS_URL", "OTEL_ENABLED",
        "STORAGE_TYPE", "POSTGRES_URL", "POSTGRES_MAX_CONNS", "BATCH_LEASE_TIMEOUT",
        "BATCH_MAX_CLAIMED",
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
        assert setting.parse in (parsers.names, parsers.directory, parsers.secret)


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
    path = tmp_path / "g.yaml"
    for text, expected in [
        ("store: {master_key: k}", "unknown key(s) under store: master_key"),  # another section's key
        ("upstreams: {timeouts: {connect: 1}}", "unknown key(s) under upstreams: timeouts"),
        ("auth: [1]", "'auth' must be a mapping"),
        ("limits: {body_size_limit: huge}", "limits.body_size_limit"),
        ("server: {data_dir: /a}\nstore: {data_dir: /b}", "data_dir is set under both store: and server:"),
        ("upstreams:\n  providers: {}", "unknown key(s) under upstreams: providers"),  # providers: is top-level
        ("sever: {port: 1}", "unknown top-level key(s): sever"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError) as raised:
            load_config({}, str(path))
        assert expected in str(raised.value)


def test_refresh_interval_prefers_its_own_name_over_the_alias():
    env = {"MODELS_REFRESH_INTERVAL": "1m", "CACHE_REFRESH_INTERVAL": "10m"}
    assert load_config(env).upstreams.models_refresh_interval == 60


def test_listen_replaces_port_but_port_is_still_checked():
    assert load_config({"PORT": "9000"}, listen=["tcp:1", "tcp:2"]).server.listen == ("tcp:1", "tcp:2")
    with pytest.raises(ConfigError, match="PORT"):
        load_config({"PORT": "70000"}, listen=["tcp:1"])

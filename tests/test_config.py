"""Configuration from the environment and YAML."""

import pytest

from gomodel.config import ConfigError, load_config


def names(config):
    return [(p.name, p.type) for p in config.providers]


def test_vllm_keyless_and_suffixed_instances():
    config = load_config({
        "VLLM_BASE_URL": "http://gpu-a:8000/v1",
        "VLLM_TEST_BASE_URL": "http://gpu-b:8000",
        "VLLM_TEST_API_KEY": "token-abc",
        "VLLM_GPU_A_BASE_URL": "http://gpu-c:8000/v1/",
        "VLLM_GPU_A_MODELS": " Qwen/Qwen3-8B, ,meta-llama/X ",
    })
    by_name = {p.name: p for p in config.providers}
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
    by_name = {p.name: p for p in config.providers}
    assert set(by_name) == {"openai", "ollama", "deepseek", "xai-fast", "openrouter"}
    assert by_name["openai"].base_url == "https://api.openai.com/v1"
    assert by_name["ollama"].base_url == "http://localhost:11434/v1"
    assert by_name["xai-fast"].base_url == "https://api.x.ai/v1"
    assert by_name["openrouter"].base_url == "https://openrouter.ai/api/v1"
    assert any("groq" in w for w in config.warnings)


def test_no_provider_is_fine():
    config = load_config({})
    assert config.providers == ()
    assert config.listen == ("tcp:8080",)
    assert config.master_key is None


def test_port_and_listen():
    assert load_config({"PORT": "9000"}).listen == ("tcp:9000",)
    assert load_config({"PORT": "9000"}, listen=["tcp:0"]).listen == ("tcp:0",)


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
    assert config.master_key == "from-env"
    assert config.body_size_limit == 1024 * 1024
    assert config.timeouts.stream_idle == 45
    assert config.models_mode == "allowlist"
    by_name = {p.name: p for p in config.providers}
    # The unsuffixed VLLM_* variables overlay the YAML file's only vllm provider.
    assert by_name["gpu-a"].base_url == "http://override:8000/v1"
    assert by_name["gpu-a"].models == ("meta-llama/X", "Qwen/Y")
    assert by_name["remote"].api_key == "rk"
    assert by_name["remote"].base_url == "https://api.example.invalid/v1"
    assert "vllm" not in by_name


def test_config_file_from_gomodel_config(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("server: {port: 9999}\n")
    assert load_config({"GOMODEL_CONFIG": str(path)}).listen == ("tcp:9999",)


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
    assert config.timeouts.connect == 0.5
    assert config.timeouts.response_header == 5400
    assert config.body_size_limit == 512 * 1024
    assert config.models_refresh_interval == 90
    assert load_config({"CACHE_REFRESH_INTERVAL": "10m"}).models_refresh_interval == 600


def test_data_dir_default_env_and_yaml(tmp_path):
    assert load_config({}).data_dir == "./data"
    assert load_config({"GOMODEL_DATA_DIR": "/var/lib/gomodel"}).data_dir == "/var/lib/gomodel"
    path = tmp_path / "g.yaml"
    path.write_text("server: {data_dir: /srv/gomodel}\n")
    assert load_config({}, str(path)).data_dir == "/srv/gomodel"
    assert load_config({"GOMODEL_DATA_DIR": "/env/wins"}, str(path)).data_dir == "/env/wins"
    with pytest.raises(ConfigError) as raised:
        load_config({"GOMODEL_DATA_DIR": "   "})
    assert "GOMODEL_DATA_DIR" in str(raised.value)


def test_files_max_bytes_allows_up_to_8gb():
    assert load_config({}).files_max_bytes == 512 * 1024 * 1024
    assert load_config({"FILES_MAX_BYTES": "2G"}).files_max_bytes == 2 * 1024**3
    assert load_config({"FILES_MAX_BYTES": "8GB"}).files_max_bytes == 8 * 1024**3
    for bad in ("9G", "10", "lots"):
        with pytest.raises(ConfigError) as raised:
            load_config({"FILES_MAX_BYTES": bad})
        assert "FILES_MAX_BYTES" in str(raised.value)
    with pytest.raises(ConfigError):  # the request body limit keeps its 1 GB ceiling
        load_config({"BODY_SIZE_LIMIT": "2G"})


def test_batch_concurrency_per_provider():
    assert load_config({}).batch_concurrency_per_provider == 4
    assert load_config({"BATCH_CONCURRENCY_PER_PROVIDER": "16"}).batch_concurrency_per_provider == 16
    with pytest.raises(ConfigError) as raised:
        load_config({"BATCH_CONCURRENCY_PER_PROVIDER": "0"})
    assert "BATCH_CONCURRENCY_PER_PROVIDER" in str(raised.value)


def test_batch_max_attempts():
    assert load_config({}).batch_max_attempts == 4
    assert load_config({"BATCH_MAX_ATTEMPTS": "1"}).batch_max_attempts == 1
    with pytest.raises(ConfigError) as raised:
        load_config({"BATCH_MAX_ATTEMPTS": "never"})
    assert "BATCH_MAX_ATTEMPTS" in str(raised.value)

"""Replica pools and routing in the configuration: C{<TYPE>_BASE_URL} lists, YAML C{base_url} lists and
C{replicas:}, the C{routing:} section and its variables, and errors that name what is at fault."""

import json

import pytest
import pytest_twisted
import treq

from gomodel.config import ConfigError, ReplicaConfig, RoutingConfig, load_config
from tests.fakes.fleet import FakeFleet
from tests.fakes.vllm import CHAT_MODEL
from tests.support import start_gateway


def provider(config, name="vllm"):
    [found] = [p for p in config.upstreams.providers if p.name == name]
    return found


def write(tmp_path, text):
    path = tmp_path / "gomodel.yaml"
    path.write_text(text)
    return str(path)


def fails(env, yaml_path=None) -> str:
    with pytest.raises(ConfigError) as raised:
        load_config(env, yaml_path)
    return str(raised.value)


# -- replicas from the environment -------------------------------------------------------------

def test_comma_separated_base_urls_are_replicas_sharing_the_providers_key():
    config = load_config({"VLLM_BASE_URL": " http://gpu-a:8000/v1 , http://gpu-b:8000,http://gpu-c:8000/v1/ ",
                          "VLLM_API_KEY": "shared-key"})
    vllm = provider(config)
    assert [r.base_url for r in vllm.replica_configs] == [
        "http://gpu-a:8000/v1", "http://gpu-b:8000/v1", "http://gpu-c:8000/v1"]
    assert [r.root_url for r in vllm.replica_configs] == ["http://gpu-a:8000", "http://gpu-b:8000",
                                                          "http://gpu-c:8000"]
    assert vllm.api_key == "shared-key"
    assert all(r.api_key is None for r in vllm.replica_configs)  # None: the provider's key
    assert all(r.weight == 1.0 and r.max_concurrency is None for r in vllm.replica_configs)
    assert vllm.base_url == "http://gpu-a:8000/v1" and vllm.root_url == "http://gpu-a:8000"
    assert "shared-key" not in repr(vllm)


def test_one_base_url_is_one_replica():
    vllm = provider(load_config({"VLLM_BASE_URL": "http://gpu-a:8000"}))
    assert vllm.replicas == ()
    assert vllm.replica_configs == (ReplicaConfig("http://gpu-a:8000/v1", "http://gpu-a:8000"),)


def test_suffixed_providers_take_url_lists_too():
    config = load_config({"VLLM_BIG_BASE_URL": "http://h1:8000,http://h2:8000", "VLLM_BIG_MODELS": "m"})
    assert [r.base_url for r in provider(config, "vllm-big").replica_configs] == [
        "http://h1:8000/v1", "http://h2:8000/v1"]


@pytest.mark.parametrize("value, why", [
    ("http://a:8000,http://a:8000", "twice"),
    ("http://a:8000, ,", None),  # a blank entry is skipped
    ("http://a:8000,localhost:9000", "http"),
    ("http://a:8000,ftp://b/v1", "http"),
    ("http://a:8000,http://b:8000?x=1", "query"),
    (" , ", "no URL"),
])
def test_bad_url_lists_name_the_variable(value, why):
    if why is None:
        assert len(provider(load_config({"VLLM_BASE_URL": value})).replica_configs) == 1
        return
    message = fails({"VLLM_BASE_URL": value})
    assert "VLLM_BASE_URL" in message and why in message


def test_two_spellings_of_one_url_are_a_duplicate():
    message = fails({"VLLM_BASE_URL": "http://a:8000,http://a:8000/v1/"})
    assert "VLLM_BASE_URL" in message


def test_an_empty_yaml_base_url_list_is_an_error(tmp_path):
    path = write(tmp_path, "providers:\n  pool:\n    type: vllm\n    base_url: []\n")
    assert "providers.pool.base_url" in fails({}, path)


# -- replicas from YAML --------------------------------------------------------------------------

def test_yaml_base_url_list(tmp_path):
    path = write(tmp_path, """
providers:
  pool:
    type: vllm
    base_url: [http://gpu-a:8000/v1, "http://gpu-b:8000"]
    api_key: k
    priority_scheduling: true
""")
    pool = provider(load_config({}, path), "pool")
    assert [r.base_url for r in pool.replica_configs] == ["http://gpu-a:8000/v1", "http://gpu-b:8000/v1"]
    assert pool.api_key == "k" and pool.priority_scheduling is True


def test_yaml_replicas_with_weight_limit_and_key(tmp_path):
    path = write(tmp_path, """
providers:
  pool:
    type: vllm
    api_key: provider-key
    replicas:
      - base_url: http://gpu-a:8000/v1
      - {base_url: "http://gpu-b:8000", weight: 2.5, max_concurrency: 16, api_key: own-key}
      - {base_url: "http://gpu-c:8000", weight: 1, max_concurrency: 0}
""")
    pool = provider(load_config({}, path), "pool")
    a, b, c = pool.replica_configs
    assert (a.base_url, a.api_key, a.weight, a.max_concurrency) == ("http://gpu-a:8000/v1", None, 1.0, None)
    assert (b.base_url, b.root_url, b.api_key, b.weight, b.max_concurrency) == (
        "http://gpu-b:8000/v1", "http://gpu-b:8000", "own-key", 2.5, 16)
    assert (c.weight, c.max_concurrency) == (1.0, 0)  # 0: no limit for this one
    assert pool.api_key == "provider-key" and pool.base_url == a.base_url
    assert "own-key" not in repr(pool)


def test_yaml_replicas_each_with_a_key_need_no_provider_key(tmp_path):
    path = write(tmp_path, """
providers:
  remote:
    type: openai
    replicas:
      - {base_url: "https://a.example.invalid/v1", api_key: ka}
      - {base_url: "https://b.example.invalid/v1", api_key: kb}
""")
    config = load_config({}, path)
    assert [r.api_key for r in provider(config, "remote").replica_configs] == ["ka", "kb"]
    assert not config.warnings


def test_the_variable_replaces_the_yaml_replicas(tmp_path):
    path = write(tmp_path, """
providers:
  pool:
    type: vllm
    replicas: [{base_url: "http://gpu-a:8000", weight: 3}]
""")
    pool = provider(load_config({"VLLM_BASE_URL": "http://x:1,http://y:2"}, path), "pool")
    assert [(r.base_url, r.weight) for r in pool.replica_configs] == [("http://x:1/v1", 1.0), ("http://y:2/v1", 1.0)]


@pytest.mark.parametrize("block, named", [
    ("base_url: http://a:1\n    replicas: [{base_url: http://b:1}]", "providers.pool: give base_url or replicas"),
    ("base_url: [http://a:1, http://a:1]", "providers.pool.base_url"),
    ("replicas: [{base_url: http://a:1}, {base_url: 'http://a:1/v1'}]", "providers.pool.replicas"),
    ("replicas: [{base_url: http://a:1, weight: 0}]", "providers.pool.replicas[0].weight"),
    ("replicas: [{base_url: http://a:1, weight: -2}]", "providers.pool.replicas[0].weight"),
    ("replicas: [{base_url: http://a:1, weight: heavy}]", "providers.pool.replicas[0].weight"),
    ("replicas: [{base_url: http://a:1, weight: true}]", "providers.pool.replicas[0].weight"),
    ("replicas: [{base_url: http://a:1}, {base_url: http://b:1, max_concurrency: -1}]",
     "providers.pool.replicas[1].max_concurrency"),
    ("replicas: [{base_url: http://a:1, max_concurrency: lots}]", "providers.pool.replicas[0].max_concurrency"),
    ("replicas: [{base_url: http://a:1, port: 8000}]", "providers.pool.replicas[0]: unknown key(s) port"),
    ("replicas: [{url: http://a:1}]", "providers.pool.replicas[0]"),
    ("replicas: [http://a:1]", "providers.pool.replicas[0]"),
    ("replicas: []", "providers.pool.replicas"),
    ("replicas: {base_url: http://a:1}", "providers.pool.replicas"),
    ("replicas: [{base_url: 'a:1'}]", "providers.pool.replicas[0].base_url"),
    ("replicas: [{base_url: http://a:1, api_key: '${NOPE}'}]", "providers.pool.replicas[0].api_key"),
    ("priority_scheduling: sometimes", "providers.pool.priority_scheduling"),
])
def test_yaml_replica_errors_name_the_key(tmp_path, block, named):
    path = write(tmp_path, f"providers:\n  pool:\n    type: vllm\n    {block}\n")
    message = fails({}, path)
    assert named in message and path in message


def test_replica_keys_never_appear_in_errors(tmp_path):
    path = write(tmp_path, "providers:\n  pool:\n    type: vllm\n"
                           "    replicas: [{base_url: http://a:1, api_key: \"s3cret\\nX: 1\"}]\n")
    message = fails({}, path)
    assert "replicas[0].api_key" in message and "s3cret" not in message


# -- priority scheduling -----------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [("true", True), ("On", True), ("0", False), ("no", False)])
def test_priority_scheduling_variable(value, expected):
    config = load_config({"VLLM_BASE_URL": "http://a:1", "VLLM_PRIORITY_SCHEDULING": value})
    assert provider(config).priority_scheduling is expected


def test_priority_scheduling_is_off_by_default_and_named_when_bad():
    assert provider(load_config({"VLLM_BASE_URL": "http://a:1"})).priority_scheduling is False
    assert "VLLM_PRIORITY_SCHEDULING" in fails({"VLLM_BASE_URL": "http://a:1", "VLLM_PRIORITY_SCHEDULING": "2"})



def test_priority_scheduling_on_a_provider_that_is_no_vllm_is_warned_of(tmp_path):
    """It stays on (an openai-type provider may be a vLLM), but a start says, once per provider, that only a vLLM
    with --scheduling-policy priority takes the field (before: silently on, and OpenAI's API refuses the body)."""
    config = load_config({"OPENAI_API_KEY": "k", "OPENAI_PRIORITY_SCHEDULING": "true"})
    assert provider(config, "openai").priority_scheduling is True
    (warning,) = config.warnings
    assert "'openai'" in warning and "OPENAI_PRIORITY_SCHEDULING" in warning
    assert "--scheduling-policy priority" in warning
    path = write(tmp_path, "providers:\n  local: {type: ollama, base_url: 'http://o:11434/v1', priority_scheduling: true}"
                           "\n  gpu: {type: vllm, base_url: 'http://g:8000/v1', priority_scheduling: true}\n")
    config = load_config({}, path)
    (warning,) = config.warnings
    assert "'local'" in warning and "providers.local.priority_scheduling" in warning and "'gpu'" not in warning
    assert not load_config({"OPENAI_API_KEY": "k", "OPENAI_PRIORITY_SCHEDULING": "false"}).warnings
    assert not load_config({"VLLM_BASE_URL": "http://a:1", "VLLM_PRIORITY_SCHEDULING": "true"}).warnings

# -- stop sequences ----------------------------------------------------------------------------

def test_a_providers_most_stop_sequences_default_to_its_types_and_may_be_raised(tmp_path):
    """C{<TYPE>[_<SUFFIX>]_MAX_STOP_SEQUENCES} (YAML C{max_stop_sequences}): the most chat stop sequences the provider
    is sent (a vLLM started with a raised VLLM_MAX_STOP_STRINGS takes more than 4); its type's bound by default (none
    for a type without one); a value that is no whole number, or under 4 (the fewest any type takes: a translated
    answer is watched for those past them), stops the start naming it."""
    assert provider(load_config({"VLLM_BASE_URL": "http://a:1"})).max_stop_sequences == 4
    assert provider(load_config({"DEEPSEEK_API_KEY": "k"}), "deepseek").max_stop_sequences == 16
    assert provider(load_config({"OLLAMA_BASE_URL": "http://o:1"}), "ollama").max_stop_sequences is None
    config = load_config({"VLLM_BASE_URL": "http://a:1", "VLLM_MAX_STOP_SEQUENCES": "32",
                          "VLLM_GPU_BASE_URL": "http://b:1", "VLLM_GPU_MAX_STOP_SEQUENCES": "8"})
    assert provider(config).max_stop_sequences == 32 and provider(config, "vllm-gpu").max_stop_sequences == 8
    path = write(tmp_path, "providers:\n  gpu: {type: vllm, base_url: 'http://g:8000/v1', max_stop_sequences: 64}\n")
    assert provider(load_config({}, path), "gpu").max_stop_sequences == 64
    for bad in ("3", "many", "0"):
        assert "VLLM_MAX_STOP_SEQUENCES" in fails({"VLLM_BASE_URL": "http://a:1", "VLLM_MAX_STOP_SEQUENCES": bad})
    path = write(tmp_path, "providers:\n  gpu: {type: vllm, base_url: 'http://g:8000/v1', max_stop_sequences: 2}\n")
    assert "providers.gpu.max_stop_sequences" in fails({}, path)


# -- the routing section -----------------------------------------------------------------------

def test_routing_defaults():
    routing = load_config({}).routing
    assert (routing.strategy, routing.health_interval, routing.metrics_interval, routing.failure_threshold,
            routing.stall_timeout, routing.max_concurrency, routing.queue_timeout, routing.max_attempts,
            routing.affinity_max_ratio, routing.affinity_slack) == ("load", 5.0, 2.0, 3, 60.0, 0, 5.0, 3, 1.5, 2)


def test_routing_variables():
    routing = load_config({
        "ROUTING_STRATEGY": " Round_Robin ", "REPLICA_HEALTH_INTERVAL": "500ms", "REPLICA_METRICS_INTERVAL": "0",
        "REPLICA_FAILURE_THRESHOLD": "1", "REPLICA_STALL_TIMEOUT": "2m", "REPLICA_MAX_CONCURRENCY": "32",
        "ROUTING_QUEUE_TIMEOUT": "0", "ROUTING_MAX_ATTEMPTS": "1", "ROUTING_AFFINITY_MAX_RATIO": "2.5",
        "ROUTING_AFFINITY_SLACK": "0",
    }).routing
    assert isinstance(routing, RoutingConfig)
    assert routing.strategy == "round_robin"
    assert routing.health_interval == 0.5
    assert routing.metrics_interval == 0.0  # no scrape
    assert routing.failure_threshold == 1
    assert routing.stall_timeout == 120.0
    assert routing.max_concurrency == 32
    assert routing.queue_timeout == 0.0
    assert routing.max_attempts == 1
    assert routing.affinity_max_ratio == 2.5
    assert routing.affinity_slack == 0


@pytest.mark.parametrize("strategy", ["load", "least_requests", "round_robin", "random"])
def test_every_strategy_is_accepted(strategy):
    assert load_config({"ROUTING_STRATEGY": strategy.upper()}).routing.strategy == strategy


def test_routing_yaml_section_and_env_over_it(tmp_path):
    path = write(tmp_path, """
routing:
  strategy: least_requests
  health_interval: 2s
  metrics_interval: 250ms
  failure_threshold: 5
  stall_timeout: 0
  max_concurrency: 8
  queue_timeout: 1.5
  max_attempts: 2
  affinity_max_ratio: 3
  affinity_slack: 4
""")
    routing = load_config({}, path).routing
    assert (routing.strategy, routing.health_interval, routing.metrics_interval, routing.failure_threshold,
            routing.stall_timeout, routing.max_concurrency, routing.queue_timeout, routing.max_attempts,
            routing.affinity_max_ratio, routing.affinity_slack) == (
        "least_requests", 2.0, 0.25, 5, 0.0, 8, 1.5, 2, 3.0, 4)
    overridden = load_config({"ROUTING_STRATEGY": "random", "REPLICA_MAX_CONCURRENCY": "1"}, path).routing
    assert (overridden.strategy, overridden.max_concurrency, overridden.max_attempts) == ("random", 1, 2)


def test_routing_keys_under_the_legacy_server_section(tmp_path):
    path = write(tmp_path, "server:\n  strategy: random\n  max_attempts: 4\n")
    routing = load_config({}, path).routing
    assert (routing.strategy, routing.max_attempts) == ("random", 4)


@pytest.mark.parametrize("var, value", [
    ("ROUTING_STRATEGY", "fastest"),
    ("REPLICA_HEALTH_INTERVAL", "0"),
    ("REPLICA_HEALTH_INTERVAL", "often"),
    ("REPLICA_METRICS_INTERVAL", "-1"),
    ("REPLICA_FAILURE_THRESHOLD", "0"),
    ("REPLICA_FAILURE_THRESHOLD", "1.5"),
    ("REPLICA_STALL_TIMEOUT", "forever"),
    ("REPLICA_MAX_CONCURRENCY", "-1"),
    ("ROUTING_QUEUE_TIMEOUT", "-2s"),
    ("ROUTING_MAX_ATTEMPTS", "0"),
    ("ROUTING_AFFINITY_MAX_RATIO", "1"),
    ("ROUTING_AFFINITY_MAX_RATIO", "0.5"),
    ("ROUTING_AFFINITY_MAX_RATIO", "x"),
    ("ROUTING_AFFINITY_SLACK", "-1"),
])
def test_bad_routing_values_stop_start_up_naming_the_variable(var, value):
    assert var in fails({var: value})


@pytest.mark.parametrize("key, value", [
    ("strategy", "fastest"), ("health_interval", "0"), ("failure_threshold", "0"), ("max_concurrency", "-1"),
    ("affinity_max_ratio", "1"), ("max_attempts", "none"),
])
def test_bad_routing_yaml_values_name_the_key(tmp_path, key, value):
    path = write(tmp_path, f"routing:\n  {key}: '{value}'\n")
    message = fails({}, path)
    assert f"routing.{key}" in message and path in message


def test_unknown_routing_key_is_named(tmp_path):
    path = write(tmp_path, "routing:\n  stratgey: load\n")
    message = fails({}, path)
    assert "stratgey" in message and "routing" in message


# -- end to end: each replica gets its own key, or the provider's ---------------------------------

@pytest_twisted.ensureDeferred
async def test_each_replica_is_sent_its_own_key_or_the_providers(reactor, tmp_path, http):
    fleet = await FakeFleet(reactor, 2, api_key="provider-key").start()
    fleet[0].api_key = "own-key"
    path = write(tmp_path, f"""
providers:
  pool:
    type: vllm
    api_key: provider-key
    replicas:
      - {{base_url: "{fleet[0].base_url}", api_key: own-key}}
      - {{base_url: "{fleet[1].base_url}"}}
""")
    gw = None
    try:
        gw = await start_gateway(reactor, {}, yaml_path=path)
        for i in range(4):
            response = await http.post(gw.url + "/v1/chat/completions", data=json.dumps(
                {"model": "pool/" + CHAT_MODEL, "messages": [], "fake_marker": f"m{i}"}).encode(),
                headers={"content-type": ["application/json"]})
            assert response.code == 200, await treq.content(response)
            await treq.content(response)
        assert fleet.distribution() == [2, 2]
        assert {r.header(b"authorization") for r in fleet[0].inference_requests} == {"Bearer own-key"}
        assert {r.header(b"authorization") for r in fleet[1].inference_requests} == {"Bearer provider-key"}
    finally:
        if gw is not None:
            await gw.service.stopService()
        await fleet.stop()


# -- URLs that can never work ---------------------------------------------------------------------

@pytest.mark.parametrize("url, why", [
    ("http://user:secretpw@127.0.0.1:8000/v1", "user"),
    ("http://secretpw@127.0.0.1:8000/v1", "user"),
    ("http://a b:80/v1", "space"),
    ("http://exa mple.com", "space"),
    ("http://a%20b:80/v1", "host"),
    ("http://127.0.0.1:1/v 1", "space"),
    ("http://127.0.0.1:0/v1", "port"),
    ("http://127.0.0.1:8000/v\t1", "control"),
    ("http://127.0.0.1:8000/v1\x00", "control"),
    ("http://h\n:8000/v1", "control"),
    ("http://ex\u00e4mple.com/v1", "host"),
    ("http://[::1:8000/v1", "URL"),
    ("http://[not-an-address]:8000/v1", "URL"),
])
def test_urls_that_can_never_work_are_refused_without_their_password(tmp_path, url, why):
    message = fails({"VLLM_BASE_URL": url})
    assert "VLLM_BASE_URL" in message and why in message and "secretpw" not in message
    path = write(tmp_path, f"providers:\n  pool:\n    type: vllm\n    replicas: [{{base_url: {json.dumps(url)}}}]\n")
    message = fails({}, path)
    assert "providers.pool.replicas[0].base_url" in message and why in message and "secretpw" not in message


def test_ip_addresses_and_names_with_underscores_are_fine():
    config = load_config({"VLLM_BASE_URL": "http://[fd00::5]:8000,http://10.0.0.1:8000,http://gpu_a.local:8000"})
    assert [r.root_url for r in provider(config).replica_configs] == [
        "http://[fd00::5]:8000", "http://10.0.0.1:8000", "http://gpu_a.local:8000"]


@pytest.mark.parametrize("weight", [".nan", ".inf", "1e300", "'nan'", "'inf'"])
def test_replica_weights_are_finite(tmp_path, weight):
    path = write(tmp_path, f"providers:\n  pool:\n    type: vllm\n"
                           f"    replicas: [{{base_url: http://a:1, weight: {weight}}}]\n")
    assert "providers.pool.replicas[0].weight" in fails({}, path)


def test_replica_settings_from_placeholders(tmp_path):
    path = write(tmp_path, "providers:\n  pool:\n    type: vllm\n"
                           "    replicas: [{base_url: '${URL}', weight: '${W}', max_concurrency: '${N}'}]\n")
    [replica] = provider(load_config({"URL": "http://a:1", "W": "2.5", "N": "8"}, path), "pool").replica_configs
    assert (replica.base_url, replica.weight, replica.max_concurrency) == ("http://a:1/v1", 2.5, 8)

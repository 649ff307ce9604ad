"""Virtual models (weighted targets, session affinity) and failover rules, in GoModel's shapes."""

import json

import pytest_twisted

from gomodel.config.virtual import VirtualModel as VirtualModelConfig
from gomodel.routing.virtual import VirtualModel
from tests.fakes.fleet import FakeReplica
from twisted.internet.defer import Deferred

from tests.support import start_gateway, stop_all, until, with_timeout

UPSTREAM = "meta-llama/Llama-3.1-8B-Instruct"


def test_smooth_weighted_round_robin_spreads_by_weight():
    vm = VirtualModel(VirtualModelConfig("llama", (("a", 3.0), ("b", 1.0))))
    picks = [vm.order(lambda s: s, lambda r: True, None)[0] for _ in range(8)]
    assert picks.count("a") == 6 and picks.count("b") == 2
    assert picks[:4] != ["a", "a", "a", "b"] or picks[4:] == picks[:4]  # interleaved, not in runs
    assert vm.order(lambda s: s, lambda r: r == "b", None)[0] == "b"  # only live targets are chosen


async def _two(reactor, **env):
    a, b = FakeReplica(reactor, name="a"), FakeReplica(reactor, name="b")
    await a.start()
    await b.start()
    gw = await start_gateway(reactor, {"VLLM_A_BASE_URL": a.base_url, "VLLM_B_BASE_URL": b.base_url, **env})
    return a, b, gw


async def _chat(http, gw, model, headers=None):
    response = await http.post(gw.url + "/v1/chat/completions", headers=headers or {},
                               data=json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode())
    return response, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_virtual_model_targets_are_weighted_listed_and_sticky(reactor, http):
    virtual = [{"source": "llama", "targets": [{"model": f"vllm-a/{UPSTREAM}", "weight": 3},
                                               {"model": f"vllm-b/{UPSTREAM}", "weight": 1}]}]
    a, b, gw = await _two(reactor, VIRTUAL_MODELS=json.dumps(virtual))
    try:
        listed = json.loads(await (await http.get(gw.url + "/v1/models")).content())
        assert "llama" in [m["id"] for m in listed["data"]]
        for _ in range(8):
            response, body = await _chat(http, gw, "llama")
            assert response.code == 200 and body["model"] == UPSTREAM
        assert (len(a.inference_requests), len(b.inference_requests)) == (6, 2)
        before = len(b.inference_requests), len(a.inference_requests)
        for _ in range(4):  # one session keeps its target
            await _chat(http, gw, "llama", {"X-Session-Id": "s-1"})
        after = len(b.inference_requests), len(a.inference_requests)
        assert sorted(x - y for x, y in zip(after, before)) == [0, 4]
    finally:
        await gw.service.stopService()
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_a_virtual_model_named_as_a_providers_model_is_listed_once_as_what_the_name_reaches(reactor, http):
    """(before: /v1/models listed the id twice, the provider's model and the virtual one)"""
    virtual = [{"source": f"vllm-a/{UPSTREAM}", "targets": [{"model": f"vllm-b/{UPSTREAM}"}]}]
    a, b, gw = await _two(reactor, VIRTUAL_MODELS=json.dumps(virtual))
    try:
        listed = json.loads(await (await http.get(gw.url + "/v1/models")).content())["data"]
        named = [m for m in listed if m["id"] == f"vllm-a/{UPSTREAM}"]
        assert len(named) == 1 and named[0]["targets"] == [{"model": f"vllm-b/{UPSTREAM}", "weight": 1}], named
        admin = json.loads(await (await http.get(gw.url + "/admin/api/v1/models")).content())["data"]
        assert [m["provider"] for m in admin if m["id"] == f"vllm-a/{UPSTREAM}"] == ["virtual"]
        response, body = await _chat(http, gw, f"vllm-a/{UPSTREAM}")
        assert response.code == 200 and (len(a.inference_requests), len(b.inference_requests)) == (0, 1)
    finally:
        await gw.service.stopService()
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_a_failing_target_is_left_for_the_next_before_the_first_byte(reactor, http):
    virtual = [{"source": "llama", "targets": [f"vllm-a/{UPSTREAM}", f"vllm-b/{UPSTREAM}"]}]
    a, b, gw = await _two(reactor, VIRTUAL_MODELS=json.dumps(virtual), REPLICA_FAILURE_THRESHOLD="100")
    try:
        a.fail_status = 503
        for _ in range(4):
            response, body = await _chat(http, gw, "llama")
            assert response.code == 200
        assert len(b.inference_requests) == 4
        assert sum(1 for r in a.inference_requests if r.status == 503) == len(a.inference_requests) <= 4
    finally:
        await gw.service.stopService()
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_a_target_that_asked_to_be_left_alone_with_retry_after_is_passed_over_until_then(reactor, http):
    """Before, the target chosen by weight was sent every other request, each refused with 429 and sent on."""
    virtual = [{"source": "llama", "targets": [f"vllm-a/{UPSTREAM}", f"vllm-b/{UPSTREAM}"]}]
    a, b, gw = await _two(reactor, VIRTUAL_MODELS=json.dumps(virtual))
    try:
        a.fail_status, a.fail_headers = 429, {"Retry-After": "30"}
        for _ in range(6):
            response, body = await _chat(http, gw, "llama")
            assert response.code == 200, body
        assert (len(a.inference_requests), len(b.inference_requests)) == (1, 6)
    finally:
        await stop_all(gw, a, b)


@pytest_twisted.ensureDeferred
async def test_failover_rules_try_the_candidates_in_order(reactor, http):
    rules = {f"vllm-a/{UPSTREAM}": [f"vllm-b/{UPSTREAM}"]}
    a, b, gw = await _two(reactor, FAILOVER_RULES_JSON=json.dumps(rules), REPLICA_FAILURE_THRESHOLD="100")
    try:
        response, _ = await _chat(http, gw, f"vllm-a/{UPSTREAM}")
        assert response.code == 200 and len(a.inference_requests) == 1 and not b.inference_requests
        a.fail_status = 502
        response, body = await _chat(http, gw, f"vllm-a/{UPSTREAM}")
        assert response.code == 200 and body["model"] == UPSTREAM
        assert len(b.inference_requests) == 1 and b.inference_requests[0].body["model"] == UPSTREAM
        a.fail_status = None
        b.fail_status = 503
        response, _ = await _chat(http, gw, f"vllm-b/{UPSTREAM}")  # no rule for vllm-b: its own 503
        assert response.code == 503
    finally:
        await gw.service.stopService()
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_gomodels_manual_rules_file_fails_over_as_its_rules_say(reactor, http, tmp_path):
    """GoModel's C{FALLBACK_MANUAL_RULES_PATH} (a JSON file of C{FAILOVER_RULES_JSON}'s shape) is read: before, a
    GoModel user's rules were ignored and the primary's 502 went to the client."""
    rules = tmp_path / "fallback.json"
    rules.write_text(json.dumps({f"vllm-a/{UPSTREAM}": [f"vllm-b/{UPSTREAM}"]}))
    a, b, gw = await _two(reactor, FALLBACK_MANUAL_RULES_PATH=str(rules), REPLICA_FAILURE_THRESHOLD="100")
    try:
        a.fail_status = 502
        response, body = await _chat(http, gw, f"vllm-a/{UPSTREAM}")
        assert response.code == 200 and body["model"] == UPSTREAM
        assert (len(a.inference_requests), len(b.inference_requests)) == (1, 1)
    finally:
        await stop_all(gw, a, b)


@pytest_twisted.ensureDeferred
async def test_a_target_that_dies_before_its_first_token_is_left_for_the_next_target(reactor, http):
    """A vLLM dying before its first token (its stream's head sent, none of its body) fails before the first
    byte as one answering 503 does: a failover rule's candidate, a virtual model's other target answers.
    Before, only the failed target's other replicas were tried: with none, the client got the 502."""
    from tests.support import start_fake

    a, b = await start_fake(reactor), await start_fake(reactor)
    a.steer = {"fake_die_after": 0}
    rules = {f"vllm-a/{UPSTREAM}": [f"vllm-b/{UPSTREAM}"]}
    virtual = [{"source": "llama", "targets": [{"model": f"vllm-a/{UPSTREAM}", "weight": 1000},
                                               {"model": f"vllm-b/{UPSTREAM}", "weight": 1}]}]
    gw = await start_gateway(reactor, {"VLLM_A_BASE_URL": a.base_url, "VLLM_B_BASE_URL": b.base_url,
                                       "FAILOVER_RULES_JSON": json.dumps(rules), "VIRTUAL_MODELS": json.dumps(virtual),
                                       "REPLICA_FAILURE_THRESHOLD": "100"})
    try:
        for model in (f"vllm-a/{UPSTREAM}", "llama"):
            response = await http.post(gw.url + "/v1/chat/completions", data=json.dumps(
                {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode())
            body = await response.content()
            assert response.code == 200 and body.endswith(b"data: [DONE]\n\n"), (model, response.code, body)
        posted = [[r for r in fake.requests if r.method == b"POST"] for fake in (a, b)]
        assert [len(p) for p in posted] == [2, 2]
        assert [(await r.closed)[0] for r in posted[0]] == ["lost", "lost"]
        assert [[r.in_flight for r in pool.replicas] for pool in gw.registry.providers] == [[0], [0]]
    finally:
        await stop_all(gw, a, b)


@pytest_twisted.ensureDeferred
async def test_a_failover_candidate_that_is_a_virtual_model_stands_for_its_targets(reactor, http):
    """Before, a candidate naming a virtual model was skipped without a word: the request failed with the
    first target's error though the candidate's targets could serve it."""
    virtual = [{"source": "backup", "targets": [f"vllm-b/{UPSTREAM}"]}]
    rules = {f"vllm-a/{UPSTREAM}": ["backup"], "backup": [f"vllm-a/{UPSTREAM}"]}  # (a loop: followed one step only)
    a, b, gw = await _two(reactor, VIRTUAL_MODELS=json.dumps(virtual), FAILOVER_RULES_JSON=json.dumps(rules),
                          REPLICA_FAILURE_THRESHOLD="100")
    try:
        a.fail_status = 502
        response, body = await _chat(http, gw, f"vllm-a/{UPSTREAM}")
        assert response.code == 200 and body["model"] == UPSTREAM
        assert len(a.inference_requests) == 1 and len(b.inference_requests) == 1
        b.fail_status = 503
        response, _ = await _chat(http, gw, "backup")  # its candidate fails too: one send each, no more
        assert response.code == 502
        assert len(a.inference_requests) == 2 and len(b.inference_requests) == 2
    finally:
        await stop_all(gw, a, b)


@pytest_twisted.ensureDeferred
async def test_a_full_target_is_passed_over_for_one_with_room(reactor, http):
    """Before, the target chosen by weight was taken though every replica of it was at its concurrency limit:
    the request waited ROUTING_QUEUE_TIMEOUT in its queue, then went to the other target, idle all along."""
    virtual = [{"source": "llama", "targets": [f"vllm-a/{UPSTREAM}", f"vllm-b/{UPSTREAM}"]}]
    a, b, gw = await _two(reactor, VIRTUAL_MODELS=json.dumps(virtual), REPLICA_MAX_CONCURRENCY="1",
                          ROUTING_QUEUE_TIMEOUT="60")
    try:
        a.hang = True
        held = Deferred.fromCoroutine(_chat(http, gw, f"vllm-a/{UPSTREAM}"))
        await until(reactor, lambda: a.in_flight == 1, what="vllm-a's one slot taken")
        for _ in range(3):
            response, _ = await with_timeout(reactor, Deferred.fromCoroutine(_chat(http, gw, "llama")), 10)
            assert response.code == 200
        assert len(b.inference_requests) == 3 and len(a.inference_requests) == 1
        a.hang = False
        await held
    finally:
        await stop_all(gw, a, b)


import pytest  # noqa: E402

from gomodel.config import ConfigError, load_config  # noqa: E402


@pytest.mark.parametrize("weight", ["NaN", "Infinity", "-Infinity", "1e300", "0", '"x"', "true"])
def test_target_weights_are_finite_numbers_above_zero(weight):
    virtual = '[{"source": "v", "targets": [{"model": "a/m", "weight": %s}]}]' % weight
    with pytest.raises(ConfigError) as raised:
        load_config({"VIRTUAL_MODELS": virtual})
    assert "VIRTUAL_MODELS[0].targets[0].weight" in str(raised.value)


def test_yaml_virtual_models_read_placeholders_and_switches(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("virtual_models:\n"
                    "  - {source: v, targets: [{model: a/m, weight: '${W}'}], session_affinity: '${AFFINITY}'}\n"
                    "  - {source: unused, target: a/m, enabled: 'false'}\n")
    [vm] = load_config({"W": "2.5", "AFFINITY": "false"}, str(path)).routing.virtual_models
    assert (vm.source, vm.targets, vm.session_affinity) == ("v", (("a/m", 2.5),), False)
    path.write_text("virtual_models: [{source: v, targets: [{model: a/m, weight: .nan}]}]\n")
    with pytest.raises(ConfigError) as raised:
        load_config({}, str(path))
    assert "virtual_models[0].targets[0].weight" in str(raised.value)


def test_a_source_given_twice_is_refused_whatever_spaces_surround_it():
    with pytest.raises(ConfigError) as raised:  # (both were kept, one name for two models)
        load_config({"VIRTUAL_MODELS": '[{"source": "v", "target": "a/m"}, {"source": " v ", "target": "b/m"}]'})
    assert "VIRTUAL_MODELS[1].source 'v' is defined twice" in str(raised.value)


def test_a_virtual_models_user_paths_is_refused_not_ignored():
    # GoModel's access policy: it was taken and ignored, so every key could use the model it meant to keep
    virtual = '[{"source": "v", "targets": ["a/m"], "user_paths": ["/team/a"]}]'
    with pytest.raises(ConfigError) as raised:
        load_config({"VIRTUAL_MODELS": virtual})
    assert "VIRTUAL_MODELS[0].user_paths" in str(raised.value)
    [vm] = load_config({"VIRTUAL_MODELS": virtual.replace('["/team/a"]', "[]")}).routing.virtual_models
    assert vm.source == "v"  # (none listed: everyone, as GoModel reads it)


@pytest_twisted.ensureDeferred
async def test_a_key_allowed_one_target_uses_and_sees_the_virtual_model(reactor, http):
    """A key may use a virtual model through the targets it is allowed: never a 403 by the draw."""
    virtual = [{"source": "llama", "targets": [{"model": f"vllm-a/{UPSTREAM}", "weight": 1},
                                               {"model": f"vllm-b/{UPSTREAM}", "weight": 3}]}]
    rules = {f"vllm-b/{UPSTREAM}": [f"vllm-a/{UPSTREAM}"]}
    a, b, gw = await _two(reactor, VIRTUAL_MODELS=json.dumps(virtual), FAILOVER_RULES_JSON=json.dumps(rules),
                          GOMODEL_MASTER_KEY="master-k")
    try:
        response = await http.post(gw.url + "/admin/api/v1/auth-keys", data=json.dumps({"name": "a", "models": ["vllm-a/"]}).encode(),
                                   headers={"authorization": "Bearer master-k", "content-type": "application/json"})
        auth = {"authorization": "Bearer " + json.loads(await response.content())["value"]}
        for _ in range(4):
            response, body = await _chat(http, gw, "llama", auth)
            assert response.code == 200, body
            response = await http.post(gw.url + "/v1/responses", headers=auth,
                                       data=json.dumps({"model": "llama", "input": "hi"}).encode())
            assert response.code == 200, await response.content()
        assert (len(a.inference_requests), len(b.inference_requests)) == (8, 0)
        response, body = await _chat(http, gw, f"vllm-b/{UPSTREAM}", auth)  # its failover candidate is no way in
        assert response.code == 403 and body["error"]["code"] == "model_access_denied"
        listed = json.loads(await (await http.get(gw.url + "/v1/models", headers=auth)).content())
        assert sorted(m["id"] for m in listed["data"]) == sorted(["llama", f"vllm-a/{UPSTREAM}"])
        # The virtual model's targets it is shown are those it may use: never the provider it may not.
        shown = [m for m in listed["data"] if m["id"] == "llama"][0]["targets"]
        assert shown == [{"model": f"vllm-a/{UPSTREAM}", "weight": 1}]
        response = await http.get(gw.url + "/v1/models/llama", headers=auth)
        assert response.code == 200 and json.loads(await response.content())["targets"] == shown
        response = await http.get(gw.url + "/v1/models/llama", headers={"authorization": "Bearer master-k"})
        assert [t["model"] for t in json.loads(await response.content())["targets"]] == [
            f"vllm-a/{UPSTREAM}", f"vllm-b/{UPSTREAM}"]
    finally:
        await gw.service.stopService()
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_a_virtual_model_is_listed_to_a_key_exactly_when_chat_admits_the_key_to_a_target(reactor, http):
    """Its targets are selectors, resolved as a request's model: a bare one reaches the provider that serves it,
    and a provider type's prefix the instance, which a key's allowlist names (or not) by its own name."""
    a = FakeReplica(reactor, name="a", models=(UPSTREAM,))
    b = FakeReplica(reactor, name="b", models=("only-b",))
    await a.start()
    await b.start()
    virtual = [{"source": "bare", "targets": [UPSTREAM]}, {"source": "typed", "targets": [f"vllm/{UPSTREAM}"]},
               {"source": "both", "targets": [UPSTREAM, "only-b"]}]
    gw = await start_gateway(reactor, {"VLLM_A_BASE_URL": a.base_url, "VLLM_B_BASE_URL": b.base_url,
                                       "VIRTUAL_MODELS": json.dumps(virtual), "GOMODEL_MASTER_KEY": "master-k"})
    try:
        for models, usable in ((["vllm-a/"], {"bare", "typed", "both"}), (["vllm-b/"], {"both"}),
                               (["vllm/"], set()), ([UPSTREAM], {"bare", "typed", "both"})):
            response = await http.post(gw.url + "/admin/api/v1/auth-keys", data=json.dumps(
                {"name": "k", "models": models}).encode(), headers={"authorization": "Bearer master-k"})
            auth = {"authorization": "Bearer " + json.loads(await response.content())["value"]}
            listed = json.loads(await (await http.get(gw.url + "/v1/models", headers=auth)).content())
            assert {m["id"] for m in listed["data"]} & {"bare", "typed", "both"} == usable, models
            for source in ("bare", "typed", "both"):
                response, body = await _chat(http, gw, source, auth)
                assert response.code == (200 if source in usable else 403), (models, source, body)
                one = await http.get(gw.url + "/v1/models/" + source, headers=auth)
                assert one.code == (200 if source in usable else 404), (models, source)
                await one.content()
    finally:
        await gw.service.stopService()
        await a.stop()
        await b.stop()


def test_a_target_or_candidate_naming_no_configured_provider_fails_the_start(tmp_path):
    """A virtual model's target or a failover candidate (or the model of a rule) whose provider part names no
    provider (by name or type) but is close to one's name fails the start, one line naming it (before: accepted, a
    typo routing nowhere); env JSON and YAML alike. One close to none (Ollama's C{hf.co/org/repo:Q4}) is a bare
    model id, as the routing reads it: the start warns of it. The model part is not checked (a provider's models
    may be discovered later), nor a two-part bare id (C{meta-llama/X}) or a virtual model's name; an entry with
    C{enabled: false} is left out unchecked."""
    env = {"VLLM_A_BASE_URL": "http://127.0.0.1:1/v1"}
    fine = [{"source": "llama", "targets": [f"vllm-a/{UPSTREAM}", f"vllm/{UPSTREAM}", UPSTREAM, "org/gpt-x",
                                           "vllm-a/not-discovered-yet/model", "hf.co/org/repo:Q4"]},
            {"source": "team/a/llama", "target": f"vllm-a/{UPSTREAM}"},
            {"source": "parked", "target": f"gone/{UPSTREAM}", "enabled": False}]
    rules = {"llama": [f"vllm-a/{UPSTREAM}", "team/a/llama", "gpt-x"], f"vllm-a/{UPSTREAM}": ["llama"]}
    config = load_config(dict(env, VIRTUAL_MODELS=json.dumps(fine), FAILOVER_RULES_JSON=json.dumps(rules)))
    assert [vm.source for vm in config.routing.virtual_models] == ["llama", "team/a/llama"]
    assert config.warnings == ("VIRTUAL_MODELS[0].targets[5].model 'hf.co/org/repo:Q4': 'hf.co' is no configured "
                               "provider, so it is read as a bare model id, served by whichever provider lists it "
                               "(providers: vllm, vllm-a)",)
    known = "(known: vllm, vllm-a; did you mean 'vllm-a'?)"
    for extra, problem in (
            ({"VIRTUAL_MODELS": json.dumps([{"source": "v", "targets": [f"vllm-a/{UPSTREAM}", f"vlm-a/{UPSTREAM}"]}])},
             f"VIRTUAL_MODELS[0].targets[1].model 'vlm-a/{UPSTREAM}' names no configured provider 'vlm-a' {known}"),
            ({"VIRTUAL_MODELS": json.dumps([{"source": "v", "target": f"vllm-b/{UPSTREAM}"}])},
             f"VIRTUAL_MODELS[0].targets[0].model 'vllm-b/{UPSTREAM}' names no configured provider 'vllm-b'"),
            ({"FAILOVER_RULES_JSON": json.dumps({"llama": [f"vllm-a/{UPSTREAM}", f"vllm-c/{UPSTREAM}"]})},
             f"FAILOVER_RULES_JSON.llama[1] 'vllm-c/{UPSTREAM}' names no configured provider 'vllm-c'"),
            ({"FAILOVER_RULES_JSON": json.dumps({f"vlm/{UPSTREAM}": [f"vllm-a/{UPSTREAM}"]})},
             f"FAILOVER_RULES_JSON: the rule for 'vlm/{UPSTREAM}' names no configured provider 'vlm'")):
        with pytest.raises(ConfigError) as raised:
            load_config(dict(env, **extra))
        assert str(raised.value).startswith(problem) and "\n" not in str(raised.value), str(raised.value)
    path = tmp_path / "g.yaml"
    path.write_text(f"virtual_models: [{{source: v, target: vlm-a/{UPSTREAM}}}]\n"
                    f"failover_rules: {{v: [vllm-a/{UPSTREAM}]}}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(env, str(path))
    assert str(raised.value).startswith(f"{path}: virtual_models[0].targets[0].model 'vlm-a/{UPSTREAM}' names no "
                                        "configured provider 'vlm-a'")
    path.write_text(f"failover_rules: {{llama: [vlm-a/{UPSTREAM}]}}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(env, str(path))
    assert str(raised.value).startswith(f"{path}: failover_rules.llama[0] 'vlm-a/{UPSTREAM}' names no configured")


@pytest_twisted.ensureDeferred
async def test_a_failover_rules_primary_waiting_out_a_retry_after_is_tried_after_its_candidates(reactor, http):
    """A rule's model whose only replica asked to wait (Retry-After) is passed over for a candidate that can take
    the request, as a virtual model's target is; with none that can, it is still tried. Before, every request was
    sent to it first, refused, then sent on: an attempt wasted each time."""
    rules = {f"vllm-a/{UPSTREAM}": [f"vllm-b/{UPSTREAM}"]}
    a, b, gw = await _two(reactor, FAILOVER_RULES_JSON=json.dumps(rules))
    try:
        a.fail_status, a.fail_headers = 429, {"Retry-After": "30"}
        for _ in range(6):
            response, body = await _chat(http, gw, f"vllm-a/{UPSTREAM}")
            assert response.code == 200, body
        assert (len(a.inference_requests), len(b.inference_requests)) == (1, 6)
        b.fail_status, b.fail_headers = 429, {"Retry-After": "30"}  # the candidate too: nothing else can serve
        response, body = await _chat(http, gw, f"vllm-a/{UPSTREAM}")
        assert response.code == 429, body
        assert (len(a.inference_requests), len(b.inference_requests)) == (2, 7)
    finally:
        await stop_all(gw, a, b)


@pytest_twisted.ensureDeferred
async def test_a_keys_failover_rule_passing_over_its_primary_keeps_to_what_the_key_may_use(reactor, http):
    """A key that may use only the rule's model: its candidate is still no way in, though the primary is passed
    over (it is the one tried, and its refusal the answer)."""
    rules = {f"vllm-a/{UPSTREAM}": [f"vllm-b/{UPSTREAM}"]}
    a, b, gw = await _two(reactor, FAILOVER_RULES_JSON=json.dumps(rules), GOMODEL_MASTER_KEY="master-k")
    try:
        response = await http.post(gw.url + "/admin/api/v1/auth-keys", data=json.dumps({"name": "a", "models": ["vllm-a/"]}).encode(),
                                   headers={"authorization": "Bearer master-k", "content-type": "application/json"})
        auth = {"authorization": "Bearer " + json.loads(await response.content())["value"]}
        a.fail_status, a.fail_headers = 429, {"Retry-After": "30"}
        for _ in range(2):
            response, body = await _chat(http, gw, f"vllm-a/{UPSTREAM}", auth)
            assert response.code == 429, body
        assert (len(a.inference_requests), len(b.inference_requests)) == (2, 0)
        response, body = await _chat(http, gw, f"vllm-a/{UPSTREAM}", {"authorization": "Bearer master-k"})
        assert response.code == 200 and (len(a.inference_requests), len(b.inference_requests)) == (2, 1)
    finally:
        await stop_all(gw, a, b)

"""The Responses lifecycle kept by the gateway: retrieve, input items, delete, cancel, follow-ups."""

import json
from functools import partial

import openai
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.logger import globalLogPublisher
import treq

from gomodel import jsonutil
from gomodel.responses_history import as_input
from tests.fakes.vllm import _count_tokens
from tests.support import in_thread, openai_client, start_fake, start_gateway, stop_all, until

MODEL = "vllm/meta-llama/Llama-3.1-8B-Instruct"
UPSTREAM = "meta-llama/Llama-3.1-8B-Instruct"


@pytest_twisted.async_yield_fixture()
async def client(gateway):
    sdk = openai_client(gateway)
    yield sdk
    sdk.close()


@pytest_twisted.async_yield_fixture()
async def both(reactor):
    """A gateway in front of a vLLM serving Responses natively (C{vllm}: L{MODEL}) and one translated to chat
    completions (C{vllm-t}: its model C{other}): C{(gateway, its openai SDK client, native fake, chat fake)}."""
    native = await start_fake(reactor)
    chat = await start_fake(reactor, responses=False, models=("other",))
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": native.base_url, "VLLM_T_BASE_URL": chat.base_url})
    sdk = openai_client(gw)
    yield gw, sdk, native, chat
    await stop_all(gw, native, chat, clients=(sdk,))


@pytest_twisted.async_yield_fixture()
async def translated(reactor):
    """A gateway in front of a vLLM whose Responses are translated to chat completions:
    C{(gateway, its openai SDK client, the fake)}."""
    fake = await start_fake(reactor, responses=False)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    sdk = openai_client(gw)
    yield gw, sdk, fake
    await stop_all(gw, fake, clients=(sdk,))


@pytest_twisted.ensureDeferred
async def test_created_responses_are_kept_listed_and_deleted(client, fake):
    created = await in_thread(client.responses.create, model=MODEL, input="hello there")
    got = await in_thread(client.responses.retrieve, created.id)
    assert got.id == created.id and got.output_text == created.output_text
    items = await in_thread(client.responses.input_items.list, created.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "hello there")]

    deleted = await in_thread(client.responses.with_raw_response.delete, created.id)
    # (OpenAI's answer: the openai SDK's delete() reads none, its raw response is that object)
    assert (deleted.status_code, json.loads(deleted.text)) == (200, {"id": created.id, "object": "response.deleted",
                                                           "deleted": True})
    with pytest.raises(openai.NotFoundError):
        await in_thread(client.responses.retrieve, created.id)
    with pytest.raises(openai.NotFoundError):
        await in_thread(client.responses.delete, created.id)
    other = await in_thread(client.responses.create, model=MODEL, input="again")
    assert await in_thread(client.responses.delete, other.id) is None
    with pytest.raises(openai.NotFoundError):
        await in_thread(client.responses.retrieve, other.id)


@pytest_twisted.ensureDeferred
async def test_streamed_responses_are_kept_from_their_completed_event(client):
    def stream():
        with client.responses.stream(model=MODEL, input="hi") as events:
            for _ in events:
                pass
            return events.get_final_response()

    final = await in_thread(stream)
    got = await in_thread(client.responses.retrieve, final.id)
    assert got.output_text == final.output_text


@pytest_twisted.ensureDeferred
async def test_a_stored_stream_past_a_mebibyte_is_read_back_whole_finished_or_left(client, fake):
    """A stored stream's reads are held raw up to 1 MiB, then folded (L{gomodel.responses_partial}): one of 2 MiB
    is read back whole, finished (from its final event) or left by its client after all its text came
    (C{cancelled}, with all of it), never cut at the mebibyte."""
    text = "x" * (1 << 20)  # (two of them: 2 MiB)

    def stream(**extra):
        events = client.responses.create(model=MODEL, input="hi", stream=True,
                                         extra_body=dict({"fake_text": text, "fake_chunks": 2}, **extra))
        seen = []
        for event in events:
            seen.append(event)
            if extra and len(seen) == 4:  # (its text came: the client leaves)
                break
        events.close()
        return seen[0].response.id

    finished = await in_thread(stream)
    got = await in_thread(client.responses.retrieve, finished)
    assert (got.status, got.output_text) == ("completed", text * 2)
    left = await in_thread(stream, fake_hang_after=4)
    await eventually(lambda: fake.hung and fake.hung[0][0].channel is None)  # (the gateway closed its upstream)
    got = await in_thread(client.responses.retrieve, left)
    assert (got.status, got.output_text) == ("cancelled", text * 2)
    fake.finish_hung()


@pytest_twisted.ensureDeferred
async def test_a_stream_kept_nowhere_whose_client_leaves_closes_its_upstream_cleanly(client, fake, logged_errors):
    """(a stream with C{store: false} has no background turn to read on for: its client leaving is no error)"""
    def stream():
        events = client.responses.create(model=MODEL, input="hi", stream=True, store=False,
                                         extra_body={"fake_hang_after": 2})
        first = next(iter(events))
        events.close()
        return first

    await in_thread(stream)
    await eventually(lambda: fake.hung and fake.hung[0][0].channel is None)  # (the gateway closed its upstream)
    fake.finish_hung()


@pytest_twisted.ensureDeferred
async def test_store_false_keeps_nothing(client):
    created = await in_thread(client.responses.create, model=MODEL, input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        await in_thread(client.responses.retrieve, created.id)


@pytest_twisted.ensureDeferred
async def test_input_items_are_paginated(http, gateway):
    body = {"model": MODEL, "input": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                      {"type": "message", "role": "user", "content": [{"type": "input_text",
                                                                                       "text": "c"}]}]}
    response = await http.post(gateway.url + "/v1/responses", data=json.dumps(body).encode())
    response_id = jsonutil.loads(await treq.content(response))["id"]
    page = jsonutil.loads(await treq.content(await http.get(
        gateway.url + f"/v1/responses/{response_id}/input_items?limit=2&order=asc")))
    assert [i["content"][0]["text"] for i in page["data"]] == ["a", "b"] and page["has_more"] is True
    rest = jsonutil.loads(await treq.content(await http.get(
        gateway.url + f"/v1/responses/{response_id}/input_items?order=asc&after={page['last_id']}")))
    assert [i["content"][0]["text"] for i in rest["data"]] == ["c"] and rest["has_more"] is False
    newest = jsonutil.loads(await treq.content(await http.get(gateway.url + f"/v1/responses/{response_id}/input_items")))
    assert newest["data"][0]["content"][0]["text"] == "c"  # desc by default
    bad = await http.get(gateway.url + f"/v1/responses/{response_id}/input_items?limit=0")
    assert bad.code == 400
    await treq.content(bad)
    for query, param in (("order=up", "order"), ("after=item_nope", "after")):
        bad = await http.get(gateway.url + f"/v1/responses/{response_id}/input_items?{query}")
        error = jsonutil.loads(await treq.content(bad))["error"]
        assert bad.code == 400 and (error["param"], error["code"]) == (param, "invalid_value")


@pytest_twisted.ensureDeferred
async def test_an_input_item_of_an_odd_type_the_upstream_takes_is_kept_as_it_came(http, gateway):
    body = {"model": MODEL, "input": [{"type": ["x"]}, {"type": {"a": 1}}, {"role": "user", "content": "a"}]}
    response = await http.post(gateway.url + "/v1/responses", data=json.dumps(body).encode())
    assert response.code == 200  # the fake upstream takes any input (it was a 502 blamed on the upstream)
    response_id = jsonutil.loads(await treq.content(response))["id"]
    items = jsonutil.loads(await treq.content(await http.get(
        gateway.url + f"/v1/responses/{response_id}/input_items?order=asc")))["data"]
    assert [item["type"] for item in items] == [["x"], {"a": 1}, "message"]
    assert [item["id"].split("_")[0] for item in items] == ["item", "item", "msg"]


@pytest_twisted.ensureDeferred
async def test_input_items_with_client_ids_that_repeat_or_are_no_text_each_get_an_id_of_their_own(http, gateway):
    def message(text, **given):
        return dict(given, role="user", content=text)

    body = {"model": MODEL, "input": [message("a", id="m1"), message("b", id="m1"), message("c", id=None),
                                      message("d", id={"x": 1}), message("e", id=""), message("f", id="m2")]}
    response = await http.post(gateway.url + "/v1/responses", data=json.dumps(body).encode())
    response_id = jsonutil.loads(await treq.content(response))["id"]
    seen, after = [], ""
    while True:
        page = jsonutil.loads(await treq.content(await http.get(
            gateway.url + f"/v1/responses/{response_id}/input_items?order=asc&limit=2{after}")))
        seen += page["data"]
        if not page["has_more"]:
            break
        after = f"&after={page['last_id']}"
    assert [item["content"][0]["text"] for item in seen] == ["a", "b", "c", "d", "e", "f"]
    ids = [item["id"] for item in seen]
    assert len(set(ids)) == 6 and all(isinstance(i, str) and i for i in ids)
    assert ids[0] == "m1" and ids[5] == "m2"  # a client's own unique ids are kept


@pytest_twisted.ensureDeferred
async def test_a_previous_response_id_that_is_no_id_is_refused_before_the_upstream(http, gateway, fake):
    before = len(fake.forwarded())
    for given, code in (("", "invalid_value"), (0, "invalid_type"), (False, "invalid_type"), ([], "invalid_type"),
                        ({"id": "resp_1"}, "invalid_type")):
        response = await http.post(gateway.url + "/v1/responses", data=json.dumps(
            {"model": MODEL, "input": "hi", "previous_response_id": given}).encode())
        error = jsonutil.loads(await treq.content(response))["error"]
        assert response.code == 400 and (error["param"], error["code"]) == ("previous_response_id", code), given
    assert len(fake.forwarded()) == before


@pytest_twisted.ensureDeferred
async def test_follow_up_goes_to_the_instance_that_made_the_previous_response(reactor):
    a = await start_fake(reactor)
    b = await start_fake(reactor)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": a.base_url, "VLLM_B_BASE_URL": b.base_url,
                                       "REPLICA_FAILURE_THRESHOLD": "100"})
    client = openai_client(gw)
    try:
        first = await in_thread(client.responses.create, model="vllm-b/" + UPSTREAM, input="one")
        follow = await in_thread(client.responses.create, model=MODEL, input="two", previous_response_id=first.id)
        assert b.last_request().body["previous_response_id"] == first.id
        assert not [r for r in a.requests if r.path == b"/v1/responses"]
        assert follow.previous_response_id == first.id
        # A batch line that continues it goes there too (before: to the route's first instance, which
        # answered 404 for an id it never held).
        line = {"custom_id": "x", "method": "POST", "url": "/v1/responses",
                "body": {"model": MODEL, "input": "batched", "previous_response_id": follow.id}}
        uploaded = await in_thread(client.files.create, file=("in.jsonl", json.dumps(line).encode()), purpose="batch")
        batch = await in_thread(client.batches.create, input_file_id=uploaded.id, endpoint="/v1/responses",
                                completion_window="24h")
        await gw.service.batch_runner.settled(batch.id)
        assert (await in_thread(client.batches.retrieve, batch.id)).request_counts.completed == 1
        assert b.last_request().body["previous_response_id"] == follow.id
        assert not [r for r in a.requests if r.path == b"/v1/responses"]
        # That instance down: the route's own provider answers, given the stored conversation.
        b.steer = {"fake_status": 503}
        again = await in_thread(client.responses.create, model=MODEL, input="three", previous_response_id=follow.id)
        sent = [r.body for r in a.requests if r.path == b"/v1/responses"][-1]
        assert [item["content"] for item in sent["input"]] == ["one", "héhéhé", "two", "héhéhé", "three"]
        assert (await in_thread(client.responses.retrieve, again.id)).id == again.id
    finally:
        await stop_all(gw, a, b, clients=(client,))


@pytest_twisted.ensureDeferred
async def test_a_target_that_fails_falls_back_with_the_stored_conversation(reactor):
    """A failover rule's candidate answers a create whose target failed before anything was sent, streamed or
    not (before: Responses had no fallbacks); a follow-up's conversation goes to it as explicit input, and
    the response it made is kept and continued there. An upstream's 400 is the client's: no fallback."""
    a = await start_fake(reactor, models=("model-a",))
    b = await start_fake(reactor, models=("model-b",), responses=False)  # (translated to chat)
    gw = await start_gateway(reactor, {
        "VLLM_BASE_URL": a.base_url, "OPENAI_BASE_URL": b.base_url, "OPENAI_API_KEY": "sk-up",
        "FAILOVER_RULES_JSON": json.dumps({"vllm/model-a": ["openai/model-b"]}), "REPLICA_FAILURE_THRESHOLD": "100"})
    client = openai_client(gw)

    def stream(**kwargs):
        with client.responses.stream(**kwargs) as events:
            for _ in events:
                pass
            return events.get_final_response()

    try:
        first = await in_thread(client.responses.create, model="vllm/model-a", input="my name is Ada")
        a.steer = {"fake_status": 503}
        second = await in_thread(client.responses.create, model="vllm/model-a", input="who am I?",
                                 previous_response_id=first.id)
        chat = b.last_request()
        assert chat.path == b"/v1/chat/completions" and chat.body["model"] == "model-b"
        assert chat.body["messages"] == [{"role": "user", "content": "my name is Ada"},
                                         {"role": "assistant", "content": "héhéhé"},
                                         {"role": "user", "content": "who am I?"}]
        assert second.model == "model-b" and second.previous_response_id == first.id
        assert (await in_thread(client.responses.retrieve, second.id)).output_text == second.output_text
        streamed = await in_thread(stream, model="vllm/model-a", input="again", previous_response_id=second.id)
        assert streamed.output_text == "héhéhé" and b.last_request().body["stream"] is True
        assert b.last_request().body["messages"][-1] == {"role": "user", "content": "again"}
        assert len(b.last_request().body["messages"]) == 5

        a.steer = {"fake_status": 400, "fake_body": json.dumps({"error": {"message": "no", "type": "x"}})}
        asked = len(b.forwarded())
        with pytest.raises(openai.BadRequestError):
            await in_thread(client.responses.create, model="vllm/model-a", input="x")
        assert len(b.forwarded()) == asked
    finally:
        await stop_all(gw, a, b, clients=(client,))


@pytest_twisted.ensureDeferred
async def test_at_most_routing_max_attempts_targets_are_asked(reactor):
    """Four targets that all fail: ROUTING_MAX_ATTEMPTS (3) of them are asked, as chat asks at most that many;
    before, every one."""
    fakes = [await start_fake(reactor, models=("m",)) for _ in range(4)]
    for fake in fakes:
        fake.steer = {"fake_status": 503}
    env = {"REPLICA_FAILURE_THRESHOLD": "100", "FAILOVER_RULES_JSON": json.dumps({"vllm/m": [
        f"vllm-{name}/m" for name in "bcd"]})}
    env.update({("VLLM_BASE_URL" if i == 0 else f"VLLM_{'_BCD'[i]}_BASE_URL"): fake.base_url
                for i, fake in enumerate(fakes)})
    gw = await start_gateway(reactor, env)
    client = openai_client(gw)
    try:
        with pytest.raises(openai.InternalServerError):
            await in_thread(client.responses.create, model="vllm/m", input="hi")
        asked = [len([r for r in fake.requests if r.path == b"/v1/responses"]) for fake in fakes]
        assert asked == [1, 1, 1, 0]
    finally:
        await stop_all(gw, *fakes, clients=(client,))


@pytest_twisted.ensureDeferred
async def test_routing_max_attempts_bounds_the_sends_of_every_target_together(reactor):
    """Three targets of two replicas each, all failing: ROUTING_MAX_ATTEMPTS (3) sends in all, on Responses
    and Messages as on chat (before: each target's replicas were tried up to that many times, 6 sends)."""
    import anthropic

    fakes = [await start_fake(reactor, models=("m",)) for _ in range(6)]
    for fake in fakes:
        fake.steer = {"fake_status": 503}
    env = {"REPLICA_FAILURE_THRESHOLD": "100", "FAILOVER_RULES_JSON": json.dumps({"vllm/m": ["vllm-b/m", "vllm-c/m"]}),
           "VLLM_BASE_URL": f"{fakes[0].base_url},{fakes[1].base_url}",
           "VLLM_B_BASE_URL": f"{fakes[2].base_url},{fakes[3].base_url}",
           "VLLM_C_BASE_URL": f"{fakes[4].base_url},{fakes[5].base_url}"}
    gw = await start_gateway(reactor, env)
    client = openai_client(gw)
    messages = anthropic.Anthropic(base_url=gw.url, api_key="none", max_retries=0)
    try:
        for path, call in ((b"/v1/responses", lambda: client.responses.create(model="vllm/m", input="hi")),
                           (b"/v1/messages", lambda: messages.messages.create(
                               model="vllm/m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]))):
            try:
                await in_thread(call)
                raise AssertionError("answered")
            except (openai.InternalServerError, anthropic.APIStatusError) as failed:
                assert failed.status_code == 503
            assert sum(len([r for r in fake.requests if r.path == path]) for fake in fakes) == 3
    finally:
        messages.close()
        await stop_all(gw, *fakes, clients=(client,))


@pytest_twisted.ensureDeferred
async def test_conversation_survives_an_upstream_restart(client, fake):
    first = await in_thread(client.responses.create, model=MODEL, input="my name is Ada")
    second = await in_thread(client.responses.create, model=MODEL, input="and I like tea",
                             previous_response_id=first.id)
    fake.stored_responses.clear()  # vLLM restarted: its in-memory store is gone
    third = await in_thread(client.responses.create, model=MODEL, input="what is my name?",
                            previous_response_id=second.id)
    refused, replayed = [r for r in fake.requests if r.path == b"/v1/responses"][-2:]
    assert refused.body["previous_response_id"] == second.id
    assert "previous_response_id" not in replayed.body
    assert replayed.body["input"] == [
        {"role": "user", "content": "my name is Ada"}, {"role": "assistant", "content": "héhéhé"},
        {"role": "user", "content": "and I like tea"}, {"role": "assistant", "content": "héhéhé"},
        {"role": "user", "content": "what is my name?"}]
    kept = await in_thread(client.responses.retrieve, third.id)
    assert kept.id == third.id
    # The answer names the response it follows, as the client asked (vLLM's own, sent none, says null)
    assert third.previous_response_id == kept.previous_response_id == second.id
    chain = await in_thread(client.responses.input_items.list, third.id)
    assert [i.content[0].text for i in chain.data] == ["what is my name?"]  # this turn's own input


@pytest_twisted.ensureDeferred
async def test_a_streamed_follow_up_sent_explicitly_names_the_response_it_follows(client, fake):
    """Streamed, every event's response object names it, as the response kept does (before: null)."""
    first = await in_thread(client.responses.create, model=MODEL, input="my name is Ada")
    fake.stored_responses.clear()  # vLLM restarted: the conversation goes explicitly

    def stream():
        with client.responses.stream(model=MODEL, input="who am I?", previous_response_id=first.id) as events:
            links = [event.response.previous_response_id for event in events if hasattr(event, "response")]
            return links, events.get_final_response()

    links, final = await in_thread(stream)
    assert "previous_response_id" not in fake.last_request().body
    assert links == [first.id, first.id] and final.previous_response_id == first.id
    assert (await in_thread(client.responses.retrieve, final.id)).previous_response_id == first.id


@pytest_twisted.ensureDeferred
async def test_a_previous_response_stored_only_after_the_create_began_is_replayed(client, fake, gateway):
    # Another host's write is committed between this create's first look and the upstream's 404.
    first = await in_thread(client.responses.create, model=MODEL, input="my name is Ada")
    fake.stored_responses.clear()
    store = gateway.service.store.responses
    real_get, misses = store.get, [1]

    def late_get(response_id):
        if misses:
            misses.pop()
            return succeed(None)
        return real_get(response_id)

    store.get = late_get
    try:
        again = await in_thread(client.responses.create, model=MODEL, input="what is my name?",
                                previous_response_id=first.id)
    finally:
        del store.get
    replayed = [r for r in fake.requests if r.path == b"/v1/responses"][-1]
    assert "previous_response_id" not in replayed.body  # the stored conversation, sent explicitly
    assert replayed.body["input"][0] == {"role": "user", "content": "my name is Ada"} and again.id


def previous_not_found(previous_id) -> dict:
    """OpenAI's error for a previous_response_id it does not hold (a 400)."""
    return {"message": f"Previous response with id '{previous_id}' not found.", "type": "invalid_request_error",
            "param": "previous_response_id", "code": "previous_response_not_found"}


@pytest_twisted.ensureDeferred
async def test_a_previous_response_nobody_holds_is_openais_400_previous_response_not_found(client):
    """vLLM answers an id it does not hold with a 404 about a C{response_id}; OpenAI with a 400 naming
    C{previous_response_id}, whose code clients that start the conversation again look for."""
    unstored = await in_thread(client.responses.create, model=MODEL, input="hi", store=False)  # (vLLM holds none)

    def streamed(**fields):
        with client.responses.stream(model=MODEL, input="x", **fields) as events:
            return list(events)

    for create in (partial(client.responses.create, model=MODEL, input="x"), streamed):
        for gone in ("resp_nobody", unstored.id):
            with pytest.raises(openai.BadRequestError) as refused:
                await in_thread(create, previous_response_id=gone)
            assert refused.value.body == previous_not_found(gone)


@pytest_twisted.ensureDeferred
async def test_a_response_deleted_through_the_gateway_is_not_continued_by_the_master_key(client, fake, gateway):
    """The master key's follow-up to a response it deleted through the gateway is OpenAI's 400, as a managed
    key's is, though vLLM still holds it (before: continued there, the deletion undone in effect). An id the
    gateway never held still goes upstream as it is."""
    created = await in_thread(client.responses.create, model=MODEL, input="my name is Ada")
    await in_thread(client.responses.delete, created.id)
    assert created.id in fake.stored_responses
    asked = len(fake.forwarded())
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            await in_thread(client.responses.create, model=MODEL, input="who am I?", previous_response_id=created.id,
                            stream=stream)
        assert refused.value.body == previous_not_found(created.id)
    assert len(fake.forwarded()) == asked  # nothing went upstream
    assert await gateway.service.store.responses.deleted(created.id) is True
    fake.stored_responses["resp_made_there"] = {"id": "resp_made_there"}
    again = await in_thread(client.responses.create, model=MODEL, input="x", previous_response_id="resp_made_there")
    assert again.previous_response_id == "resp_made_there"


@pytest_twisted.ensureDeferred
async def test_translated_provider_gets_the_stored_conversation(translated):
    _, client, fake = translated
    first = await in_thread(client.responses.create, model=MODEL, input="my name is Ada")
    await in_thread(client.responses.create, model=MODEL, input="who am I?", previous_response_id=first.id)
    chat = fake.last_request()
    assert chat.path == b"/v1/chat/completions"
    assert chat.body["messages"] == [{"role": "user", "content": "my name is Ada"},
                                     {"role": "assistant", "content": "héhéhé"},
                                     {"role": "user", "content": "who am I?"}]
    with pytest.raises(openai.BadRequestError) as refused:
        await in_thread(client.responses.create, model=MODEL, input="x", previous_response_id="resp_nobody")
    assert refused.value.body == previous_not_found("resp_nobody")


async def refused_when_translated(translated, http, cases):
    """Send each C{(extra body fields, param, code)} of C{cases} to the gateway of L{translated} (Responses
    translated to chat); each must be a 400 naming that param and code, and none may reach the upstream."""
    gw, _, fake = translated
    for extra, param, code in cases:
        response = await http.post(gw.url + "/v1/responses", data=json.dumps(dict(extra, model=MODEL)).encode())
        error = jsonutil.loads(await treq.content(response))["error"]
        assert response.code == 400 and (error["param"], error["code"]) == (param, code), extra
    assert not [r for r in fake.requests if r.path == b"/v1/chat/completions"]


@pytest_twisted.ensureDeferred
async def test_a_translated_request_with_text_or_tools_of_the_wrong_type_is_a_400(translated, http):
    await refused_when_translated(translated, http, [
        ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]}, "input", "invalid_type"),
        ({"input": [{"role": "user", "content": [{"type": "input_text", "text": ["a"]}]}]}, "input", "invalid_type"),
        ({"input": [{"role": "assistant", "content": [{"type": "refusal", "refusal": {}}]}]}, "input", "invalid_type"),
        ({"input": "hi", "tools": 5}, "tools", "invalid_type"),
        ({"input": "hi", "tools": {"type": "function"}}, "tools", "invalid_type"),
    ])


@pytest_twisted.ensureDeferred
async def test_each_refused_translated_request_names_its_param_and_a_code(translated, http):
    await refused_when_translated(translated, http, [
        ({"input": 5}, "input", "invalid_type"),
        ({"input": ["hi"]}, "input", "invalid_type"),
        ({"input": [{"role": "user", "content": 5}]}, "input", "invalid_type"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input", "missing_required_parameter"),
        ({"input": [{"type": "web_search_call"}]}, "input", "unsupported_value"),
        ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input", "unsupported_value"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0]", "unsupported_value"),
    ])


@pytest_twisted.ensureDeferred
async def test_a_translated_request_naming_a_conversation_or_a_stored_prompt_is_a_400_not_answered_without_them(
        translated, http):
    # (before: both were dropped: the model answered without the conversation's items or the prompt's
    # instructions, and the client could not tell)
    await refused_when_translated(translated, http, [
        ({"input": "hi", "conversation": "conv_1"}, "conversation", "unsupported_value"),
        ({"input": "hi", "conversation": {"id": "conv_1"}}, "conversation", "unsupported_value"),
        ({"input": "hi", "prompt": {"id": "pmpt_1", "variables": {"city": "Paris"}}}, "prompt", "unsupported_value"),
    ])


@pytest_twisted.ensureDeferred
async def test_a_native_vllm_request_naming_a_conversation_or_a_stored_prompt_is_a_400_not_answered_without_them(
        client, fake):
    """vLLM's Responses API keeps no conversations (its request has no C{conversation}: it ignores the field, with a
    warning in its log) nor stored prompts: either is the translated request's 400, before any upstream (before:
    a conversation went to vLLM, which answered without its items, and the client could not tell)."""
    for extra, param in (({"conversation": "conv_1"}, "conversation"), ({"conversation": {"id": "conv_1"}},
                                                                         "conversation"),
                         ({"prompt": {"id": "pmpt_1"}}, "prompt")):
        with pytest.raises(openai.BadRequestError) as refused:
            await in_thread(client.responses.create, model=MODEL, input="hi", **extra)
        error = refused.value.body
        assert (error["param"], error["code"]) == (param, "unsupported_value"), extra
    assert not [r for r in fake.requests if r.path == b"/v1/responses"]


@pytest_twisted.ensureDeferred
async def test_a_translated_image_without_a_url_is_a_400_naming_input_not_the_upstreams_odd_error(translated, http):
    # (before: {"image_url": {"url": null}} went to the chat upstream, whose answer named neither the item
    # nor what was missing)
    image = {"type": "input_image", "file_id": "file-1", "detail": "auto"}
    await refused_when_translated(translated, http, [
        ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "see"}, image]}]}, "input",
         "unsupported_value"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": 5}]}]}, "input", "invalid_type"),
    ])


def test_a_stored_message_whose_text_is_no_string_is_replayed_as_it_was_stored():
    odd = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": 5}]}
    assert as_input(odd) == {"role": "user", "content": [{"type": "input_text", "text": 5}]}
    plain = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                             {"type": "output_text", "text": "b"}]}
    assert as_input(plain) == {"role": "user", "content": "ab"}


@pytest_twisted.ensureDeferred
async def test_a_stored_refusal_is_replayed_to_a_native_provider_as_the_assistants_text(both):
    _, client, native, _ = both  # (a follow-up of MODEL goes to native)

    def refused():
        with client.responses.stream(model="vllm-t/other", input="tell me",
                                     extra_body={"fake_deltas": [{"content": "Well: "}, {"refusal": "I can't"}]}) as s:
            return s.get_final_response()

    first = await in_thread(refused)
    assert [part.type for part in first.output[0].content] == ["output_text", "refusal"]
    await in_thread(client.responses.create, model=MODEL, input="why?", previous_response_id=first.id)
    # (before: the stored parts as they were, which no Responses API takes as an assistant's input
    # message: vLLM refused every follow-up of the conversation)
    sent = [r for r in native.requests if r.path == b"/v1/responses"][-1]
    assert sent.body["input"] == [{"role": "user", "content": "tell me"},
                                  {"role": "assistant", "content": "Well: I can't"},
                                  {"role": "user", "content": "why?"}]


@pytest_twisted.ensureDeferred
async def test_background_responses_are_refreshed_and_cancelled_at_their_instance(client, fake):
    created = await in_thread(client.responses.create, model=MODEL, input="long job", background=True)
    assert created.status == "queued"
    fake.stored_responses[created.id]["status"] = "in_progress"
    assert (await in_thread(client.responses.retrieve, created.id)).status == "in_progress"
    cancelled = await in_thread(client.responses.cancel, created.id)
    assert cancelled.status == "cancelled"
    assert fake.last_request().path == f"/v1/responses/{created.id}/cancel".encode()
    assert (await in_thread(client.responses.retrieve, created.id)).status == "cancelled"
    sent = len(fake.forwarded())
    # cancelled again: OpenAI's "cancelling twice is idempotent", the response as it is, without asking its
    # instance (before: vLLM's 400 "Cannot cancel a synchronous response.")
    again = await in_thread(client.responses.cancel, created.id)
    assert (again.id, again.status) == (created.id, "cancelled") and len(fake.forwarded()) == sent
    done = await in_thread(client.responses.create, model=MODEL, input="short job", background=True)
    fake.stored_responses[done.id]["status"] = "completed"
    assert (await in_thread(client.responses.retrieve, done.id)).status == "completed"
    sent = len(fake.forwarded())
    # over otherwise: OpenAI's final response object as it is, not asking its instance (before: vLLM's 400
    # "Cannot cancel a synchronous response.", which vLLM's own issue 57999 calls a bug)
    again = await in_thread(client.responses.cancel, done.id)
    assert (again.id, again.status) == (done.id, "completed") and len(fake.forwarded()) == sent
    plain = await in_thread(client.responses.create, model=MODEL, input="short job")
    with pytest.raises(openai.BadRequestError) as refused:  # not made in the background: OpenAI's 400
        await in_thread(client.responses.cancel, plain.id)
    assert refused.value.body["code"] == "response_not_cancellable" and len(fake.forwarded()) == sent + 1
    assert "background" in refused.value.body["message"]


@pytest_twisted.ensureDeferred
async def test_a_background_response_its_instance_finished_since_last_read_is_answered_over_when_cancelled(client,
                                                                                                         fake):
    """A cancel of a response stored as queued whose instance has finished it since: vLLM's 400 'Cannot cancel a
    synchronous response.' (its issue 57999) was relayed; OpenAI answers the final object, which is stored."""
    created = await in_thread(client.responses.create, model=MODEL, input="long job", background=True)
    fake.stored_responses[created.id]["status"] = "completed"  # (the gateway's record still says queued)
    over = await in_thread(client.responses.cancel, created.id)
    assert (over.id, over.status) == (created.id, "completed")
    assert fake.last_request().path == f"/v1/responses/{created.id}".encode()  # (asked after the cancel's 400)
    sent = len(fake.forwarded())
    again = await in_thread(client.responses.cancel, created.id)  # (stored over now: its instance not asked)
    assert (again.id, again.status) == (created.id, "completed") and len(fake.forwarded()) == sent


@pytest_twisted.ensureDeferred
async def test_a_background_follow_up_sent_explicitly_names_the_response_it_follows_when_read_and_cancelled(client,
                                                                                                         fake):
    """Its instance, sent the conversation and no previous_response_id, says null in every answer about it; the
    create's answer names the previous response, and so do its reads and its cancel (before: null once asked)."""
    first = await in_thread(client.responses.create, model=MODEL, input="my name is Ada")
    fake.stored_responses.clear()  # vLLM restarted: the conversation goes explicitly
    created = await in_thread(client.responses.create, model=MODEL, input="who am I?", background=True,
                              previous_response_id=first.id)
    assert "previous_response_id" not in fake.last_request().body
    assert created.status == "queued" and created.previous_response_id == first.id
    fake.stored_responses[created.id]["status"] = "in_progress"
    got = await in_thread(client.responses.retrieve, created.id)
    assert (got.status, got.previous_response_id) == ("in_progress", first.id)
    cancelled = await in_thread(client.responses.cancel, created.id)
    assert (cancelled.status, cancelled.previous_response_id) == ("cancelled", first.id)
    got = await in_thread(client.responses.retrieve, created.id)
    assert (got.status, got.previous_response_id) == ("cancelled", first.id)


@pytest_twisted.ensureDeferred
async def test_a_background_stream_that_ends_before_its_response_is_kept_and_read_from_its_instance(client, fake):
    """vLLM goes on making a background response whose stream ended early (the client left, the connection
    broke): the gateway keeps it from the stream's first event, so it is read, as OpenAI's guide has a client
    do then, and watched to its end (before: a 404, nothing kept)."""
    def stream():
        seen = []
        with pytest.raises(openai.APIError):
            with client.responses.stream(model=MODEL, input="long job", background=True,
                                         extra_body={"fake_die_after": 2}) as events:
                seen.extend(events)
        return seen

    seen = await in_thread(stream)
    assert [event.type for event in seen] == ["response.created", "response.output_item.added", "error"]
    response_id = seen[0].response.id
    assert (await in_thread(client.responses.retrieve, response_id)).status == "queued"  # as its instance says
    fake.stored_responses[response_id]["status"] = "completed"
    done = await in_thread(client.responses.retrieve, response_id)
    assert (done.status, done.output_text) == ("completed", "héhéhé")


@pytest_twisted.ensureDeferred
async def test_a_background_stream_running_is_read_and_cancelled_and_its_end_stores_no_deleted_response(client,
                                                                                                      fake):
    """OpenAI's guide polls and cancels a background response while its stream runs: it is kept from the
    stream's first event (before: a 404 until the stream ended, and nothing kept where the gateway died
    meanwhile); deleted meanwhile, the stream's end does not store it again."""
    def stream(hang_after):
        events = client.responses.create(model=MODEL, input="long job", background=True, stream=True,
                                         extra_body={} if hang_after is None else {"fake_hang_after": hang_after})
        return events, iter(events)

    def running():
        events, each = stream(2)
        first = next(each)
        try:
            read = client.responses.retrieve(first.response.id)
            cancelled = client.responses.cancel(first.response.id)
        finally:
            events.close()
        return first.response.id, read.status, cancelled.status

    response_id, read, cancelled = await in_thread(running)
    assert (read, cancelled) == ("queued", "cancelled")  # (as its instance has it)
    assert (await in_thread(client.responses.retrieve, response_id)).status == "cancelled"

    def deleted():
        events, each = stream(2)
        first = next(each)
        client.responses.delete(first.response.id)
        return first.response.id, events, each

    response_id, events, each = await in_thread(deleted)
    fake.finish_hung()
    try:
        assert [event.type for event in await in_thread(list, each)][-1] == "response.completed"
    finally:
        events.close()
    with pytest.raises(openai.NotFoundError):
        await in_thread(client.responses.retrieve, response_id)


@pytest.mark.parametrize("whole", [False, True])
@pytest_twisted.ensureDeferred
async def test_a_background_stream_an_openai_provider_names_whose_client_leaves_before_its_first_event_is_kept(
        reactor, http, tmp_path, whole):
    """An OpenAI provider names a background response itself (no C{request_id} to choose it by): one streamed whose
    client leaves before its first event is read on until that event names it, then kept, queued as its instance
    has it, for its tenant alone, read and cancelled through the gateway, as OpenAI goes on making it (before: its
    upstream was closed at once, the response unknown to the gateway, a 404 for ever). One whose whole stream came
    in that read is kept over, its usage charged by its stream's record."""
    from tests.rawclient import connect
    from tests.support import until
    from tests.test_quotas import ADMIN, KEYS

    fake = await start_fake(reactor)
    gw = await start_gateway(reactor, {"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-up",
                                       "GOMODEL_MASTER_KEY": "master-k", "GOMODEL_DATA_DIR": str(tmp_path)})
    keys = []
    for name in ("one", "other"):
        answer = await http.post(gw.url + KEYS, data=json.dumps({"name": name}).encode(), headers=ADMIN)
        keys.append(json.loads(await treq.content(answer))["value"])
    owner, other = (openai_client(gw, key) for key in keys)
    reading_on = Deferred()

    def logged(event):
        if "read on until it does" in (event.get("log_format") or "") and not reading_on.called:
            reading_on.callback(None)

    globalLogPublisher.addObserver(logged)
    body = json.dumps({"model": f"openai/{UPSTREAM}", "input": "long job", "background": True, "stream": True,
                       "fake_first": ": ok\n\n", "fake_hang_after": 0}).encode()
    try:
        client = await connect(reactor, gw.port, b"POST /v1/responses HTTP/1.1\r\nHost: gateway\r\n"
                               b"Authorization: Bearer " + keys[0].encode() + b"\r\nContent-Type: application/json"
                               b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await until(reactor, lambda: b": ok" in bytes(client.received), what="the stream's head")
        client.transport.abortConnection()  # the client leaves before the stream's first event
        await reading_on  # (the gateway saw it leave)
        [(upstream, events)] = fake.hung
        fake.hung.clear()
        closed = upstream.notifyFinish()
        # (OpenAI goes on: its first event names the response)
        upstream.write(b"".join(b"event: " + kind.encode() + b"\ndata: " + jsonutil.dumps(payload) + b"\n\n"
                                for kind, payload in (events if whole else events[:1])))
        if whole:
            upstream.finish()
        else:
            with pytest.raises(Exception):
                await closed  # (closed by the gateway once named)
        await until(reactor, lambda: gw.service.drain.in_flight == 0, what="the create's end")
        [response_id] = list(fake.stored_responses)
        read = await in_thread(owner.responses.retrieve, response_id)
        if whole:  # (its stream's final event: kept over, charged by the stream's record)
            assert (read.status, read.output_text) == ("completed", "héhéhé")
            await gw.service.usage.flush()
            answer = await http.get(gw.url + "/admin/api/v1/usage/log", headers=ADMIN)
            assert [r["total_tokens"] for r in json.loads(await treq.content(answer))["data"]] == [22]
            assert (await in_thread(owner.responses.cancel, response_id)).status == "completed"
            return
        assert (read.id, read.status) == (response_id, "queued")  # (as its instance has it)
        with pytest.raises(openai.NotFoundError):
            await in_thread(other.responses.retrieve, response_id)
        with pytest.raises(openai.NotFoundError):
            await in_thread(other.responses.cancel, response_id)
        assert (await in_thread(owner.responses.cancel, response_id)).status == "cancelled"
        assert fake.stored_responses[response_id]["status"] == "cancelled"
    finally:
        globalLogPublisher.removeObserver(logged)
        fake.finish_hung()
        await stop_all(gw, fake, clients=(owner, other))


@pytest_twisted.ensureDeferred
async def test_a_response_deleted_while_a_read_asks_its_instance_stays_deleted(reactor, http, gateway, fake,
                                                                                monkeypatch):
    """(before: the read's answer, stored when its instance answered, brought the deleted response back)"""
    from twisted.internet.defer import Deferred

    from gomodel.api.responses import ResponsesRoute

    created = json.loads(await (await http.post(gateway.url + "/v1/responses", json={
        "model": MODEL, "input": "long job", "background": True})).content())
    asked, gate, refreshed = Deferred(), Deferred(), ResponsesRoute._refreshed

    async def held(route, *args):
        if not asked.called:
            asked.callback(None)
        await gate
        return await refreshed(route, *args)

    monkeypatch.setattr(ResponsesRoute, "_refreshed", held)
    read = http.get(f"{gateway.url}/v1/responses/{created['id']}")
    await asked  # the read asks the instance...
    deleted = await http.delete(f"{gateway.url}/v1/responses/{created['id']}")  # ...and the response is deleted
    assert deleted.code == 200
    fake.stored_responses[created["id"]]["status"] = "completed"
    gate.callback(None)
    assert (await read).code == 200  # (the read had found it)
    again = await http.get(f"{gateway.url}/v1/responses/{created['id']}")
    assert again.code == 404, await again.content()


@pytest_twisted.ensureDeferred
async def test_a_translated_background_response_is_answered_done_and_says_it_is_a_background_one(translated):
    """A provider without a Responses API answers C{background: true} once done, C{completed} (no chat completion
    can be queued and polled): its response object, whole or streamed, and as kept, names it a background response,
    as OpenAI's own do once over (before: C{"background": false}, what the request did not ask)."""
    gw, sdk, fake = translated
    done = {"fake_finish": "stop"}
    whole = await in_thread(sdk.responses.create, model=MODEL, input="long job", background=True, extra_body=done)
    assert (whole.status, whole.background, whole.output_text) == ("completed", True, "héhéhé")

    def streamed():
        with sdk.responses.stream(model=MODEL, input="long job", background=True, extra_body=done) as stream:
            return [event.response for event in stream if hasattr(event, "response")]

    snapshots = await in_thread(streamed)
    assert snapshots[-1].status == "completed" and all(response.background is True for response in snapshots)
    for made in (whole, snapshots[-1]):
        kept = await in_thread(sdk.responses.retrieve, made.id)
        assert (kept.status, kept.background) == ("completed", True)
    plain = await in_thread(sdk.responses.create, model=MODEL, input="short job")
    assert plain.background is False
    assert not [r for r in fake.requests if r.path == b"/v1/chat/completions" and "background" in r.body]


@pytest_twisted.ensureDeferred
async def test_a_background_response_that_is_not_to_be_stored_is_a_400(client, fake):
    """It could never be read back (before: a translating provider answered it 200, done, and a vLLM its own
    400)."""
    sent = len(fake.forwarded())
    with pytest.raises(openai.BadRequestError) as refused:
        await in_thread(client.responses.create, model=MODEL, input="long job", background=True, store=False)
    assert refused.value.body["param"] == "background" and refused.value.body["code"] == "invalid_value"
    assert len(fake.forwarded()) == sent


@pytest_twisted.ensureDeferred
async def test_retention_sweeps_old_responses_periodically_under_a_claim(reactor, tmp_path):
    from twisted.internet.task import Clock

    from gomodel.responses_history import ResponseRetention
    from gomodel.store import SQLiteStore

    class Recording:
        """The real response store, noting each sweep's cutoff."""

        def __init__(self, responses):
            self.responses, self.cutoffs = responses, []

        def delete_before(self, created_at):
            self.cutoffs.append(created_at)
            return self.responses.delete_before(created_at)

    clock = Clock()
    clock.advance(100 * 86400)
    store = SQLiteStore(str(tmp_path), reactor, clock=clock)
    store.startService()
    try:
        await store.started()
        for n, created in enumerate((69 * 86400, 70 * 86400 + 1800, 80 * 86400)):
            await store.responses.put({"id": f"resp_{n}", "provider": "vllm", "created_at": created,
                                       "input_items": [], "response": {}})
        recording = Recording(store.responses)
        retention = ResponseRetention(recording, store.claims, clock, retention=30 * 86400, owner="me",
                                      interval=3600)
        retention.startService()  # sweeps at once
        await eventually(lambda: len(recording.cutoffs) == 1)
        await eventually_stored(store, "resp_0", None)
        clock.advance(3600)
        await eventually_stored(store, "resp_1", None)
        await retention.stopService()
        assert recording.cutoffs == [70 * 86400, 70 * 86400 + 3600]
        assert clock.getDelayedCalls() == []
        assert (await store.responses.get("resp_0"), (await store.responses.get("resp_2"))["id"]) == (None, "resp_2")

        held = await store.claims.claim("sweep:responses", "another-process", 600)
        assert held is not None  # another process is sweeping: this one skips its turn
        again = ResponseRetention(recording, store.claims, clock, retention=30 * 86400, owner="me", interval=3600)
        await again._sweep()
        assert recording.cutoffs == [70 * 86400, 70 * 86400 + 3600]
    finally:
        await store.stopService()


async def eventually(predicate, tries=400):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    for _ in range(tries):
        if predicate():
            return
        await deferLater(reactor, 0.005, lambda: None)
    raise AssertionError("never happened")


async def eventually_stored(store, response_id, expected):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    for _ in range(400):
        if await store.responses.get(response_id) == expected:
            return
        await deferLater(reactor, 0.005, lambda: None)
    raise AssertionError(f"{response_id} still stored")


@pytest_twisted.ensureDeferred
async def test_stored_responses_survive_a_gateway_restart(reactor, fake, tmp_path):
    env = {"VLLM_BASE_URL": fake.base_url, "GOMODEL_DATA_DIR": str(tmp_path)}
    gw = await start_gateway(reactor, env)
    client = openai_client(gw)
    try:
        created = await in_thread(client.responses.create, model=MODEL, input="remember me")
    finally:
        client.close()
        await gw.service.stopService()
    gw = await start_gateway(reactor, env)
    client = openai_client(gw)
    try:
        assert (await in_thread(client.responses.retrieve, created.id)).output_text == created.output_text
    finally:
        client.close()
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_background_response_its_instance_forgot_is_failed_not_queued_for_ever(client, fake):
    """vLLM restarted while running it: the read that finds its instance no longer knows it says it failed,
    and so does the store from then on (before: queued for ever, a client polling for its end never saw it)."""
    created = await in_thread(client.responses.create, model=MODEL, input="long job", background=True)
    fake.stored_responses.clear()
    got = await in_thread(client.responses.retrieve, created.id)
    assert got.status == "failed" and got.error.code == "server_error" and created.id in got.error.message
    asked = len(fake.forwarded())
    assert (await in_thread(client.responses.retrieve, created.id)).status == "failed"
    # (a background response over: its final object, as OpenAI answers a cancel then)
    assert (await in_thread(client.responses.cancel, created.id)).status == "failed"
    assert len(fake.forwarded()) == asked  # (over: never asked again)


@pytest_twisted.ensureDeferred
async def test_a_background_response_its_instance_forgot_is_failed_when_cancelled_not_a_404(client, fake):
    """(before: vLLM's 404 'Response with id ... not found.' relayed, for a response the gateway answers)"""
    created = await in_thread(client.responses.create, model=MODEL, input="long job", background=True)
    fake.stored_responses.clear()  # its instance restarted
    with pytest.raises(openai.BadRequestError) as refused:
        await in_thread(client.responses.cancel, created.id)
    assert (refused.value.body["code"], refused.value.body["param"]) == ("response_not_cancellable", "response_id")
    assert "no longer knows it" in refused.value.body["message"]
    got = await in_thread(client.responses.retrieve, created.id)
    assert (got.status, got.error.code) == ("failed", "server_error")


@pytest_twisted.ensureDeferred
async def test_a_background_streams_events_are_replayed_from_its_instance_after_starting_after(reactor, client, fake,
                                                                                             http, gateway):
    """OpenAI's C{retrieve(stream=True, starting_after=N)}: a background stream's events after the N-th, relayed
    from the replica that holds them (vLLM keeps them), then those still to come, to the stream's end (before: a 400
    for every response)."""
    def stream():
        events = client.responses.create(model=MODEL, input="long job", background=True, stream=True,
                                         extra_body={"fake_hang_after": 2})
        each = iter(events)
        first = next(each)
        events.close()  # (the client leaves: its instance goes on)
        return first.response.id

    response_id = await in_thread(stream)

    def replay(after):
        return [(event.type, event.sequence_number)
                for event in client.responses.retrieve(response_id, stream=True, starting_after=after)]

    replaying = in_thread(replay, 0)
    await until(reactor, lambda: fake.replaying.get(response_id), what="the replay waiting for its events")
    asked = fake.last_request()
    assert (asked.method, asked.path) == (b"GET", f"/v1/responses/{response_id}".encode())
    assert b"stream=true" in asked.uri and b"starting_after=0" in asked.uri
    fake.finish_hung()  # (its instance makes the rest)
    assert await replaying == [("response.output_item.added", 1), ("response.content_part.added", 2),
                               ("response.output_text.delta", 3), ("response.output_item.done", 4),
                               ("response.completed", 5)]
    assert [kind for kind, _ in await in_thread(replay, 3)] == ["response.output_item.done", "response.completed"]
    everything = await http.get(gateway.url + f"/v1/responses/{response_id}?stream=true")  # (none named: all)
    assert everything.headers.getRawHeaders(b"content-type")[0].startswith(b"text/event-stream")
    assert (await everything.text()).count("event: ") == 6
    bad = await http.get(gateway.url + f"/v1/responses/{response_id}?stream=true&starting_after=-1")
    assert bad.code == 400 and (await bad.json())["error"]["param"] == "starting_after"


@pytest_twisted.ensureDeferred
async def test_a_replay_whose_client_leaves_closes_it_at_its_instance_and_charges_nothing(reactor, fake, http,
                                                                                         tmp_path):
    """A replay is relayed as a stream: its client leaving closes it at its instance; its events' usage, its
    create's, is not charged again (nor estimated)."""
    from tests.rawclient import connect
    from tests.test_quotas import ADMIN

    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "master-k",
                                       "GOMODEL_DATA_DIR": str(tmp_path)})
    try:
        events = await treq.content(await http.post(gw.url + "/v1/responses", headers=ADMIN, json={
            "model": MODEL, "input": "long job", "background": True, "stream": True}))
        created = json.loads(events.split(b"data: ", 1)[1].split(b"\n", 1)[0])["response"]["id"]
        whole = await http.get(gw.url + f"/v1/responses/{created}?stream=true&starting_after=1", headers=ADMIN)
        assert (await whole.text()).count("event: ") == 4
        await gw.service.usage.flush()
        log = json.loads(await treq.content(await http.get(gw.url + "/admin/api/v1/usage/log", headers=ADMIN)))
        assert sorted(r["total_tokens"] or 0 for r in log["data"]) == [0, 22]  # (the create's alone)

        fake.event_store[created] = fake.event_store[created][:2]  # (as if still running)
        raw = await connect(reactor, gw.port, f"GET /v1/responses/{created}?stream=true HTTP/1.1\r\nHost: gw\r\n"
                            "Authorization: Bearer master-k\r\n\r\n".encode())
        await raw.wait_for(b"response.output_item.added")
        [replay] = fake.replaying[created]
        closed = replay.notifyFinish()
        raw.transport.abortConnection()
        with pytest.raises(Exception):
            await closed  # (closed at its instance)
        await until(reactor, lambda: gw.service.drain.in_flight == 0, what="the replay's end")
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_response_whose_events_cannot_be_replayed_is_a_400_saying_why(client, http, gateway, fake):
    """Not made in the background, not streamed, or its instance restarted: a 400 naming why, never the object
    where events were awaited (the openai SDK read that as a stream of no events, silently empty) nor vLLM's
    stream that breaks off at once."""
    def refused(response_id):
        def events():
            return list(client.responses.retrieve(response_id, stream=True, starting_after=2))

        return in_thread(events)

    plain = await in_thread(client.responses.create, model=MODEL, input="short job")
    with pytest.raises(openai.BadRequestError) as not_background:
        await refused(plain.id)
    assert (not_background.value.body["param"], not_background.value.body["code"]) == ("stream", "unsupported_value")
    assert "not created in the background" in not_background.value.body["message"]
    created = await in_thread(client.responses.create, model=MODEL, input="long job", background=True)
    asked = len(fake.forwarded())
    with pytest.raises(openai.BadRequestError) as not_streamed:
        await refused(created.id)
    assert (not_streamed.value.body["param"], not_streamed.value.body["code"]) == ("stream", "unsupported_value")
    assert "not streamed" in not_streamed.value.body["message"]
    assert len(fake.forwarded()) == asked  # (known not streamed: its instance is not asked)
    [replica] = gateway.registry.provider("vllm").replicas
    assert replica.failures == 0

    def streamed():
        return list(client.responses.create(model=MODEL, input="long job", background=True, stream=True))[-1]

    done = await in_thread(streamed)
    fake.stored_responses.clear()  # (its instance restarted)
    with pytest.raises(openai.BadRequestError) as forgotten:
        await refused(done.response.id)
    assert "no longer holds it" in forgotten.value.body["message"]
    plain = await http.get(gateway.url + f"/v1/responses/{created.id}?stream=false")
    assert plain.code == 200 and (await plain.json())["id"] == created.id
    unknown = await http.get(gateway.url + "/v1/responses/resp_nobody?stream=true")
    assert unknown.code == 404
    await treq.content(unknown)


@pytest.mark.parametrize("storage", ["sqlite", "postgresql"])
@pytest_twisted.ensureDeferred
async def test_a_replay_of_a_response_stored_before_streamed_was_kept_asks_its_instance_once(reactor, fake, storage):
    """A response stored by a gateway that kept not whether it was streamed (a row from before the column's
    migration) is asked of its instance; vLLM's stream of a non-streamed one breaks off at once: a 400 saying so, the
    replica not counted as failing (it is well), and what its instance answered kept: a replay after it is that 400
    at once (before, each replay asked its instance again). One streamed is replayed, as any."""
    env = {"VLLM_BASE_URL": fake.base_url}
    if storage == "postgresql":
        from tests import postgres

        postgres.require()
        database = postgres.create_database()
        env.update(STORAGE_TYPE="postgresql", POSTGRES_URL=postgres.url(database))
    gateway = await start_gateway(reactor, env)
    client = openai_client(gateway)
    try:
        created = await in_thread(client.responses.create, model=MODEL, input="long job", background=True)
        store = gateway.service.store.responses
        await store.put({**await store.get(created.id), "streamed": None})

        def events():
            return list(client.responses.retrieve(created.id, stream=True))

        for _ in range(2):
            with pytest.raises(openai.BadRequestError) as refused:
                await in_thread(events)
            assert "not streamed" in refused.value.body["message"]
            assert len([asked for asked in fake.requests if b"stream=true" in asked.uri]) == 1  # (asked once)
            assert (await store.get(created.id))["streamed"] is False
        [replica] = gateway.registry.provider("vllm").replicas
        assert (replica.failures, replica.last_error) == (0, None)
        streamed = await in_thread(lambda: [e.type for e in client.responses.create(
            model=MODEL, input="long job", background=True, stream=True)])
        streamed_id = fake.last_request().body["request_id"]
        await store.put({**await store.get(streamed_id), "streamed": None})
        assert [e.type for e in await in_thread(
            lambda: list(client.responses.retrieve(streamed_id, stream=True)))] == streamed
    finally:
        await stop_all(gateway, clients=(client,))
        if storage == "postgresql":
            postgres.drop_database(database)


@pytest_twisted.ensureDeferred
async def test_a_translated_background_responses_events_are_kept_nowhere_a_400_saying_so(translated):
    _, sdk, _ = translated
    created = await in_thread(sdk.responses.create, model=MODEL, input="long job", background=True)

    def events():
        return list(sdk.responses.retrieve(created.id, stream=True))

    with pytest.raises(openai.BadRequestError) as refused:
        await in_thread(events)
    assert "kept by the gateway alone" in refused.value.body["message"]


@pytest_twisted.ensureDeferred
async def test_metadata_past_openais_limits_is_a_400_before_any_upstream_natively_or_translated(both):
    _, client, native, chat = both
    for model in (MODEL, "vllm-t/other"):
        for metadata in ({str(i): "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}, {"k": 1},
                         ["k", "v"]):
            with pytest.raises(openai.BadRequestError) as refused:
                await in_thread(client.responses.create, model=model, input="hi", metadata=metadata)
            error = refused.value.body
            assert (error["param"], error["code"]) == ("metadata", "invalid_value"), (model, metadata)
        most = {f"{i:064d}": "v" * 512 for i in range(16)}  # (OpenAI's most)
        kept = await in_thread(client.responses.create, model=model, input="hi", metadata=most)
        assert kept.status in ("completed", "incomplete")
    # (before: the translated path stored and echoed any metadata; vLLM took 17 pairs, and longer ones)
    assert len([r for r in native.requests if r.path == b"/v1/responses"]) == 1
    assert len([r for r in chat.requests if r.path == b"/v1/chat/completions"]) == 1


@pytest_twisted.ensureDeferred
async def test_input_tokens_are_counted_by_vllms_tokenizer_with_a_follow_ups_stored_conversation(reactor, http):
    fake = await start_fake(reactor)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url,
                                       "OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": "sk-x"})
    client = openai_client(gw)
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}]
    try:
        first = await in_thread(client.responses.create, model=MODEL, input="one")
        counted = await in_thread(client.responses.input_tokens.count, model=MODEL, input="two",
                                  instructions="be brief", tools=tools, previous_response_id=first.id)
        asked = fake.last_request()
        assert asked.path == b"/tokenize" and asked.body["model"] == UPSTREAM
        assert [m["content"] for m in asked.body["messages"]] == ["be brief", "one", first.output_text, "two"]
        assert asked.body["tools"][0]["function"]["name"] == "f" and asked.body["add_generation_prompt"] is True
        assert counted.input_tokens == _count_tokens(None, asked.body["messages"], asked.body["tools"])
        assert counted.object == "response.input_tokens"
        # (before: 405 "allowed: DELETE, GET, HEAD", as if input_tokens were a response's id)
        for body, status, code in (({"model": MODEL, "input": "x", "previous_response_id": "resp_nobody"}, 400,
                                    "previous_response_not_found"),
                                   ({"model": MODEL, "input": "x", "include": ["nope"]}, 400, "invalid_value"),
                                   ({"model": MODEL, "input": "x", "include": "nope"}, 400, "invalid_type"),
                                   ({"model": "openai/" + UPSTREAM, "input": "x"}, 501, "not_supported")):
            response = await http.post(gw.url + "/v1/responses/input_tokens", data=json.dumps(body).encode())
            error = jsonutil.loads(await treq.content(response))["error"]
            assert (response.code, error["code"]) == (status, code), body
    finally:
        client.close()
        await gw.service.stopService()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_an_unknown_ids_error_quotes_at_most_its_opening(http, gateway):
    created = jsonutil.loads(await treq.content(await http.post(gateway.url + "/v1/responses", data=json.dumps(
        {"model": MODEL, "input": "hi"}).encode())))
    long = "r" * 8000
    for path in (f"/v1/responses/resp_{long}", f"/v1/responses/resp_{long}/input_items",
                 f"/v1/responses/{created['id']}/input_items?after=msg_{long}"):
        response = await http.get(gateway.url + path)
        error = jsonutil.loads(await treq.content(response))["error"]
        # (before: the whole id, as the client sent it, in the message: 8 kB an error log kept too)
        assert response.code in (400, 404) and len(error["message"]) < 400, path[:60]


async def stored_eventually(gateway, response_id):
    """The record of C{response_id} once the gateway has stored it (it learns that a client left a little later)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    for _ in range(400):
        record = await gateway.service.store.responses.get(response_id)
        if record is not None:
            return record
        await deferLater(reactor, 0.005, lambda: None)
    raise AssertionError(f"{response_id} never stored")


@pytest_twisted.ensureDeferred
async def test_a_stream_the_client_leaves_or_that_breaks_is_kept_cancelled_or_failed_not_lost(client, gateway, fake):
    """A stored (not background) stream that ends before its response does is still a response its client saw
    the id of: kept as far as it got, C{cancelled} where the client left (the gateway closes its upstream, which
    stops it), C{failed} where the stream broke (before: a 404, nothing kept, its conversation lost)."""
    def left():
        events = client.responses.create(model=MODEL, input="long job", stream=True,
                                         extra_body={"fake_hang_after": 2})
        try:
            return next(iter(events)).response.id
        finally:
            events.close()

    def broke():
        seen = []
        with pytest.raises(openai.APIError):
            with client.responses.stream(model=MODEL, input="long job", extra_body={"fake_die_after": 2}) as events:
                seen.extend(events)
        return seen[0].response.id

    for cut, status in ((left, "cancelled"), (broke, "failed")):
        response_id = await in_thread(cut)
        await stored_eventually(gateway, response_id)
        kept = await in_thread(client.responses.retrieve, response_id)
        assert (kept.id, kept.status) == (response_id, status)
        assert (kept.error is None) == (status == "cancelled")
        items = await in_thread(client.responses.input_items.list, response_id)
        assert [i.content[0].text for i in items.data] == ["long job"]
    fake.finish_hung()


@pytest_twisted.ensureDeferred
async def test_a_translated_stream_the_client_leaves_is_kept_cancelled_with_what_it_made(translated):
    gw, client, _ = translated

    def left():
        events = client.responses.create(model=MODEL, input="long job", stream=True,
                                         extra_body={"fake_pace": 0.2, "fake_chunks": 50})
        try:
            each = iter(events)
            first = next(each)
            while next(each).type != "response.output_text.delta":
                pass
            return first.response.id
        finally:
            events.close()

    response_id = await in_thread(left)
    await stored_eventually(gw, response_id)
    kept = await in_thread(client.responses.retrieve, response_id)
    assert kept.status == "cancelled" and kept.output_text.startswith("hé")


@pytest_twisted.ensureDeferred
async def test_a_follow_up_of_a_conversation_whose_earlier_turn_was_deleted_never_sends_that_turn_again(both):
    """Deleting a response forgets it: a later turn's follow-up goes on from the turns after it, natively (sent
    them explicitly, though vLLM still holds the whole conversation) as translated (before: vLLM went on with
    the deleted turn, the translated conversation without it)."""
    _, client, native, chat = both
    for model, fake in ((MODEL, native), ("vllm-t/other", chat)):
        first = await in_thread(client.responses.create, model=model, input="my name is Ada")
        second = await in_thread(client.responses.create, model=model, input="my PIN is 1234",
                                 previous_response_id=first.id)
        third = await in_thread(client.responses.create, model=model, input="I like tea",
                                previous_response_id=second.id)
        await in_thread(client.responses.delete, second.id)
        fourth = await in_thread(client.responses.create, model=model, input="what do you know?",
                                 previous_response_id=third.id)
        sent = fake.last_request().body
        said = sent["input"] if model == MODEL else sent["messages"]
        assert "previous_response_id" not in sent
        assert said == [{"role": "user", "content": "I like tea"}, {"role": "assistant", "content": "héhéhé"},
                        {"role": "user", "content": "what do you know?"}], model
        assert fourth.previous_response_id == third.id


@pytest_twisted.ensureDeferred
async def test_input_items_show_what_include_names_and_refuse_what_it_cannot_name(client, http, gateway):
    """C{include} on the input items' list, as OpenAI's: an input image's URL, a computer call output's image URL, a
    reasoning item's encrypted content, an output text's logprobs... are listed where it names them alone (an image's
    data URL is not sent back with every page), and an unknown value is create's 400 naming include (before: it was
    ignored, every item listed whole either way)."""
    image = {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0K", "detail": "auto"}
    created = await in_thread(client.responses.create, model=MODEL, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "what is it?"}, image]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA"},
        {"type": "message", "role": "assistant", "id": "msg_a", "content": [
            {"type": "output_text", "text": "a cat", "annotations": [], "logprobs": [{"token": "a", "logprob": -1}]}]},
        {"type": "computer_call_output", "call_id": "call_1",
         "output": {"type": "computer_screenshot", "image_url": "data:image/png;base64,AAAA"}}])

    async def listed(**query):
        page = await in_thread(client.responses.input_items.list, created.id, order="asc", **query)
        return [item.model_dump(exclude_none=True) for item in page.data]

    plain = await listed()
    assert "image_url" not in plain[0]["content"][1] and plain[0]["content"][1]["type"] == "input_image"
    assert "encrypted_content" not in plain[1] and "logprobs" not in plain[2]["content"][0]
    assert "image_url" not in plain[3]["output"] and plain[3]["output"]["type"] == "computer_screenshot"
    assert plain[0]["content"][0]["text"] == "what is it?"
    whole = await listed(include=["message.input_image.image_url", "reasoning.encrypted_content",
                                  "message.output_text.logprobs", "computer_call_output.output.image_url"])
    assert whole[0]["content"][1]["image_url"] == image["image_url"] and whole[1]["encrypted_content"] == "gAAAA"
    assert whole[2]["content"][0]["logprobs"][0]["token"] == "a"
    assert whole[3]["output"]["image_url"] == "data:image/png;base64,AAAA"
    some = await listed(include=["message.input_image.image_url"])
    assert some[0]["content"][1]["image_url"] == image["image_url"] and "encrypted_content" not in some[1]
    stored = await gateway.service.store.responses.get(created.id)
    assert stored["input_items"][0]["content"][1]["image_url"] == image["image_url"]  # (kept whole)
    for query in ("include[]=message.input_image.url", "include=nope"):
        answer = await http.get(gateway.url + f"/v1/responses/{created.id}/input_items?{query}")
        error = jsonutil.loads(await treq.content(answer))["error"]
        assert answer.code == 400 and (error["param"], error["code"]) == ("include", "invalid_value")


# A response's output as a vLLM asked to include them makes it: a reasoning item's encrypted content, an output text's
# logprobs.
_INCLUDED_OUTPUT = [
    {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA"},
    {"type": "message", "role": "assistant", "id": "msg_a", "status": "completed", "content": [
        {"type": "output_text", "text": "a cat", "annotations": [], "logprobs": [
            {"token": "a", "logprob": -1.0, "bytes": [97], "top_logprobs": []}]}]}]


@pytest_twisted.ensureDeferred
async def test_retrieve_shows_what_include_names_and_refuses_what_it_cannot_name(both, http):
    """C{include} on a retrieve, as OpenAI's: a stored response's reasoning encrypted content and output text logprobs
    are shown where it names them alone, for a response vLLM made (a background one read from its instance too) as
    for one the gateway made translated, and an unknown value is create's 400 naming include (before: it was ignored,
    the response shown whole either way)."""
    gw, client, native, chat = both
    include = ["reasoning.encrypted_content", "message.output_text.logprobs"]
    made = await in_thread(client.responses.create, model=MODEL, input="what is it?", include=include,
                           extra_body={"fake_output": _INCLUDED_OUTPUT})
    background = await in_thread(client.responses.create, model=MODEL, input="what is it?", include=include,
                                 background=True, extra_body={"fake_output": _INCLUDED_OUTPUT})
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "other", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": "a cat"}, "finish_reason": "stop",
        "logprobs": {"content": [{"token": "a", "logprob": -1.0, "bytes": [97], "top_logprobs": []}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    await in_thread(client.responses.create, model="vllm-t/other", input="hi")  # (its chat fake has no Responses API:
    # known from now on, the next create goes to its chat completions at once, where its fake answers as told)
    translated = await in_thread(client.responses.create, model="vllm-t/other", input="what is it?", include=include,
                                 extra_body={"fake_status": 200, "fake_body": json.dumps(answer)})
    assert translated.output[0].content[0].logprobs[0].token == "a"
    for created in (made, background, translated):
        plain = (await in_thread(client.responses.retrieve, created.id)).model_dump(exclude_none=True)
        text = plain["output"][-1]["content"][0]
        assert text["text"] == "a cat" and "logprobs" not in text, created.id
        whole = await in_thread(client.responses.retrieve, created.id, include=include)
        assert whole.output[-1].content[0].logprobs[0].token == "a", created.id
        some = await in_thread(client.responses.retrieve, created.id, include=["reasoning.encrypted_content"])
        assert some.output[-1].content[0].logprobs is None
        if created is not translated:
            assert "encrypted_content" not in plain["output"][0] and plain["output"][0]["type"] == "reasoning"
            assert whole.output[0].encrypted_content == "gAAAA" and some.output[0].encrypted_content == "gAAAA"
    assert native.stored_responses[made.id]["output"] == _INCLUDED_OUTPUT  # (kept whole)
    stored = await gw.service.store.responses.get(translated.id)
    assert stored["response"]["output"][0]["content"][0]["logprobs"]  # (kept whole)
    for query in ("include[]=message.input_image.url", "include=nope", "include[]=nope&stream=true"):
        answer = await http.get(gw.url + f"/v1/responses/{made.id}?{query}")
        error = jsonutil.loads(await treq.content(answer))["error"]
        assert answer.code == 400 and (error["param"], error["code"]) == ("include", "invalid_value"), query


@pytest_twisted.ensureDeferred
async def test_a_background_response_its_watch_gives_up_on_is_failed_not_queued_for_ever(reactor, monkeypatch):
    """A background response whose instance never answered its watch (unreachable since, its provider gone) is no
    longer watched after WATCH_LIMIT: it is stored C{failed} then, saying so, for a client polling for its end
    (before: queued for ever)."""
    from gomodel.api import background

    monkeypatch.setattr(background, "WATCH_LIMIT", 0.0)  # (its first ask is past it)
    given_up = Deferred()

    def logged(event):
        if "no longer watched" in (event.get("log_format") or "") and not given_up.called:
            given_up.callback(None)

    globalLogPublisher.addObserver(logged)
    fake = await start_fake(reactor)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    client = openai_client(gw)
    try:
        created = await in_thread(client.responses.create, model=MODEL, input="long job", background=True)
        await fake.stop()  # (its instance unreachable from now on)
        await given_up  # (logged once it is stored failed)
        got = await in_thread(client.responses.retrieve, created.id)
        assert (got.status, got.error.code) == ("failed", "server_error") and created.id in got.error.message
        assert "not over" in got.error.message
    finally:
        globalLogPublisher.removeObserver(logged)
        await stop_all(gw, clients=(client,))


# OpenAI's words for an C{include} value its Responses API cannot include (its enum's values, in its order).
_UNKNOWN_INCLUDE = ("Invalid value: 'nope'. Supported values are: 'file_search_call.results', "
                    "'web_search_call.results', 'web_search_call.action.sources', 'message.input_image.image_url', "
                    "'computer_call_output.output.image_url', 'code_interpreter_call.outputs', "
                    "'reasoning.encrypted_content', and 'message.output_text.logprobs'.")


@pytest_twisted.ensureDeferred
async def test_a_native_create_naming_what_include_cannot_name_is_openais_400_before_any_upstream(both, http):
    """A create's C{include} is checked by the gateway, natively as translated, with the check a retrieve's gets
    (before: a native create sent it to vLLM, and its client got vLLM's own 400)."""
    gw, _, native, chat = both
    for model in (MODEL, "vllm-t/other"):
        sent = len(native.forwarded()), len(chat.forwarded())
        answer = await http.post(gw.url + "/v1/responses", json={"model": model, "input": "hi", "include": ["nope"]})
        error = (await answer.json())["error"]
        assert answer.code == 400 and error == {"message": _UNKNOWN_INCLUDE, "type": "invalid_request_error",
                                                "param": "include", "code": "invalid_value"}, model
        assert (len(native.forwarded()), len(chat.forwarded())) == sent, model  # (nothing upstream)
    created = await http.post(gw.url + "/v1/responses", json={"model": MODEL, "input": "hi"})
    retrieved = await http.get(gw.url + f"/v1/responses/{(await created.json())['id']}?include[]=nope")
    assert retrieved.code == 400 and (await retrieved.json())["error"]["message"] == _UNKNOWN_INCLUDE
    typed = await http.post(gw.url + "/v1/responses", json={"model": MODEL, "input": "hi", "include": "nope"})
    assert typed.code == 400 and (await typed.json())["error"]["code"] == "invalid_type"


@pytest_twisted.ensureDeferred
async def test_a_follow_up_of_a_background_response_not_over_is_openais_400_and_goes_nowhere(client, http, gateway,
                                                                                              fake):
    """A follow-up (C{previous_response_id}) of a background response still queued or in progress at its instance
    is refused as OpenAI refuses it, before any create goes upstream (before: sent to vLLM, which went on from what
    it had of it so far); the gateway's copy, which its watch refreshes only every few seconds, is asked about anew
    (one over at its instance since is continued)."""
    running = await in_thread(client.responses.create, model=MODEL, input="long job", background=True)
    assert running.status == "queued"
    for status in ("queued", "in_progress"):
        fake.stored_responses[running.id]["status"] = status
        creates = sum(request.method == b"POST" for request in fake.requests)
        for stream in (False, True):
            answer = await http.post(gateway.url + "/v1/responses", json={
                "model": MODEL, "input": "and then?", "previous_response_id": running.id, "stream": stream})
            error = (await answer.json())["error"]
            assert answer.code == 400 and error == {
                "message": f"Previous response with id '{running.id}' is still {status}: it can be continued once "
                           "it is over (or cancelled).", "type": "invalid_request_error",
                "param": "previous_response_id", "code": "previous_response_not_over"}, (status, stream)
        assert sum(request.method == b"POST" for request in fake.requests) == creates  # (no create upstream)
    fake.stored_responses[running.id]["status"] = "completed"  # (over at its instance; the gateway's copy: queued)
    follow_up = await in_thread(client.responses.create, model=MODEL, input="and then?",
                                previous_response_id=running.id)
    assert follow_up.previous_response_id == running.id and follow_up.status == "completed"
    assert fake.last_request().body["previous_response_id"] == running.id


# A background stream's events carrying what C{include} names (a reasoning item's encrypted content, an output
# text's logprobs: in its items, content parts, text deltas and final response), as a vLLM asked to include them
# streams them.
_LOGPROBS = [{"token": "a", "logprob": -1.0, "bytes": [97], "top_logprobs": []}]
_TEXT = {"type": "output_text", "text": "a cat", "annotations": [], "logprobs": _LOGPROBS}
_REPLAYED = "resp_replayed_include"
_REPLAYED_EVENTS = [
    ("response.created", {"response": {"id": _REPLAYED, "object": "response", "status": "in_progress",
                                       "background": True, "model": UPSTREAM, "output": []}}),
    ("response.output_item.added", {"output_index": 0, "item": _INCLUDED_OUTPUT[0]}),
    ("response.output_item.done", {"output_index": 0, "item": _INCLUDED_OUTPUT[0]}),
    ("response.output_item.added", {"output_index": 1, "item": dict(_INCLUDED_OUTPUT[1], content=[])}),
    ("response.content_part.added", {"item_id": "msg_a", "output_index": 1, "content_index": 0,
                                     "part": dict(_TEXT, text="")}),
    ("response.output_text.delta", {"item_id": "msg_a", "output_index": 1, "content_index": 0, "delta": "a cat",
                                    "logprobs": _LOGPROBS}),
    ("response.output_text.done", {"item_id": "msg_a", "output_index": 1, "content_index": 0, "text": "a cat",
                                   "logprobs": _LOGPROBS}),
    ("response.content_part.done", {"item_id": "msg_a", "output_index": 1, "content_index": 0, "part": _TEXT}),
    ("response.output_item.done", {"output_index": 1, "item": dict(_INCLUDED_OUTPUT[1], content=[_TEXT])}),
    ("response.completed", {"response": {"id": _REPLAYED, "object": "response", "status": "completed",
                                         "background": True, "model": UPSTREAM,
                                         "output": [_INCLUDED_OUTPUT[0], dict(_INCLUDED_OUTPUT[1], content=[_TEXT])],
                                         "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}}})]


@pytest_twisted.ensureDeferred
async def test_a_replay_shows_what_include_names_as_a_retrieve_does(http, gateway, fake):
    """C{retrieve(stream=True)} takes C{include} as a retrieve does (OpenAI's: the same parameter): its events'
    response objects, items and content parts show a reasoning item's encrypted content and an output text's
    logprobs where it names them alone, a text delta's or done event's logprobs are empty otherwise (their shape
    kept); named, the events go as its instance sent them (before: always whole, whatever C{include} said)."""
    events = [(kind, json.dumps(dict(fields, type=kind, sequence_number=n)))
              for n, (kind, fields) in enumerate(_REPLAYED_EVENTS)]
    created = await http.post(gateway.url + "/v1/responses", json={
        "model": MODEL, "input": "what is it?", "background": True, "stream": True, "request_id": _REPLAYED,
        "include": ["reasoning.encrypted_content", "message.output_text.logprobs"], "fake_events": events})
    assert (await created.text()).count("event: ") == len(events)

    async def replayed(query=""):
        answer = await http.get(gateway.url + f"/v1/responses/{_REPLAYED}?stream=true{query}")
        assert answer.code == 200
        return [json.loads(event.split("data: ", 1)[1]) for event in (await answer.text()).split("\n\n") if event]

    whole = await replayed("&include[]=reasoning.encrypted_content&include[]=message.output_text.logprobs")
    assert whole == [json.loads(data) for _, data in events]  # (as its instance sent them)
    plain = await replayed()
    assert [event["type"] for event in plain] == [kind for kind, _ in events]
    text = json.dumps(plain)
    assert "encrypted_content" not in text and '"token"' not in text, text
    assert plain[5]["logprobs"] == [] and plain[6]["logprobs"] == [] and plain[5]["delta"] == "a cat"
    assert plain[-1]["response"]["output"][1]["content"][0]["text"] == "a cat"
    assert plain[1]["item"] == {"type": "reasoning", "id": "rs_1", "summary": []}
    some = await replayed("&include[]=reasoning.encrypted_content&starting_after=0")
    assert [event["sequence_number"] for event in some] == list(range(1, len(events)))
    assert some[0]["item"]["encrypted_content"] == "gAAAA" and some[-1]["response"]["output"][0] == _INCLUDED_OUTPUT[0]
    assert '"token"' not in json.dumps(some)


@pytest_twisted.ensureDeferred
async def test_counting_a_follow_up_of_a_background_response_not_over_is_the_creates_400(client, http, gateway, fake):
    """C{/v1/responses/input_tokens} counts a create's input: a follow-up of a background response still queued or
    in progress is refused as that create is (C{previous_response_not_over}), its tokenizer not asked (before: the
    count of what the gateway's copy had of it so far); one over at its instance since is counted with it."""
    running = await in_thread(client.responses.create, model=MODEL, input="long job", background=True)
    body = {"model": MODEL, "input": "and then?", "previous_response_id": running.id}
    for status in ("queued", "in_progress"):
        fake.stored_responses[running.id]["status"] = status
        answer = await http.post(gateway.url + "/v1/responses/input_tokens", json=body)
        error = (await answer.json())["error"]
        assert answer.code == 400 and error == {
            "message": f"Previous response with id '{running.id}' is still {status}: it can be continued once it is "
                       "over (or cancelled).", "type": "invalid_request_error", "param": "previous_response_id",
            "code": "previous_response_not_over"}, status
        assert not [request for request in fake.requests if request.path == b"/tokenize"], status
    done = dict(fake.stored_responses[running.id], status="completed", output=[{
        "type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
        "content": [{"type": "output_text", "text": "done", "annotations": []}]}])
    fake.stored_responses[running.id] = done  # (over at its instance; the gateway's copy: queued)
    counted = await in_thread(client.responses.input_tokens.count, **body)
    asked = fake.last_request()
    assert asked.path == b"/tokenize" and [m["content"] for m in asked.body["messages"]] == ["long job", "done",
                                                                                             "and then?"]
    assert counted.input_tokens == _count_tokens(None, asked.body["messages"], None)

"""Stored responses across tenants, deletions, retention and cut streams: what a follow-up continues."""

import json

import openai
import pytest
import pytest_twisted
import treq

from tests.support import in_thread, openai_client, start_fake, start_gateway
from tests.test_keys import MASTER, MODEL, new_key

UPSTREAM = MODEL.split("/", 1)[1]


@pytest_twisted.async_yield_fixture()
async def keyed(reactor, tmp_path):
    """A gateway (master key L{MASTER}) in front of one fake vLLM: C{(gateway, vllm)}."""
    vllm = await start_fake(reactor)
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": vllm.base_url, "GOMODEL_MASTER_KEY": MASTER,
                                            "GOMODEL_DATA_DIR": str(tmp_path)})
    yield gateway, vllm
    await gateway.service.stopService()
    await vllm.stop()


@pytest_twisted.ensureDeferred
async def test_an_upstream_answering_one_id_to_two_tenants_never_changes_the_first_ones_stored_response(http, keyed):
    """An upstream that gives the same response id to two tenants' creates: the second's answer is not stored
    over the first's (before: the first tenant's stored response kept its owner and took the second's content,
    which its retrieve and its next turn, replayed, then read)."""
    gw, vllm = keyed
    vllm.steer = {"request_id": "resp_same"}  # (every response the fake makes gets that id)
    alpha, beta = await new_key(http, gw, user_path="/team/alpha"), await new_key(http, gw)
    clients = {name: openai_client(gw, key["value"]) for name, key in (("alpha", alpha), ("beta", beta))}
    try:
        first = await in_thread(clients["alpha"].responses.create, model=MODEL, input="alpha's plans",
                                extra_body={"fake_text": "alpha"})
        second = await in_thread(clients["beta"].responses.create, model=MODEL, input="beta's words",
                                 extra_body={"fake_text": "beta"})
        assert first.id == second.id == "resp_same"
        kept = await gw.service.store.responses.get("resp_same")
        assert "alpha" in kept["tenant"], kept["tenant"]
        assert kept["input_items"][0]["content"][0]["text"] == "alpha's plans"
        assert (await in_thread(clients["alpha"].responses.retrieve, "resp_same")).output_text == "alpha" * 3
        with pytest.raises(openai.NotFoundError):
            await in_thread(clients["beta"].responses.retrieve, "resp_same")
    finally:
        for client in clients.values():
            client.close()


async def sweep(gateway, response_id):
    """Sweep C{response_id} alone, as the retention does once it is past it (its record aged, then swept)."""
    responses = gateway.service.store.responses
    record = await responses.get(response_id)
    await responses.put(dict(record, created_at=0))
    assert await responses.delete_before(1) == 1


@pytest_twisted.ensureDeferred
async def test_a_follow_up_of_a_conversation_whose_first_turn_was_swept_is_previous_response_not_found(reactor):
    """A conversation replayed (to a translated provider, to a vLLM that restarted) whose earlier turn the retention
    swept is OpenAI's 400 C{previous_response_not_found}, naming the turn gone, and nothing goes upstream (before:
    the turns left were sent as the whole conversation, silently without its start). One naming the swept turn
    itself is that 400 too."""
    for native in (False, True):
        fake = await start_fake(reactor, responses=native)
        gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
        client = openai_client(gw)
        try:
            first = await in_thread(client.responses.create, model=MODEL, input="my name is Ada")
            second = await in_thread(client.responses.create, model=MODEL, input="hi", previous_response_id=first.id)
            third = await in_thread(client.responses.create, model=MODEL, input="ok", previous_response_id=second.id)
            await sweep(gw, first.id)
            fake.stored_responses.clear()  # (natively: vLLM restarted, the conversation goes explicitly)
            sent = len(fake.forwarded())
            for previous in (third.id, first.id):
                with pytest.raises(openai.BadRequestError) as refused:
                    await in_thread(client.responses.create, model=MODEL, input="who am I?",
                                    previous_response_id=previous)
                error = refused.value.body
                assert (error["param"], error["code"]) == ("previous_response_id", "previous_response_not_found")
                assert first.id in error["message"], error
            assert [r.path for r in fake.forwarded()[sent:]] == ([b"/v1/responses"] * 2 if native else [])
        finally:
            client.close()
            await gw.service.stopService()
            await fake.stop()


@pytest_twisted.ensureDeferred
async def test_a_swept_response_is_said_to_have_expired_to_its_tenant_alone(http, keyed):
    """A response the retention swept is remembered as swept (for a retention more): its tenant's follow-up naming
    it is the 400 C{previous_response_not_found} saying it expired, and its GET the 404 C{response_not_found}
    saying so, where before both read as for an id never made; another tenant is told nothing more than "not
    found"."""
    gw, vllm = keyed
    alpha, beta = await new_key(http, gw, user_path="/team/alpha"), await new_key(http, gw, user_path="/team/beta")
    clients = {name: openai_client(gw, key["value"]) for name, key in (("alpha", alpha), ("beta", beta))}
    try:
        first = await in_thread(clients["alpha"].responses.create, model=MODEL, input="my name is Ada")
        await sweep(gw, first.id)
        for name, expired in (("alpha", True), ("beta", False)):
            with pytest.raises(openai.BadRequestError) as refused:
                await in_thread(clients[name].responses.create, model=MODEL, input="who am I?",
                                previous_response_id=first.id)
            error = refused.value.body
            assert (error["param"], error["code"]) == ("previous_response_id", "previous_response_not_found")
            assert ("expired" in error["message"] and "RESPONSES_RETENTION" in error["message"]) is expired, error
            with pytest.raises(openai.NotFoundError) as missing:
                await in_thread(clients[name].responses.retrieve, first.id)
            error = missing.value.body
            assert error["code"] == "response_not_found"
            assert ("expired" in error["message"]) is expired, error
        with pytest.raises(openai.NotFoundError) as missing:
            await in_thread(clients["alpha"].responses.retrieve, "resp_never_made")
        assert "expired" not in missing.value.body["message"]
    finally:
        for client in clients.values():
            client.close()


@pytest_twisted.ensureDeferred
async def test_the_passthrough_never_continues_a_turn_deleted_through_the_gateway(http, keyed):
    """C{/p/{provider}/v1/responses} continuing a response deleted through the gateway, or a later turn of its
    conversation, is the 400 C{previous_response_not_found} for every key, the master key too, and nothing reaches
    the instance, which still holds the deleted turn (vLLM has no delete; before: the master key's went raw and
    vLLM went on with the deleted turn). C{/v1/responses} continues the later turn without it."""
    gw, vllm = keyed
    alpha = await new_key(http, gw, user_path="/team/alpha")
    client = openai_client(gw, alpha["value"])
    try:
        first = await in_thread(client.responses.create, model=MODEL, input="forget me")
        second = await in_thread(client.responses.create, model=MODEL, input="and", previous_response_id=first.id)
        other = await in_thread(client.responses.create, model=MODEL, input="kept")
        await in_thread(client.responses.delete, first.id)
    finally:
        client.close()

    def send(key, previous, path="/p/vllm/v1/responses", model=UPSTREAM):
        return http.post(gw.url + path, data=json.dumps({"model": model, "input": "then?",
                                                         "previous_response_id": previous}).encode(),
                         headers={"authorization": f"Bearer {key}", "content-type": "application/json"})

    sent = len(vllm.forwarded())
    for key in (MASTER, alpha["value"]):
        for previous in (first.id, second.id):
            answer = await send(key, previous)
            error = json.loads(await treq.content(answer))["error"]
            assert (answer.code, error["param"], error["code"]) == (400, "previous_response_id",
                                                                   "previous_response_not_found"), error
    assert len(vllm.forwarded()) == sent  # nothing reached the instance
    answer = await send(MASTER, other.id)  # a conversation with no turn deleted goes raw, as it came
    assert answer.code == 200 and json.loads(await treq.content(answer))["previous_response_id"] == other.id
    answer = await send(MASTER, second.id, "/v1/responses", MODEL)  # sent explicitly, without the deleted turn
    assert answer.code == 200, await treq.content(answer)
    await treq.content(answer)
    assert "forget me" not in json.dumps(vllm.forwarded()[-1].body["input"])


@pytest_twisted.ensureDeferred
async def test_an_item_reference_is_the_item_of_the_conversation_it_names_and_an_unknown_one_a_400(reactor):
    """C{{"type": "item_reference", "id": ...}} input items name an item (an input's, an output's) of the
    conversation continued: translated to chat, or sent to a vLLM explicitly or natively, each is that item (before:
    translated, a 400 \"not supported\"; replayed, it was left out). One naming no item of the conversation is a
    400 on C{input} naming its id, before the upstream."""
    for native in (False, True):
        fake = await start_fake(reactor, responses=native)
        gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
        client = openai_client(gw)
        try:
            first = await in_thread(client.responses.create, model=MODEL,
                                    input=[{"role": "user", "content": "my name is Ada", "id": "msg_ada"}])
            said = first.output[0].id
            for restarted in ((False, True) if native else (False,)):
                if restarted:
                    fake.stored_responses.clear()  # (sent the conversation explicitly)
                await in_thread(client.responses.create, model=MODEL, previous_response_id=first.id, input=[
                    {"type": "item_reference", "id": "msg_ada"}, {"type": "item_reference", "id": said},
                    {"role": "user", "content": "who am I?"}])
                sent = fake.forwarded()[-1].body
                if native and not restarted:  # (its instance holds the conversation: the items alone are resolved)
                    assert sent["previous_response_id"] == first.id
                    assert sent["input"][:2] == [{"role": "user", "content": "my name is Ada"},
                                                 {"role": "assistant", "content": "héhéhé"}]
                elif native:
                    assert [item["content"] for item in sent["input"]] == ["my name is Ada", "héhéhé", "my name is Ada",
                                                                           "héhéhé", "who am I?"]
                else:
                    assert [m["content"] for m in sent["messages"]] == ["my name is Ada", "héhéhé", "my name is Ada",
                                                                        "héhéhé", "who am I?"]
            before = len(fake.forwarded())
            asks = [{"previous_response_id": first.id}] + ([] if native else [{}])
            for extra in asks:
                with pytest.raises(openai.BadRequestError) as refused:
                    await in_thread(client.responses.create, model=MODEL, **extra,
                                    input=[{"role": "user", "content": "hi"}, {"type": "item_reference", "id": "msg_nope"}])
                error = refused.value.body
                assert error["param"] == "input" and "msg_nope" in error["message"], error
                assert refused.value.status_code == 400 and refused.value.body["type"] == "invalid_request_error"
            if native:
                assert len(fake.forwarded()) == before + 1  # (its instance still holds it: no explicit send)
            else:
                assert len(fake.forwarded()) == before
        finally:
            client.close()
            await gw.service.stopService()
            await fake.stop()


@pytest_twisted.ensureDeferred
async def test_a_native_stream_the_client_leaves_or_that_breaks_is_kept_with_what_it_made(reactor, gateway, fake):
    """A native stored stream cut after its text began is kept with the output it made so far, as a translated one
    is: C{cancelled} where the client left, C{failed} where it broke (before: the response its first event carried,
    its output empty, so its follow-up went on without what the client had read)."""
    from tests.test_responses_lifecycle import stored_eventually

    client = openai_client(gateway)

    def left():
        events = client.responses.create(model=MODEL, input="long job", stream=True,
                                         extra_body={"fake_hang_after": 4})
        try:
            each = iter(events)
            first = next(each)
            while next(each).type != "response.output_text.delta":
                pass
            return first.response.id
        finally:
            events.close()

    def broke():
        seen = []
        with pytest.raises(openai.APIError):
            with client.responses.stream(model=MODEL, input="long job", extra_body={"fake_die_after": 4}) as events:
                seen.extend(events)
        assert seen[-2].type == "response.output_text.delta"
        return seen[0].response.id

    try:
        for cut, status in ((left, "cancelled"), (broke, "failed")):
            response_id = await in_thread(cut)
            await stored_eventually(gateway, response_id)
            kept = await in_thread(client.responses.retrieve, response_id)
            assert (kept.status, kept.output_text) == (status, "héhéhé"), kept
            assert kept.output[0].type == "message" and kept.output[0].role == "assistant"
            fake.stored_responses.clear()  # (its follow-up replays it: what the client read is part of it)
            await in_thread(client.responses.create, model=MODEL, input="go on", previous_response_id=response_id)
            assert fake.forwarded()[-1].body["input"][1] == {"role": "assistant", "content": "héhéhé"}
        fake.finish_hung()
    finally:
        client.close()


def test_a_partial_stream_folds_text_and_function_call_arguments_cut_anywhere_and_long_ones_as_it_goes():
    from gomodel import jsonutil
    from gomodel.responses_partial import FOLD_BYTES, PartialStream

    def event(kind, **fields):
        return b"event: " + kind.encode() + b"\ndata: " + jsonutil.dumps(dict(fields, type=kind)) + b"\n\n"

    deltas = FOLD_BYTES // 40  # (a stream of more than FOLD_BYTES: folded as it goes)
    stream = b"".join([
        event("response.created", response={"id": "resp_1", "status": "in_progress", "output": []}),
        event("response.output_item.added", output_index=0, item={"id": "fc_1", "type": "function_call",
                                                                  "name": "f", "arguments": "", "call_id": "c"}),
        event("response.function_call_arguments.delta", output_index=0, delta='{"a":'),
        event("response.function_call_arguments.delta", output_index=0, delta=' 1}'),
        event("response.output_item.done", output_index=0, item={"id": "fc_1", "type": "function_call", "name": "f",
                                                                 "arguments": '{"a": 1}', "call_id": "c"}),
        event("response.output_item.added", output_index=1, item={"id": "msg_1", "type": "message",
                                                                  "role": "assistant", "content": []}),
        event("response.content_part.added", output_index=1, content_index=0, part={"type": "output_text",
                                                                                     "text": ""}),
        *[event("response.output_text.delta", output_index=1, content_index=0, delta="é") for _ in range(deltas)]])
    partial = PartialStream()
    for at in range(0, len(stream), 999):  # (reads cut anywhere, in an event too)
        partial.add(stream[at:at + 999])
    response = partial.response()
    assert response["id"] == "resp_1"
    call, message = response["output"]
    assert call["arguments"] == '{"a": 1}'
    assert message["content"][0]["text"] == "é" * deltas
    assert PartialStream().response() is None


@pytest_twisted.ensureDeferred
async def test_truncation_auto_drops_the_oldest_turns_that_do_not_fit_when_translated_and_goes_natively(reactor):
    """C{truncation: "auto"} over chat completions: a conversation the upstream says does not fit its context is sent
    again without its oldest turns (its instructions and its last message kept, what is kept starting at a user
    message), streamed or not, and the response says C{"truncation": "auto"} (before: the field was dropped, the
    answer said C{"disabled"}, and the client got the upstream's 400). Without it the 400 stays. Natively it goes
    to the upstream as it came, a replayed conversation's too."""
    fake = await start_fake(reactor, responses=False)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    client = openai_client(gw)
    try:
        first = await in_thread(client.responses.create, model=MODEL, input="my name is Ada " * 20)
        second = await in_thread(client.responses.create, model=MODEL, input="I like tea " * 20,
                                 previous_response_id=first.id)
        fits = {"fake_context": 450}  # (the instructions, the second turn and the question; not the first turn)
        with pytest.raises(openai.BadRequestError):
            await in_thread(client.responses.create, model=MODEL, input="who am I?", instructions="be brief",
                            previous_response_id=second.id, extra_body=fits)
        for stream in (False, True):
            sent = len(fake.forwarded())
            ask = dict(model=MODEL, input="who am I?", instructions="be brief", previous_response_id=second.id,
                         truncation="auto", extra_body=fits)
            if stream:
                def streamed():
                    with client.responses.stream(**ask) as events:
                        return events.get_final_response()
                answer = await in_thread(streamed)
            else:
                answer = await in_thread(client.responses.create, **ask)
            assert answer.truncation == "auto" and answer.output_text == "héhéhé"
            tried = [r for r in fake.forwarded()[sent:] if r.path == b"/v1/chat/completions"]
            assert len(tried) == 2
            said = [m["content"].split(" ")[0] for m in tried[-1].body["messages"]]
            assert said == ["be", "I", "héhéhé", "who"], said
    finally:
        client.close()
        await gw.service.stopService()
        await fake.stop()
    fake = await start_fake(reactor)
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url})
    client = openai_client(gw)
    try:
        first = await in_thread(client.responses.create, model=MODEL, input="hi")
        fake.stored_responses.clear()  # (replayed explicitly)
        await in_thread(client.responses.create, model=MODEL, input="x", truncation="auto",
                        previous_response_id=first.id)
        assert fake.forwarded()[-1].body["truncation"] == "auto" and len(fake.forwarded()[-1].body["input"]) == 3
    finally:
        client.close()
        await gw.service.stopService()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_a_batch_line_continuing_a_conversation_whose_first_turn_was_swept_fails_alone(keyed):
    """A C{/v1/responses} batch line whose instance no longer holds the conversation, one of whose earlier turns
    the retention swept, ends in the error file with C{previous_response_not_found}, and the batch goes on to its
    end (before the sweep check, the gateway's error escaped the line and parked the whole batch)."""
    from tests.test_keys import batch_of

    gw, vllm = keyed
    client = openai_client(gw, MASTER)
    try:
        first = await in_thread(client.responses.create, model=MODEL, input="my name is Ada")
        second = await in_thread(client.responses.create, model=MODEL, input="hi", previous_response_id=first.id)
        await sweep(gw, first.id)
        vllm.stored_responses.clear()  # (its instance restarted: the line is sent the conversation explicitly)
        done = await batch_of(gw, client, "/v1/responses", [
            {"model": MODEL, "input": "who am I?", "previous_response_id": second.id},
            {"model": MODEL, "input": "unrelated"}])
        assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 1, 1)
        line = json.loads((await in_thread(client.files.content, done.error_file_id)).content)
        assert line["error"]["code"] == "previous_response_not_found" and first.id in line["error"]["message"]
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_the_master_keys_passthrough_follow_up_of_a_response_the_gateway_never_held_is_not_held_up(http, keyed):
    """The master key's C{/p/} follow-ups of a conversation made there (the gateway keeps none of them) are checked
    for a deleted turn without looking the response up as one being written (a miss looks again for up to 0.375 s
    on PostgreSQL, and on SQLite with workers)."""
    gw, vllm = keyed
    vllm.stored_responses["resp_made_there"] = {"id": "resp_made_there"}
    responses, looked = gw.service.store.responses, []
    get = responses.get
    responses.get = lambda response_id: looked.append(response_id) or get(response_id)
    try:
        answer = await http.post(gw.url + "/p/vllm/v1/responses", headers={"authorization": f"Bearer {MASTER}"},
                                 data=json.dumps({"model": UPSTREAM, "input": "and?",
                                                  "previous_response_id": "resp_made_there"}).encode())
        assert answer.code == 200, await treq.content(answer)
        await treq.content(answer)
        assert looked == []
    finally:
        responses.get = get


@pytest_twisted.ensureDeferred
async def test_another_tenants_background_response_of_the_same_id_never_updates_the_stored_one(http, keyed):
    """A background response whose id an upstream already gave another tenant's stored response: its end (the
    final response object its stream carries) does not replace that tenant's stored response (before: the
    insert was refused, but the update at its end went by id alone, so the first tenant's retrieve and its
    next turn read the other tenant's answer)."""
    gw, vllm = keyed
    vllm.steer = {"request_id": "resp_same"}
    alpha, beta = await new_key(http, gw, user_path="/team/alpha"), await new_key(http, gw)
    clients = {name: openai_client(gw, key["value"]) for name, key in (("alpha", alpha), ("beta", beta))}
    store = gw.service.store.responses
    try:
        await in_thread(clients["alpha"].responses.create, model=MODEL, input="alpha's plans",
                        extra_body={"fake_text": "alpha"})

        def streamed():
            with clients["beta"].responses.create(model=MODEL, input="beta's words", stream=True, background=True,
                                                  extra_body={"fake_text": "beta"}) as stream:
                return [event.type for event in stream]

        assert (await in_thread(streamed))[-1] == "response.completed"
        kept = await store.get("resp_same")  # (read after the update at its stream's end, in the store's order)
        assert "alpha" in kept["tenant"], kept["tenant"]
        assert "beta" not in json.dumps(kept["response"]), kept["response"]
        assert (await in_thread(clients["alpha"].responses.retrieve, "resp_same")).output_text == "alpha" * 3
    finally:
        for client in clients.values():
            client.close()


@pytest_twisted.ensureDeferred
async def test_a_batch_lines_item_reference_goes_to_the_instance_holding_the_conversation_as_the_item_it_names(keyed):
    """A C{/v1/responses} batch line continuing a conversation its instance still holds sends each
    C{item_reference} naming an item of that conversation as the item, as an online follow-up does (vLLM does not
    resolve it); before, it went as it came."""
    from tests.test_keys import batch_of

    gw, vllm = keyed
    client = openai_client(gw, MASTER)
    try:
        first = await in_thread(client.responses.create, model=MODEL,
                                input=[{"role": "user", "content": "my name is Ada", "id": "msg_ada"}])
        done = await batch_of(gw, client, "/v1/responses", [
            {"model": MODEL, "previous_response_id": first.id,
             "input": [{"type": "item_reference", "id": "msg_ada"}, {"role": "user", "content": "who am I?"}]}])
        assert (done.status, done.request_counts.completed) == ("completed", 1)
        sent = vllm.forwarded()[-1].body
        assert sent["previous_response_id"] == first.id  # (its instance holds the conversation)
        assert sent["input"] == [{"role": "user", "content": "my name is Ada"},
                                 {"role": "user", "content": "who am I?"}], sent["input"]
    finally:
        client.close()

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
            sent = len(fake.requests)
            for previous in (third.id, first.id):
                with pytest.raises(openai.BadRequestError) as refused:
                    await in_thread(client.responses.create, model=MODEL, input="who am I?",
                                    previous_response_id=previous)
                error = refused.value.body
                assert (error["param"], error["code"]) == ("previous_response_id", "previous_response_not_found")
                assert first.id in error["message"], error
            assert [r.path for r in fake.requests[sent:]] == ([b"/v1/responses"] * 2 if native else [])
        finally:
            client.close()
            await gw.service.stopService()
            await fake.stop()


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

    sent = len(vllm.requests)
    for key in (MASTER, alpha["value"]):
        for previous in (first.id, second.id):
            answer = await send(key, previous)
            error = json.loads(await treq.content(answer))["error"]
            assert (answer.code, error["param"], error["code"]) == (400, "previous_response_id",
                                                                   "previous_response_not_found"), error
    assert len(vllm.requests) == sent  # nothing reached the instance
    answer = await send(MASTER, other.id)  # a conversation with no turn deleted goes raw, as it came
    assert answer.code == 200 and json.loads(await treq.content(answer))["previous_response_id"] == other.id
    answer = await send(MASTER, second.id, "/v1/responses", MODEL)  # sent explicitly, without the deleted turn
    assert answer.code == 200, await treq.content(answer)
    await treq.content(answer)
    assert "forget me" not in json.dumps(vllm.requests[-1].body["input"])


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
                sent = fake.requests[-1].body
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
            before = len(fake.requests)
            asks = [{"previous_response_id": first.id}] + ([] if native else [{}])
            for extra in asks:
                with pytest.raises(openai.BadRequestError) as refused:
                    await in_thread(client.responses.create, model=MODEL, **extra,
                                    input=[{"role": "user", "content": "hi"}, {"type": "item_reference", "id": "msg_nope"}])
                error = refused.value.body
                assert error["param"] == "input" and "msg_nope" in error["message"], error
                assert refused.value.status_code == 400 and refused.value.body["type"] == "invalid_request_error"
            if native:
                assert len(fake.requests) == before + 1  # (its instance still holds it: no explicit send)
            else:
                assert len(fake.requests) == before
        finally:
            client.close()
            await gw.service.stopService()
            await fake.stop()

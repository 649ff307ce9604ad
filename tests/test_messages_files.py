"""Anthropic's Files API (C{anthropic-beta: files-api-2025-04-14}) on the gateway's C{/v1/files}: the official
anthropic SDK over real sockets, and messages that name an uploaded file."""

import base64
import json

import anthropic
import pytest
import pytest_twisted
import treq
from twisted.web.http_headers import Headers

from gomodel.anthropic.file_sources import walk_blocks
from gomodel.anthropic.translate import check_tool_choice_and_metadata
from gomodel.errors import InvalidRequest
from tests.fakes.vllm import CHAT_MODEL
from tests.support import in_thread, start_gateway

KEY = "anthropic-files-key"
BETA = {"anthropic-beta": "files-api-2025-04-14"}
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
                       "AAAABJRU5ErkJggg==")


@pytest_twisted.async_yield_fixture()
async def gw(reactor, fake, tmp_path):
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": KEY,
                                            "GOMODEL_DATA_DIR": str(tmp_path)})
    yield gateway
    await gateway.service.stopService()


@pytest.fixture
def client(gw):
    c = anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0, timeout=10, default_headers=BETA)
    yield c
    c.close()


def anthropic_headers(**extra):
    values = {"x-api-key": [KEY], "anthropic-version": ["2023-06-01"], **{k: [v] for k, v in BETA.items()}}
    values.update({k: [v] for k, v in extra.items()})
    return Headers(values)


@pytest_twisted.ensureDeferred
async def test_the_sdk_uploads_lists_retrieves_downloads_and_deletes_files_in_anthropics_shape(http, gw, client):
    """An Anthropic client gets Anthropic's file objects (C{type: file}, C{mime_type}, C{size_bytes}, an RFC 3339
    C{created_at}), its list page and its deletion answer; before, its upload (no C{purpose}: Anthropic has none)
    was OpenAI's 400, and its list OpenAI's objects."""
    notes = await in_thread(client.beta.files.upload, file=("notes.txt", b"hello files", "text/plain"))
    image = await in_thread(client.beta.files.upload, file=("pixel.png", PNG, "image/png"))
    assert notes.type == "file"
    assert (notes.filename, notes.mime_type, notes.size_bytes, notes.downloadable) == (
        "notes.txt", "text/plain", 11, True)
    assert notes.created_at.tzinfo is not None
    assert (image.mime_type, image.size_bytes) == ("image/png", len(PNG))

    retrieved = await in_thread(client.beta.files.retrieve_metadata, notes.id)
    assert retrieved.model_dump() == notes.model_dump()
    listed = await in_thread(lambda: [f.id for f in client.beta.files.list()])
    assert listed == [image.id, notes.id]  # newest first
    paged = await in_thread(lambda: [f.id for f in client.beta.files.list(limit=1)])  # the SDK follows next_page
    assert paged == [image.id, notes.id]

    response = await http.get(f"{gw.url}/v1/files?limit=1", headers=anthropic_headers())
    page = json.loads(await treq.content(response))
    assert (page["first_id"], page["last_id"], page["has_more"]) == (image.id, image.id, True)
    response = await http.get(f"{gw.url}/v1/files?after_id={image.id}", headers=anthropic_headers())
    assert [f["id"] for f in json.loads(await treq.content(response))["data"]] == [notes.id]
    response = await http.get(f"{gw.url}/v1/files?before_id={notes.id}", headers=anthropic_headers())
    assert [f["id"] for f in json.loads(await treq.content(response))["data"]] == [image.id]

    downloaded = await in_thread(client.beta.files.download, notes.id)
    assert downloaded.read() == b"hello files"

    deleted = await in_thread(client.beta.files.delete, notes.id)
    assert (deleted.id, deleted.type) == (notes.id, "file_deleted")
    with pytest.raises(anthropic.NotFoundError) as missing:
        await in_thread(client.beta.files.retrieve_metadata, notes.id)
    assert missing.value.body["type"] == "error"
    assert missing.value.body["error"]["type"] == "not_found_error"
    assert missing.value.response.headers.get("request-id")


@pytest_twisted.ensureDeferred
async def test_anthropic_file_errors_are_anthropics(http, gw):
    """A refusal of an Anthropic client's files request (no key, no file part, a bad limit) is in Anthropic's
    envelope with its type, as the SDK reads it."""
    boundary = "b0undary"
    body = f"--{boundary}\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n--{boundary}--\r\n".encode()
    response = await http.post(gw.url + "/v1/files", data=body, headers=anthropic_headers(
        **{"content-type": f"multipart/form-data; boundary={boundary}"}))
    error = json.loads(await treq.content(response))
    assert response.code == 400
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    response = await http.get(gw.url + "/v1/files", headers=Headers({"anthropic-version": ["2023-06-01"]}))
    error = json.loads(await treq.content(response))
    assert response.code == 401 and error["error"]["type"] == "authentication_error"
    assert response.headers.getRawHeaders("request-id")
    response = await http.get(gw.url + "/v1/files?limit=0", headers=anthropic_headers())
    error = json.loads(await treq.content(response))
    assert response.code == 400 and error["error"]["type"] == "invalid_request_error"
    response = await http.get(gw.url + "/v1/files/file-nope", headers=anthropic_headers())
    assert response.code == 404 and json.loads(await treq.content(response))["error"]["type"] == "not_found_error"


# -- messages that name a file --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_message_naming_uploaded_files_reaches_the_model_with_their_contents(gw, fake, client):
    """An C{image} or C{document} block whose source is C{{"type": "file", "file_id"}} (what Anthropic's Files API is
    for) reaches the upstream as its contents: the image in base64, a text file as its text; before, a document's
    was a 400 and an image's went to vLLM as it came, naming a file vLLM does not have."""
    notes = await in_thread(client.beta.files.upload, file=("notes.txt", b"The code word is heron.", "text/plain"))
    image = await in_thread(client.beta.files.upload, file=("pixel.png", PNG, "image/png"))
    content = [{"type": "image", "source": {"type": "file", "file_id": image.id}},
               {"type": "text", "text": "What is in the picture?"}]
    message = await in_thread(client.messages.create, model=f"vllm/{CHAT_MODEL}", max_tokens=16,
                              messages=[{"role": "user", "content": content}])
    assert message.stop_reason
    sent = fake.last_request()
    assert sent.path == b"/v1/messages"
    assert sent.body["messages"][0]["content"][0]["source"] == {
        "type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()}

    counted = await in_thread(client.messages.count_tokens, model=f"vllm/{CHAT_MODEL}",
                              messages=[{"role": "user", "content": content}])
    assert counted.input_tokens > 0
    sent = fake.last_request()
    assert sent.path == b"/v1/messages/count_tokens"
    assert sent.body["messages"][0]["content"][0]["source"]["type"] == "base64"

    content = [{"type": "document", "source": {"type": "file", "file_id": notes.id}},
               {"type": "text", "text": "What is the code word?"}]
    await in_thread(client.messages.create, model=f"vllm/{CHAT_MODEL}", max_tokens=16,
                    messages=[{"role": "user", "content": content}])
    sent = fake.last_request()
    assert sent.path == b"/v1/chat/completions"  # (a document goes translated)
    assert sent.body["messages"][0]["content"][0] == {"type": "text", "text": "The code word is heron."}


@pytest_twisted.ensureDeferred
async def test_a_message_naming_a_file_it_cannot_use_is_a_400_naming_the_block(gw, fake, client):
    """A file that does not exist (or that another tenant owns), that is no image where an image is wanted, or
    that is named a PDF but holds none (no C{%PDF-} at its start: it went upstream as a PDF, for the model
    server's own error), is Anthropic's 400 C{invalid_request_error} naming the block; nothing goes upstream."""
    notes = await in_thread(client.beta.files.upload, file=("notes.txt", b"just text", "text/plain"))
    fake_pdf = await in_thread(client.beta.files.upload, file=("report.pdf", b"just text", "application/pdf"))
    sent = len(fake.forwarded())
    cases = [({"type": "image", "source": {"type": "file", "file_id": "file-nope"}}, "messages.0.content.0"),
             ({"type": "document", "source": {"type": "file", "file_id": fake_pdf.id}}, "messages.0.content.0"),
             ({"type": "image", "source": {"type": "file", "file_id": notes.id}}, "messages.0.content.0"),
             ({"type": "document", "source": {"type": "file"}}, "messages.0.content.0"),
             ({"type": "tool_result", "tool_use_id": "t1", "content": [
                 {"type": "image", "source": {"type": "file", "file_id": "file-nope"}}]},
              "messages.2.content.0.content.0")]
    for block, where in cases:
        messages = [{"role": "user", "content": [block]}]
        if block["type"] == "tool_result":
            messages = [{"role": "user", "content": "Go."},
                        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                        {"role": "user", "content": [block]}]
        with pytest.raises(anthropic.BadRequestError) as refused:
            await in_thread(client.messages.create, model=f"vllm/{CHAT_MODEL}", max_tokens=16, messages=messages)
        assert refused.value.body["error"]["type"] == "invalid_request_error"
        assert where in refused.value.body["error"]["message"], (block, refused.value.body)
        if block.get("source", {}).get("file_id") == fake_pdf.id:
            assert "%PDF-" in refused.value.body["error"]["message"], refused.value.body
    assert len(fake.forwarded()) == sent


@pytest_twisted.ensureDeferred
async def test_a_message_batch_naming_uploaded_files_sends_their_contents(gw, fake, client):
    """A message batch's requests may name uploaded files as an online request does: each line goes upstream with
    the file's contents (read when the batch is made); a file the key has not is the batch's 400, naming the
    request. Before, an image's line went to vLLM naming a file it has not, and a document's line errored."""
    image = await in_thread(client.beta.files.upload, file=("pixel.png", PNG, "image/png"))
    content = [{"type": "image", "source": {"type": "file", "file_id": image.id}}, {"type": "text", "text": "What?"}]
    made = await in_thread(client.messages.batches.create, requests=[{"custom_id": "one", "params": {
        "model": f"vllm/{CHAT_MODEL}", "max_tokens": 16, "messages": [{"role": "user", "content": content}]}}])
    await gw.service.batch_runner.settled(made.id)
    [result] = await in_thread(lambda: list(client.messages.batches.results(made.id)))
    assert result.result.type == "succeeded"
    [sent] = [r for r in fake.requests if r.path == b"/v1/messages"]
    assert sent.body["messages"][0]["content"][0]["source"] == {
        "type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()}

    content[0]["source"]["file_id"] = "file-nope"
    with pytest.raises(anthropic.BadRequestError) as refused:
        await in_thread(client.messages.batches.create, requests=[{"custom_id": "two", "params": {
            "model": f"vllm/{CHAT_MODEL}", "max_tokens": 16, "messages": [{"role": "user", "content": content}]}}])
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert "requests.0.params.messages.0.content.0.source.file_id" in refused.value.body["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_the_list_restricted_to_ids_answers_those_files_only(http, gw, client):
    """The SDK's C{files.list(ids=[...])} (C{ids[]=...}): those of the files that exist for the key, in the order
    asked, in one page; before, C{ids} was ignored and every file listed."""
    made = [await in_thread(client.beta.files.upload, file=(f"{n}.txt", b"x", "text/plain")) for n in range(3)]
    page = await in_thread(client.beta.files.list, ids=[made[2].id, "file-nope", made[0].id, made[2].id])
    assert [f.id for f in page.data] == [made[2].id, made[0].id]
    assert page.next_page is None and page.has_more is False
    for query in ("&limit=5", "&page=page_" + made[0].id):
        response = await http.get(f"{gw.url}/v1/files?ids[]={made[0].id}{query}", headers=anthropic_headers())
        error = json.loads(await treq.content(response))
        assert response.code == 400 and error["error"]["type"] == "invalid_request_error"
    many = "&".join(f"ids[]=file-{n}" for n in range(101))
    response = await http.get(f"{gw.url}/v1/files?{many}", headers=anthropic_headers())
    assert response.code == 400


def test_a_tool_choice_is_checked_without_a_second_walk_where_the_one_walk_found_no_tool_change():
    """A create's tool choice that asks for a tool (C{any}, C{tool}) is checked against the tools as the system
    messages' tool changes leave them; where the route's one walk of the blocks (L{walk_blocks}) found nothing it
    sends translated, so no tool change, the messages are not walked again for them (before, they were)."""
    class Walks(list):
        walks = 0

        def __iter__(self):
            Walks.walks += 1
            return super().__iter__()

    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    for choice in ({"type": "any"}, {"type": "tool", "name": "f"}):
        body = {"tools": tools, "tool_choice": choice, "messages": Walks([{"role": "user", "content": "Hi."}] * 3)}
        Walks.walks = 0
        check_tool_choice_and_metadata(body, walk_blocks(body, files=False)[1])
        assert Walks.walks == 1
        check_tool_choice_and_metadata(body)  # (no walk said: looked for)
        assert Walks.walks == 2
    removal = {"role": "system", "content": [{"type": "tool_removal", "tool": {"type": "tool_reference", "name": "f"}}]}
    body = {"tools": tools, "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "Hi."}, removal]}
    with pytest.raises(InvalidRequest, match="may only be specified while providing tools"):
        check_tool_choice_and_metadata(body, walk_blocks(body, files=False)[1])


def test_one_walk_finds_file_sources_and_the_blocks_that_go_translated():
    # One walk of a conversation's blocks finds all three (create used to walk them twice): the file sources, in a
    # message and in a tool result, whether a document or search result (anywhere) or a prefill sends it
    # translated, and the tool results that say their tool failed (is_error: their text says so natively too).
    named = {"type": "image", "source": {"type": "file", "file_id": "file_1"}}
    inner = {"type": "document", "source": {"type": "file", "file_id": "file_2"}}
    messages = [{"role": "user", "content": "Hi."},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [inner]},
                                             {"type": "text", "text": "and"}, named]}]
    assert walk_blocks({"messages": messages}) == (
        [("messages.2.content.0.content.0", inner), ("messages.2.content.2", named)], True, [])
    assert walk_blocks({"messages": messages}, files=False) == ([], True, [])
    search = {"type": "search_result", "source": "s", "title": "t", "content": [{"type": "text", "text": "x"}]}
    for where in ([search], [{"type": "tool_result", "tool_use_id": "t1", "content": [search]}]):
        assert walk_blocks({"messages": [{"role": "user", "content": where}]}) == ([], True, [])
    assert walk_blocks({"messages": [{"role": "user", "content": [named, "odd", {"type": 1}, {"type": ["image"]}]}]}) == (
        [("messages.0.content.0", named)], False, [])
    assert walk_blocks({"messages": "no list"}) == ([], False, [])
    # a system message's tool change (Claude Code's when an MCP server connects) sends it translated too, in the
    # same walk (before, has_tool_changes walked the messages again); a user's is no tool change
    change = {"type": "tool_addition", "tool_name": "f"}
    assert walk_blocks({"messages": [{"role": "system", "content": [change]}, *messages[:1]]}, files=False) == (
        [], True, [])
    assert walk_blocks({"messages": [{"role": "user", "content": [change]}]}) == ([], False, [])
    # an empty text block sends it translated (where it is Anthropic's 400), alone, beside others or the
    # assistant's (before, only a user message of nothing but empty text); a system message's is left out there
    empty = {"type": "text", "text": ""}
    for message in ({"role": "user", "content": [empty, empty]},
                    {"role": "user", "content": [empty, {"type": "text", "text": "Hi."}]},
                    {"role": "user", "content": [{"type": "text", "text": "Hi."}, empty]},
                    {"role": "assistant", "content": [empty]}):
        assert walk_blocks({"messages": [message, *messages[:1]]}) == ([], True, []), message
    for message in ({"role": "system", "content": [empty]},
                    {"role": "user", "content": [{"type": "text", "text": " "}, {"type": "text"}]}):
        assert walk_blocks({"messages": [message, *messages[:1]]}) == ([], False, []), message
    # so do a message's text blocks of nothing but whitespace, a user's string of it, an empty text block in a tool
    # result, and a system prompt's empty or blank blocks (Anthropic's 400s); not a blank block beside a text
    blank, hi = {"type": "text", "text": " \n"}, {"type": "text", "text": "Hi."}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": [hi, empty]}
    for body in ({"messages": [{"role": "user", "content": [blank, blank]}]},
                 {"messages": [{"role": "assistant", "content": [blank, messages[1]["content"][0]]}, *messages[:1]]},
                 {"messages": [{"role": "user", "content": "\t"}]},
                 {"messages": [{"role": "user", "content": [result]}]},
                 {"system": [hi, empty], "messages": messages[:1]}, {"system": [blank], "messages": messages[:1]},
                 {"system": " ", "messages": messages[:1]}):
        assert walk_blocks(body) == ([], True, []), body
    for body in ({"messages": [{"role": "user", "content": [blank, hi]}]},
                 {"system": [blank, hi], "messages": messages[:1]}, {"system": "", "messages": messages[:1]}):
        assert walk_blocks(body) == ([], False, []), body
    # so does an empty user or assistant message ("", []: Anthropic's other 400), and an assistant's string of
    # whitespace; not a system message's
    for content in ("", [], " "):
        assert walk_blocks({"messages": [{"role": "user", "content": content}]}) == ([], True, [])
        assert walk_blocks({"messages": [{"role": "assistant", "content": content}, *messages[:1]]}) == (
            [], True, [])
        assert walk_blocks({"messages": [{"role": "system", "content": content}, *messages[:1]]}) == (
            [], False, [])
    # and a prefill (the last message the assistant's: its answer continues it), found before the walk, which then
    # looks only for file sources and failed tool results
    assert walk_blocks({"messages": messages[:2]}, files=False) == ([], True, [])
    assert walk_blocks({"messages": [*messages[:1], {"role": "assistant", "content": [empty]}]}) == ([], True, [])
    assert walk_blocks({"messages": [*messages, {"role": "assistant", "content": "I"}]}) == (
        [("messages.2.content.0.content.0", inner), ("messages.2.content.2", named)], True, [])
    assert walk_blocks({"messages": []}) == ([], False, [])
    failed = {"type": "tool_result", "tool_use_id": "t1", "content": [inner], "is_error": True}
    results = [{"type": "tool_result", "tool_use_id": "t0", "is_error": False}, failed]
    assert walk_blocks({"messages": messages[:2] + [{"role": "user", "content": results}]}, files=False) == (
        [], True, [(2, 1)])

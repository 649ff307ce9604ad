"""The one error funnel: dialects, and no envelope after a response started (D4)."""

import json

import pytest_twisted
from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from gomodel import errors
from gomodel.http import render
from gomodel.http.front import FrontResource
from gomodel.http.site import GatewaySite
from tests.rawclient import connect
from tests.support import with_timeout


def test_openai_and_anthropic_dialects():
    error = errors.ModelNotFound("x")
    assert json.loads(render.OPENAI.body(error))["error"]["code"] == "model_not_found"
    assert json.loads(render.ANTHROPIC.body(error)) == {
        "type": "error", "error": {"type": "not_found_error", "message": error.message}}
    assert json.loads(render.ANTHROPIC.body(errors.UpstreamTimeout("slow")))["error"]["type"] == "timeout_error"
    assert json.loads(render.ANTHROPIC.body(errors.UpstreamUnreachable("down")))["error"]["type"] == "api_error"
    assert render.ANTHROPIC.stream_event(errors.StreamFailed("broke")).startswith(b"event: error\ndata: {")
    upstream = errors.UpstreamError(400, b'{"type":"error","error":{"type":"invalid_request_error"}}', "m")
    assert render.ANTHROPIC.body(upstream) == upstream.body()  # relayed as the provider sent it


def test_a_responses_streams_error_event_is_openais_numbered_after_the_last_event_sent():
    from gomodel.proxy.sse import ResponsesStreamObserver

    error = errors.StreamFailed("The stream ended abnormally.")
    assert render.RESPONSES.body(error) == render.OPENAI.body(error)
    observer = ResponsesStreamObserver()
    observer.feed(b'event: response.created\ndata: {"type":"response.created","sequence_number":0}\n\n'
                  b'event: response.in_progress\ndata: {"type":"response.in_progress","sequence_number": 1}\n\n'
                  b'event: response.output_item.added\ndata: {"type":"response.output')  # (not whole: not sent)
    event = render.RESPONSES.stream_event(error, observer)
    assert event.startswith(b"event: error\ndata: {") and event.endswith(b"}\n\n")
    assert json.loads(event.split(b"data: ", 1)[1]) == {"type": "error", "code": "stream_incomplete", "param": None,
                                                      "message": "The stream ended abnormally.", "sequence_number": 2}
    # (where no event said its number, none is made up)
    assert "sequence_number" not in json.loads(render.RESPONSES.stream_event(error).split(b"data: ", 1)[1])
    assert render.OPENAI.stream_event(error, observer) == b"data: " + error.body() + b"\n\n"  # (chat's, as it was)


def test_fail_renders_before_the_response_started():
    request = DummyRequest([b""])
    body = render.fail(request, Failure(errors.InvalidRequest("bad")))
    assert request.responseCode == 400 and json.loads(body)["error"]["message"] == "bad"
    assert render.fail(request, Failure(CancelledError())) is None


class _Aborting:
    aborted = False

    def abortConnection(self):
        self.aborted = True


def test_fail_after_the_response_started_aborts_instead_of_appending(logged_errors):
    request = DummyRequest([b""])
    request.path = b"/v1/batches/b/results"
    request.channel = DummyChannel()
    request.channel.transport = _Aborting()
    request.startedWriting = True
    assert render.fail(request, Failure(errors.StorageUnavailable("disk"))) is None
    assert request.channel.transport.aborted
    assert render.fail(request, Failure(RuntimeError("bug"))) is None
    assert logged_errors.flush(RuntimeError) == 1


class _Routes:
    app = Klein()

    @app.route("/pages")
    async def pages(self, request):
        from twisted.internet import reactor

        request.setHeader(b"content-type", b"application/jsonl")
        request.write(b'{"line": 1}\n')
        await deferLater(reactor, 0.05, lambda: None)  # page 1 reaches the client
        raise errors.StorageUnavailable("the store failed on page 2")

    @app.route("/a/b")  # this map merges slashes (werkzeug's default): /a//b is a redirect to werkzeug
    def merged(self, request):
        return b"merged"

    render.install(app)


async def _serve(reactor, exact=None):
    front = FrontResource(_Routes().app.resource(), Clock(), exact=exact or {})
    return await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(GatewaySite(front, 1024 * 1024))


@pytest_twisted.ensureDeferred
async def test_klein_route_failing_after_its_first_write_is_cut_not_completed(reactor):
    port = await _serve(reactor)
    try:
        client = await connect(reactor, port.getHost().port, b"GET /pages HTTP/1.1\r\nHost: x\r\n\r\n")
        await with_timeout(reactor, client.lost, 10)
        received = bytes(client.received)
        assert received.startswith(b"HTTP/1.1 200 ") and b'{"line": 1}' in received
        assert b"storage_unavailable" not in received and not received.endswith(b"0\r\n\r\n")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_exact_route_failing_after_its_first_write_is_cut_not_completed(reactor):
    async def handler(request, ctx):
        request.write(b"partial")
        await deferLater(reactor, 0.05, lambda: None)
        raise errors.BadUpstreamResponse("late")

    port = await _serve(reactor, {b"/v1/x": handler})
    try:
        client = await connect(reactor, port.getHost().port,
                               b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        await with_timeout(reactor, client.lost, 10)
        received = bytes(client.received)
        assert b"partial" in received and b"bad_upstream_response" not in received
        assert not received.endswith(b"0\r\n\r\n")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_werkzeug_redirect_is_a_404_that_names_no_host(reactor):
    port = await _serve(reactor)
    try:
        client = await connect(reactor, port.getHost().port,
                               b"GET /a//b HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        await with_timeout(reactor, client.lost, 10)
        head, _, body = bytes(client.received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404 ") and b"location:" not in head.lower()
        assert json.loads(body)["error"] == {"message": "Unknown route: GET /a//b.", "type": "invalid_request_error",
                                             "param": None, "code": "not_found"}
    finally:
        await port.stopListening()

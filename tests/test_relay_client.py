"""The relay client: each URL and method is checked once, then kept for the next request; upstreams given by
IPv4 address, IPv6 address or name."""

import re

import openai
import pytest
import pytest_twisted
import treq

from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web.iweb import UNKNOWN_LENGTH

from gomodel.upstream import client
from gomodel.upstream.client import CachingEndpointFactory, RelayClient, make_pool, tcp_endpoint
from tests.support import in_thread, openai_client, start_fake, start_gateway


@pytest_twisted.ensureDeferred
async def test_a_url_checked_once_serves_every_request_after_it(reactor):
    fake = await start_fake(reactor)
    pool = make_pool(reactor, 4, 30.0)
    relay = RelayClient(pool, CachingEndpointFactory(reactor, 5.0))
    url = (fake.base_url + "/models").encode("ascii")
    try:
        for method in (b"GET", b"GET", b"HEAD"):  # (the fake answers a HEAD 404)
            response = await relay.request(method, url, b"Accept: application/json\r\n", None)
            body = await treq.content(response)
            assert (response.code, b'"object":"list"' in body) == ((200, True) if method == b"GET" else (404, False))
        assert [(r.method, r.path) for r in fake.requests] == [(b"GET", b"/v1/models")] * 2 + [(b"HEAD", b"/v1/models")]
        assert list(relay._urls) == [url] and relay._methods == {b"GET", b"HEAD"}
    finally:
        await pool.closeCachedConnections()
        await fake.stop()


@pytest.mark.parametrize("method,url,why", [
    (b"GET", b"ftp://127.0.0.1/v1/models", "not an http"),
    (b"GET", b"http://127.0.0.1:9/v1/models?a b", "invalid request target"),
    (b"G ET", b"http://127.0.0.1:9/v1/models", "invalid method"),
    (b"GET\r\n", b"http://127.0.0.1:9/v1/models", "invalid method"),
])
def test_a_url_or_method_a_request_line_cannot_carry_is_refused_before_anything_is_sent(reactor, method, url, why):
    relay = RelayClient(None, CachingEndpointFactory(reactor, 5.0))  # no pool: nothing may be sent
    with pytest.raises(ValueError, match=why):
        relay.request(method, url, b"", None)
    assert method not in relay._methods
    assert url not in relay._urls or why == "invalid method"  # a good URL stays checked


def test_the_urls_kept_are_bounded(reactor, monkeypatch):
    monkeypatch.setattr(client, "URLS_KEPT", 3)
    relay = RelayClient(None, CachingEndpointFactory(reactor, 5.0))
    for i in range(5):
        relay._check(b"http://127.0.0.1:9/v1/models?page=%d" % i)
    assert len(relay._urls) <= 3


@pytest.mark.parametrize("host,kind,address", [
    (b"127.0.0.1", TCP4ClientEndpoint, "127.0.0.1"),
    (b"::1", TCP6ClientEndpoint, "::1"),  # (a URI's host: http://[::1]:8000)
    (b"fd00::5", TCP6ClientEndpoint, "fd00::5"),
    (b"localhost", HostnameEndpoint, None),
    (b"vllm-0.vllm.svc", HostnameEndpoint, None),
    (b"not:an:address", HostnameEndpoint, None),
])
def test_an_ip_address_is_connected_to_directly_and_a_name_looked_up(reactor, host, kind, address):
    endpoint = tcp_endpoint(reactor, host, 8000, 5.0)
    assert type(endpoint) is kind
    if address is not None:
        assert (endpoint._host, endpoint._port, endpoint._timeout) == (address, 8000, 5.0)


@pytest_twisted.ensureDeferred
async def test_an_upstream_named_or_given_by_address_is_served_on_new_connections(reactor):
    fake = await start_fake(reactor)
    pool = make_pool(reactor, 4, 30.0)
    relay = RelayClient(pool, CachingEndpointFactory(reactor, 5.0))
    try:
        for base in (fake.base_url, fake.base_url.replace("127.0.0.1", "localhost")):
            await pool.closeCachedConnections()  # each request on a connection of its own endpoint
            response = await relay.request(b"GET", (base + "/models").encode("ascii"), b"", None)
            assert response.code == 200 and b'"object":"list"' in await treq.content(response)
        assert len(fake.requests) == 2
    finally:
        await pool.closeCachedConnections()
        await fake.stop()


@pytest.mark.parametrize("url,host_line", [
    (b"http://[::1]:8000/v1/models", b"Host: [::1]:8000\r\n"),
    (b"http://[fd00::5]/v1/models", b"Host: [fd00::5]\r\n"),
    (b"http://10.0.0.5:8000/v1/models", b"Host: 10.0.0.5:8000\r\n"),
    (b"http://vllm-0.vllm.svc/v1/models", b"Host: vllm-0.vllm.svc\r\n"),
])
def test_the_host_line_names_an_ipv6_address_in_brackets(reactor, url, host_line):
    relay = RelayClient(None, CachingEndpointFactory(reactor, 5.0))
    origin, target = relay._check(url)
    assert (origin.host_line, target) == (host_line, b"/v1/models")


@pytest_twisted.ensureDeferred
async def test_an_upstream_given_by_ipv6_address_is_discovered_probed_and_relayed_to(reactor):
    fake = await start_fake(reactor, interface="::1")
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k"})
    sdk = openai_client(gateway, api_key="k")
    try:
        assert fake.base_url.startswith("http://[::1]:")
        completion = await in_thread(sdk.chat.completions.create, model="vllm/meta-llama/Llama-3.1-8B-Instruct",
                                     messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert completion.choices[0].message.content == "héhéhé"
        # its model list and health were asked for (the gateway's own calls) and the chat relayed, each
        # with the address in brackets in its Host header
        paths = {r.path for r in fake.requests}
        assert {b"/v1/models", b"/health", b"/v1/chat/completions"} <= paths
        assert {r.header(b"host") for r in fake.requests} == {fake.root_url.removeprefix("http://")}
    finally:
        sdk.close()
        await gateway.service.stopService()
        await fake.stop()


class _Dropping(Protocol):
    """A raw upstream's connection: model lists answered and closed; each chat request answered with keep-alive,
    or (as the server's C{drops} says, one per request in turn) read whole and dropped without an answer."""

    def connectionMade(self):
        self._buffer = b""

    def dataReceived(self, data):
        self._buffer += data
        head, sep, rest = self._buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)) if b"ength:" in head else 0
        if len(rest) < length:
            return
        self._buffer = rest[length:]
        if head.startswith(b"GET"):
            body = b'{"object":"list","data":[{"id":"m","object":"model"}]}'
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.loseConnection()
            return
        self.factory.posts.append(self)
        if self.factory.drops.pop(0):
            self.transport.loseConnection()
            return
        body = b'{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant",' \
               b'"content":"hi"},"finish_reason":"stop"}]}'
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))


async def _dropping_upstream(reactor, drops):
    factory = Factory.forProtocol(_Dropping)
    factory.posts, factory.drops = [], list(drops)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    gateway = await start_gateway(reactor, {"VLLM_BASE_URL": f"http://127.0.0.1:{port.getHost().port}/v1"})
    return factory, port, gateway


def _chat(gateway):
    client = openai_client(gateway)
    try:
        return client.with_options(max_retries=0).chat.completions.create(
            model="vllm/m", messages=[{"role": "user", "content": "hi"}])
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_request_dropped_on_a_new_connection_is_not_sent_again(reactor):
    """An upstream that took a request on a new connection and dropped it without an answer is not sent it
    again (before: once more at once, as for a pooled connection the upstream had closed, so a model could
    generate it twice); the client has a 502 and the request was sent once."""
    factory, port, gateway = await _dropping_upstream(reactor, [True, False])
    try:
        with pytest.raises(openai.APIStatusError) as failed:
            await in_thread(_chat, gateway)
        assert failed.value.status_code == 502
        assert len(factory.posts) == 1
    finally:
        await gateway.service.stopService()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_pooled_connection_the_upstream_closed_is_sent_once_more_on_a_new_one(reactor):
    """A request on a kept connection that the upstream closed as it came (no byte answered) is sent once more,
    on a new connection, and answered: what a stale keep-alive connection needs."""
    factory, port, gateway = await _dropping_upstream(reactor, [False, True, False])
    try:
        first = await in_thread(_chat, gateway)
        again = await in_thread(_chat, gateway)
        assert first.choices[0].message.content == again.choices[0].message.content == "hi"
        posts = factory.posts
        assert len(posts) == 3 and posts[0] is posts[1] and posts[2] is not posts[1]
    finally:
        await gateway.service.stopService()
        await port.stopListening()


def test_a_requests_header_lines_are_its_extras_then_content_type_request_id_and_the_providers_own():
    from gomodel.upstream.openai_compatible import OpenAICompatibleProvider

    provider = OpenAICompatibleProvider.__new__(OpenAICompatibleProvider)  # (only its own lines are read)
    provider._own_lines = b"Authorization: Bearer sk-1\r\nAccept-Encoding: identity\r\n"
    own = provider._own_lines
    assert provider._header_lines(b"r1", None, b"application/json") == (
        b"Content-Type: application/json\r\nX-Request-Id: r1\r\n" + own)
    assert provider._header_lines(b"r1", {}, None) == b"X-Request-Id: r1\r\n" + own
    # a caller's extras first (a value each line), but what the gateway sets itself: the id, the key, a type it gives
    extra = {"OpenAI-Beta": ["a", "b"], "X-Request-Id": ["theirs"], "authorization": ["Bearer x"],
             "Content-Type": ["text/plain"]}
    assert provider._header_lines(b"r2", extra, b"application/json") == (
        b"Openai-Beta: a\r\nOpenai-Beta: b\r\nContent-Type: application/json\r\nX-Request-Id: r2\r\n" + own)
    assert provider._header_lines(b"r2", extra, None) == (
        b"Openai-Beta: a\r\nOpenai-Beta: b\r\nContent-Type: text/plain\r\nX-Request-Id: r2\r\n" + own)
    for bad in (b"r\r\n", b"r\n"):
        with pytest.raises(ValueError):
            provider._header_lines(bad, None, None)


def test_a_protocol_headers_lines_are_those_twisted_sanitises_made_once_a_value():
    from gomodel.http.headers import ProtocolHeaders
    from gomodel.upstream.openai_compatible import OpenAICompatibleProvider, _protocol_line

    provider = OpenAICompatibleProvider.__new__(OpenAICompatibleProvider)  # (only its own lines are read)
    provider._own_lines = b"Authorization: Bearer sk-1\r\nAccept-Encoding: identity\r\n"
    values = {b"anthropic-version": [b"2023-06-01"], b"Anthropic-Beta": [b"a,b", b"c\r\nX-Injected: 1\nd"]}
    made = b"".join(provider._header_lines(b"r1", ProtocolHeaders(values), b"application/json") for _ in range(2))
    # the same lines as any extras' (Twisted's Headers: Header-Case, a CR or LF a space), the second time kept
    expected = (b"Anthropic-Version: 2023-06-01\r\nAnthropic-Beta: a,b\r\nAnthropic-Beta: c X-Injected: 1 d\r\n"
                b"Content-Type: application/json\r\nX-Request-Id: r1\r\n" + provider._own_lines)
    assert provider._header_lines(b"r1", values, b"application/json") == expected and made == expected * 2
    before = _protocol_line.cache_info()
    provider._header_lines(b"r2", ProtocolHeaders(values), None)
    after = _protocol_line.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (3, 0)
    # another value: its own line
    assert provider._header_lines(b"r3", ProtocolHeaders({b"anthropic-version": [b"2023-01-01"]}), None) == (
        b"Anthropic-Version: 2023-01-01\r\nX-Request-Id: r3\r\n" + provider._own_lines)
    # never one of the gateway's own headers, in whatever case
    for name in (b"authorization", b"X-Request-Id", b"content-type"):
        with pytest.raises(ValueError):
            provider._header_lines(b"r4", ProtocolHeaders({name: [b"x"]}), None)


class _Scripted(Protocol):
    """A raw upstream's connection: each request read whole is answered with the next of the server's C{script}
    (bytes written as they are: C{None} in their place closes the connection after them)."""

    def connectionMade(self):
        self._buffer = b""

    def dataReceived(self, data):
        self._buffer += data
        while True:
            head, sep, rest = self._buffer.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)) if b"ength:" in head else 0
            if not sep or len(rest) < length:
                return
            self._buffer = rest[length:]
            self.factory.served.append(self)
            answer, close = self.factory.script.pop(0)
            self.transport.write(answer)
            if close:
                self.transport.loseConnection()
                return


@pytest_twisted.ensureDeferred
async def test_answers_on_a_kept_connection_and_after_a_broken_one_are_each_their_own(reactor):
    """A kept-alive upstream connection reads each answer with the parser of the one before it: the second
    answer (chunked, other headers) has nothing of the first's (its length, its headers); an answer broken off
    mid-body fails, and the next request, on a new connection, is answered whole with only its own headers."""
    factory = Factory.forProtocol(_Scripted)
    factory.served = []
    factory.script = [
        (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-First: 1\r\nContent-Length: 7\r\n\r\n"
         b"{\"a\":1}", False),
        (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-Second: 2\r\n\r\n"
         b"6\r\n{\"b\":2\r\n1\r\n}\r\n0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nX-Cut: 3\r\nContent-Length: 100\r\n\r\n{\"cut", True),
        (b"HTTP/1.1 202 Accepted\r\nX-Fourth: 4\r\nContent-Length: 7\r\n\r\n{\"d\":4}", False),
    ]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    pool = make_pool(reactor, 4, 30.0)
    relay = RelayClient(pool, CachingEndpointFactory(reactor, 5.0))
    url = b"http://127.0.0.1:%d/v1/chat/completions" % port.getHost().port
    seen = []
    try:
        for _ in range(4):
            response = await relay.request(b"POST", url, b"Content-Type: application/json\r\n", b"{}")
            own = sorted(name for name, _ in response.headers.getAllRawHeaders() if name.startswith(b"X-"))
            try:
                body = await treq.content(response)
            except Exception as e:
                body = type(e).__name__
            seen.append((response.code, response.length, own, body))
        assert seen == [
            (200, 7, [b"X-First"], b'{"a":1}'),
            (201, UNKNOWN_LENGTH, [b"X-Second"], b'{"b":2}'),
            (200, 100, [b"X-Cut"], "ResponseFailed"),
            (202, 7, [b"X-Fourth"], b'{"d":4}'),
        ]
        served = factory.served
        assert served[0] is served[1] is served[2] and served[3] is not served[2]
    finally:
        await pool.closeCachedConnections()
        await port.stopListening()

"""The relay client's request line: each URL and method is checked once, then kept for the next request."""

import pytest
import pytest_twisted
import treq

from gomodel.upstream import client
from gomodel.upstream.client import CachingEndpointFactory, RelayClient, make_pool
from tests.support import start_fake


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

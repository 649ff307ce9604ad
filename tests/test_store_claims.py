"""IClaims contract: leases with owners, expiry and fencing tokens (every backend)."""

import pytest_twisted
from zope.interface.verify import verifyObject

from gomodel.store import IClaims
from tests.stores import backend, store  # noqa: F401 (fixtures)


@pytest_twisted.ensureDeferred
async def test_one_owner_at_a_time_until_the_lease_expires(store):
    claims = store.claims
    verifyObject(IClaims, claims)
    first = await claims.claim("sweep", "a", 30)
    assert first is not None
    assert await claims.claim("sweep", "b", 30) is None  # held
    assert await claims.claim("other", "b", 30) is not None  # another duty
    store.clock.advance(20)
    assert await claims.renew("sweep", "a", first, 30) is True  # heartbeat: until 1050
    store.clock.advance(25)
    assert await claims.claim("sweep", "b", 30) is None
    store.clock.advance(10)  # expired: a died
    taken = await claims.claim("sweep", "b", 30)
    assert taken is not None and taken > first  # a new fencing token
    assert await claims.renew("sweep", "a", first, 30) is False  # a's claim is gone
    await claims.release("sweep", "a", first)  # a stale release changes nothing
    assert await claims.claim("sweep", "c", 30) is None
    await claims.release("sweep", "b", taken)
    assert await claims.claim("sweep", "c", 30) > taken  # free at once after a release

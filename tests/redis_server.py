"""The real Redis the tests that need one use (C{GOMODEL_TEST_REDIS_URL}, default 127.0.0.1:6379, db 0)."""

import os
import uuid
from contextlib import contextmanager

import pytest

REDIS_URL = os.environ.get("GOMODEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_client():
    """A redis-py client of the test Redis; the test is skipped (with why) when Redis does not answer."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as e:
        client.close()
        pytest.skip(f"Redis is not reachable at {REDIS_URL} ({e}); these tests need a real Redis")
    return client


@contextmanager
def fresh_prefix(client):
    """A key prefix no other test uses (C{gomodel-test:<hex>}); every key under it is deleted at the end."""
    name = f"gomodel-test:{uuid.uuid4().hex}"
    try:
        yield name
    finally:
        keys = list(client.scan_iter(match=name + "*"))
        if keys:
            client.delete(*keys)

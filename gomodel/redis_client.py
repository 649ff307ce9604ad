"""The gateway's one Redis client (C{REDIS_URL}), shared by the limit counters and the session pins."""

import re

# redis-py names the server in its errors ("Error 111 connecting to 10.0.0.5:6379.", "Timeout reading from
# redis.internal:6379", "connecting to unix socket: /run/redis.sock."); a reason the gateway logs does not.
# (A server is named host:port or by its socket's path: "hash to the same slot" names none.)
_SERVER = re.compile(r"\b(to|from)(?: unix socket:)? (?=\S*[:/])\S+?(?=\.?(?:\s|$))")


def connect(url, timeout=1.0):
    """A C{redis.Redis} for C{url} (C{redis://[:password@]host:port/db}, C{rediss://}, C{unix://}).

    It connects on first use; each command gives up after C{timeout} seconds
    (connecting included), so that an unreachable server costs a caller at
    most that. redis-py is imported only here, and only with C{REDIS_URL}.

    A command refused as C{READONLY} (the server was demoted to a replica: a
    failover, which points the address at the new primary) closes its
    connection and is sent once more on a new one; before, the connections
    stayed on the replica, and every write failed (the limits open) for good.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # (retry_on_error too: redis-py 5 resends only the errors it names, whatever the Retry supports)
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                health_check_interval=30,
                                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ReadOnlyError,)),
                                retry_on_error=[redis.ReadOnlyError])


def check(url):
    """Refuse a URL redis-py cannot read (a port not a number or out of range, an option not its type or one it
    does not know), as a setting's C{ValueError} naming no part of it; else that error came at start as a
    traceback. Nothing connects: redis-py's connection object connects on first use.
    """
    from redis import ConnectionPool

    try:
        ConnectionPool.from_url(url).make_connection()
    except (ValueError, TypeError):
        raise ValueError("must be a redis://, rediss:// or unix:// URL with a port of 1-65535 and options "
                         "redis-py reads (db, socket_timeout, ...)") from None


def reason(error) -> str:
    """C{error} (a redis-py error) in one line, naming neither the server's host nor its port."""
    text = str(error).strip().splitlines()
    if not text:
        return type(error).__name__
    return type(error).__name__ + ": " + _SERVER.sub(r"\1 the server", text[0])

"""The gateway's one Redis client (C{REDIS_URL}), shared by the limit counters and the session pins."""


def connect(url, timeout=1.0):
    """A C{redis.Redis} for C{url} (C{redis://[:password@]host:port/db}, C{rediss://}, C{unix://}).

    It connects on first use; each command gives up after C{timeout} seconds
    (connecting included), so that an unreachable server costs a caller at
    most that. redis-py is imported only here, and only with C{REDIS_URL}.
    """
    import redis

    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                health_check_interval=30)

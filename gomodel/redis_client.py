"""The gateway's one Redis client (C{REDIS_URL}), shared by the limit counters and the session pins: a server (or
the primary of a replicated one), or with C{REDIS_CLUSTER} a node of a Redis Cluster (L{Cluster})."""

import re
import threading

# redis-py names the server in its errors ("Error 111 connecting to 10.0.0.5:6379.", "Timeout reading from
# redis.internal:6379", "connecting to unix socket: /run/redis.sock."); a reason the gateway logs does not.
# (A server is named host:port or by its socket's path: "hash to the same slot" names none.)
_SERVER = re.compile(r"\b(to|from)(?: unix socket:)? (?=\S*[:/])\S+?(?=\.?(?:\s|$))")

# What a client of the wrong kind meets (L{misconfigured}): a cluster node answering a plain client (a key of a
# slot of another node: MOVED or ASK, which name that node; keys of several slots: CROSSSLOT), a server
# without cluster mode answering a cluster client.
_NOT_CLUSTER = "cluster mode is not enabled on this node"
CLUSTER_OFF = "REDIS_URL is a node of a Redis Cluster in cluster mode: set REDIS_CLUSTER=true"
CLUSTER_ON = "REDIS_CLUSTER is set but REDIS_URL is a server without cluster mode: unset REDIS_CLUSTER"


def connect(url, timeout=1.0, cluster=False):
    """A C{redis.Redis} for C{url} (C{redis://[:password@]host:port/db}, C{rediss://}, C{unix://}); with
    C{cluster}, a L{Cluster} of the Redis Cluster C{url} is a node of.

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

    if cluster:
        return Cluster(url, timeout)
    # (retry_on_error too: redis-py 5 resends only the errors it names, whatever the Retry supports)
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                health_check_interval=30,
                                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ReadOnlyError,)),
                                retry_on_error=[redis.ReadOnlyError])


class Cluster:
    """A C{redis.cluster.RedisCluster} of the cluster C{url} is a node of, made at its first command (in the
    thread that sends it): redis-py's connects to learn the cluster's slots as it is made, which at the
    gateway's start would wait on a cluster that cannot be reached, and fail it. Any other method is the
    client's (made when it is called); where it cannot be made, the command fails with its
    C{redis.exceptions.RedisClusterException} (one of L{errors}), and the next command tries again.

    Each command gives up after C{timeout} seconds, and is sent once more (after the client learnt the slots
    anew) where a connection failed: a failover (a replica promoted; a primary demoted answers C{MOVED},
    which redis-py follows, where a server's answers C{READONLY}). A failing command so costs a caller up to
    twice C{timeout}, with the cluster's slots asked for between.
    """

    def __init__(self, url, timeout):
        self._url = url
        self._timeout = timeout
        self._client = None
        self._lock = threading.Lock()
        self.connected = None  # C{redis_connect_func} for each new connection (L{on_connect})

    def client(self):
        """The C{RedisCluster}, made now if need be (it connects: in a thread)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    from redis.backoff import NoBackoff
                    from redis.cluster import RedisCluster
                    from redis.retry import Retry

                    self._client = RedisCluster.from_url(
                        self._url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout,
                        health_check_interval=30, retry=Retry(NoBackoff(), 1), redis_connect_func=self.connected)
                client = self._client
        return client

    def __getattr__(self, name):
        """The client's method C{name}; before the client is made, one that makes it when called (a method is
        taken in the reactor's thread, called in a Redis thread)."""
        client = self._client
        if client is not None:
            return getattr(client, name)
        return lambda *args, **kwargs: getattr(self.client(), name)(*args, **kwargs)

    def register_script(self, script):
        """A C{redis.commands.core.Script} of C{script} on this client (made, and so connected, at its first run)."""
        from redis.commands.core import Script

        return Script(self, script)

    @property
    def connection_pool(self):  # (none: each node has its own; redis-py's Script then asks L{get_encoder})
        raise AttributeError("connection_pool")

    @staticmethod
    def get_encoder():
        """The encoder of the client's commands (redis-py's default, as L{connect} makes it)."""
        from redis.connection import Encoder

        return Encoder("utf-8", "strict", False)

    def close(self):
        """Close the client's connections (none where it was never made)."""
        if self._client is not None:
            self._client.close()


def on_connect(client, func):
    """Have C{func(connection)} set up each new connection of C{client} (L{connect}'s) in place of redis-py's
    C{connection.on_connect()}, as redis-py's C{redis_connect_func}: of every node, with L{Cluster}."""
    if isinstance(client, Cluster):
        client.connected = func
        if client._client is not None:
            client._client.user_on_connect_func = func
    else:
        client.connection_pool.connection_kwargs["redis_connect_func"] = func


def is_cluster(client) -> bool:
    """Whether C{client} (L{connect}'s) is of a Redis Cluster."""
    return isinstance(client, Cluster)


def errors() -> tuple:
    """What redis-py raises where Redis fails: C{RedisError}, and the cluster client's C{RedisClusterException}
    (no cluster node reached, a slot no node serves, a server not in cluster mode)."""
    from redis.exceptions import RedisClusterException, RedisError

    return RedisError, RedisClusterException


def check(url, cluster=False):
    """Refuse a URL redis-py cannot read (a port not a number or out of range, an option not its type or one it
    does not know), as a setting's C{ValueError} naming no part of it; else that error came at start as a
    traceback. Nothing connects: redis-py's connection object connects on first use. With C{cluster}, also one
    a cluster client refuses: a C{unix://} socket, a database other than 0.
    """
    from redis import ConnectionPool
    from redis.connection import parse_url

    try:
        ConnectionPool.from_url(url).make_connection()
    except (ValueError, TypeError):
        raise ValueError("must be a redis://, rediss:// or unix:// URL with a port of 1-65535 and options "
                         "redis-py reads (db, socket_timeout, ...)") from None
    if cluster:
        options = parse_url(url)
        if "path" in options:
            raise ValueError("must be a redis:// or rediss:// URL with REDIS_CLUSTER (a cluster node is reached "
                             "over TCP, not a unix:// socket)")
        if options.get("db"):
            raise ValueError("must name database 0 (or none) with REDIS_CLUSTER: a Redis Cluster has no other")


def tagged(prefix) -> str:
    """C{prefix} (C{REDIS_KEY_PREFIX}) as the keys of a deployment on a Redis Cluster start: with one hash tag,
    so that all its keys are in one slot (the limits' scripts take several at once). As it is where it holds a
    hash tag of its own (a C{{...}} with something between), else in braces: C{gomodel:} gives C{{gomodel:}}
    (one that starts with C{}} takes a C{_} before it: C{{}} tags nothing)."""
    start = prefix.find("{")
    if start >= 0 and prefix.find("}", start + 2) >= 0:
        return prefix
    return "{_" + prefix + "}" if prefix.startswith("}") else "{" + prefix + "}"


def misconfigured(error):
    """Where C{error} (one of L{errors}) is what a client of the wrong kind meets (L{CLUSTER_OFF},
    L{CLUSTER_ON}), that text; else None."""
    from redis.exceptions import AskError, ClusterCrossSlotError, RedisClusterException

    if isinstance(error, (AskError, ClusterCrossSlotError)) or str(error).startswith("CROSSSLOT"):
        return CLUSTER_OFF
    if isinstance(error, RedisClusterException) and _NOT_CLUSTER in str(error).lower():
        return CLUSTER_ON
    return None


def reason(error) -> str:
    """C{error} (a redis-py error) in one line, naming neither the server's host nor its port."""
    from redis.exceptions import AskError

    wrong = misconfigured(error)
    text = [] if isinstance(error, AskError) else str(error).strip().splitlines()  # (MOVED names a node)
    said = type(error).__name__
    if text:
        said += ": " + _SERVER.sub(r"\1 the server", text[0])
    return said if wrong is None else f"{said} ({wrong})"

"""Session affinity pins shared by every gateway process through one Redis (C{REDIS_URL}).

Each provider's pool keeps its pins (a session or conversation key, the
replica that serves it) in memory and chooses from them alone: a request
never waits on Redis for a pin its process knows. L{SharedPins} keeps those
tables alike across processes and hosts:

  - a lease that makes or changes a pin hands it to L{SharedPins.pinned}.
    Pins go out off the reactor, in a small owned thread pool, one Lua script
    at a time: every session pin C{SET} under C{gomodel:pins:<provider>:<key>}
    for L{PIN_TTL} seconds, and all of them in one C{PUBLISH} on
    C{gomodel:pins}; pins made while one write is under way go together in
    the next. A session pin still in use is written again once it is
    L{REFRESH} seconds old, so that it outlives its TTL while it is used;
  - one subscriber thread hands each message to the reactor, which applies
    its pins to the pools in the order Redis published them, the sender's
    own included: two hosts that pin one key at once end up with the same pin
    (the one published last);
  - a session key that a pool does not know is looked up once, before the
    choice (L{SharedPins.recall}), waiting at most L{RECALL_TIMEOUT}, but only
    while the pool may have missed its pin: within L{PIN_TTL} of this
    process's subscription (it started, or connected again, after the
    session did), or of the newest pin the pool had to forget (its table
    holds L{gomodel.routing.pool.AFFINITY_ENTRIES}). Otherwise every stored
    pin was also published to this process and is still in its table: a key
    it does not know is a new session, chosen at once. While a lookup is
    slower than its wait, no other waits for Redis. Conversation keys are
    never looked up: most are new, and a miss would cost every such request a
    round trip.

A replica is named by its provider and base URL, never by its place in the
list, so that hosts listing replicas in another order agree; a pin to a
replica this host does not have is ignored. Keys are hashes (see
L{gomodel.routing.affinity}): no session id or user reaches Redis.

When Redis cannot be reached the pins B{fail open}: each process keeps and
uses its own, as without Redis; a warning is logged (at most every
C{warn_every} seconds), C{failures} counts what was not written or looked
up, and Redis is left alone for C{retry_after} seconds. The subscriber
connects again by itself; pins published meanwhile are not replayed, but
sessions unknown to a host are still found by their lookup.
"""

import threading
import uuid

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gomodel import jsonutil
from gomodel.redis_client import errors, misconfigured, reason
from gomodel.store.threads import OwnedThreads

CHANNEL = "gomodel:pins"
KEY_PREFIX = "gomodel:pins:"
PIN_TTL = 3600  # seconds a stored session pin lives after it was last written
REFRESH = PIN_TTL / 2  # a pin in use is written again once this old
RECALL_TIMEOUT = 0.1  # seconds a request waits at most for its session's stored pin
MAX_PENDING = 10000  # pins waiting for a write, at most (the oldest are dropped)
POLL = 1.0  # seconds the subscriber waits for a message before it looks whether to stop

# KEYS: the session pins' keys. ARGV: ttl (s), channel, message, then each key's replica URL.
_WRITE = """
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[3 + i], 'EX', ARGV[1]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 0
"""


def _session(key) -> bool:
    return key.startswith("s:")


class SharedPins:
    """The pins of C{pools} shared through one Redis (a C{redis.Redis} client).

    L{attach} the pools, L{start}, and L{stop} at the end. See the module
    docstring for what is shared and the fail-open rule.

    @ivar failures: pins not written and lookups not made because Redis failed.
    @ivar misconfigured: why the last failure was one of a client of the wrong kind for the server
        (L{gomodel.redis_client.misconfigured}: C{REDIS_CLUSTER} to set or unset), or None.
    @ivar recall_timeout: seconds a L{recall} waits at most.
    """

    log = Logger()
    refresh_after = REFRESH

    def __init__(self, redis, reactor, *, channel=CHANNEL, key_prefix=KEY_PREFIX, threads=2, retry_after=5.0,
                 warn_every=60.0, recall_timeout=RECALL_TIMEOUT):
        self._redis = redis
        self._reactor = reactor
        self._channel = channel
        self._channel_bytes = channel.encode()
        self._wake_channel = f"{channel}:stop:{uuid.uuid4().hex}"  # this process's own, to stop its subscriber
        self._key_prefix = key_prefix
        self._threads = OwnedThreads(reactor, "gomodel-pins-redis", maxthreads=threads)
        self._retry_after = retry_after
        self._warn_every = warn_every
        self.recall_timeout = recall_timeout
        self._write = redis.register_script(_WRITE)
        self._pools = {}
        self._pending = []  # (provider, key, url) not written yet
        self._writing = False
        self._slow = False  # a lookup outlasted its wait and has not answered yet
        self._down_until = 0.0
        self._warned_at = None
        self._subscribed_at = None  # when the subscriber last subscribed (None while it is not)
        self._running = False
        self._stopping = threading.Event()
        self._thread = None
        self._ended = None
        self.failures = 0
        self.misconfigured = None
        self._errors = errors()

    def attach(self, pools):
        """Share the pins of C{pools} (L{gomodel.routing.pool.ReplicaPool}s, by provider name)."""
        self._pools = {pool.name: pool for pool in pools}

    @property
    def unreachable(self) -> bool:
        """Whether Redis failed within the last C{retry_after} seconds (pins are per process meanwhile)."""
        return self._reactor.seconds() < self._down_until

    # -- running -----------------------------------------------------------------------

    def start(self):
        """Start the write threads and the subscriber."""
        self._running = True
        self._stopping.clear()
        self._threads.start()
        self._ended = Deferred()
        self._thread = threading.Thread(target=self._listen, name="gomodel-pins-subscriber", daemon=True)
        self._thread.start()

    def stop(self) -> Deferred:
        """Stop: pins not written yet are dropped, the subscriber ends and the threads are joined.

        @return: a Deferred firing None once the subscriber thread has ended (within
            the client's timeout, or L{POLL} seconds when Redis does not answer).
        """
        if not self._running:
            return succeed(None)
        self._running = False
        self._pending = []
        self._stopping.set()
        # The subscriber waits on its connection: a message on its own channel wakes it at once.
        wake = self._threads.run(self._redis.publish, self._wake_channel, b"")
        wake.addErrback(self._quietly)
        wake.addBoth(lambda _: self._threads.stop())
        return wake.addCallback(lambda _: self._ended)

    def _quietly(self, failure):
        failure.trap(*self._errors)

    # -- pins made here ----------------------------------------------------------------

    def pinned(self, pool, key, replica):
        """C{pool} pinned C{key} to C{replica} (made or changed, or refreshed): share it."""
        if not self._running:
            return
        if self.unreachable:
            self.failures += 1
            return
        self._pending.append((pool.name, key, replica.base_url))
        if len(self._pending) > MAX_PENDING:
            del self._pending[0]
            self.failures += 1
        if not self._writing:
            self._flush()

    def _flush(self, result=None):
        self._writing = False
        if isinstance(result, Failure):  # not Redis's: a bug, said once per write
            self.log.failure("writing session pins failed", result)
        if not self._pending or not self._running:
            return
        if self.unreachable:
            self.failures += len(self._pending)
            self._pending = []
            return
        batch, self._pending = self._pending, []
        self._writing = True
        d = self._threads.run(self._write_sync, batch)
        d.addErrback(self._failed)
        d.addBoth(self._flush)

    def _write_sync(self, batch):
        keys, urls = [], []
        for provider, key, url in batch:
            if _session(key):
                keys.append(self._key(provider, key))
                urls.append(url)
        self._write(keys=keys, args=[PIN_TTL, self._channel, jsonutil.dumps(batch), *urls])

    def _key(self, provider, key):
        return f"{self._key_prefix}{provider}:{key}"

    # -- pins found in Redis -----------------------------------------------------------

    def recall(self, pool, key):
        """Look up the stored pin of session C{key}, which C{pool} does not know.

        @return: None when there is nothing to wait for (not a session key,
            Redis down, stopped, a lookup already too slow, or a pin this
            process cannot have missed); else a Deferred
            firing None once the pin found (if any) is in C{pool}, or after
            C{recall_timeout} seconds (the lookup still applies its pin when it
            answers). It never fails.
        """
        if not self._running or self._slow or not _session(key) or self.unreachable:
            return None
        now = self._reactor.seconds()
        if self._subscribed_at is not None and now - self._subscribed_at >= PIN_TTL and \
                now - pool.forgotten >= PIN_TTL:
            return None  # every pin stored now was published to this process, and is still known
        timer = None

        def cancel(_):
            if timer.active():
                timer.cancel()

        waiting = Deferred(cancel)
        timer = self._reactor.callLater(self.recall_timeout, self._too_slow, waiting)
        lookup = self._threads.run(self._redis.get, self._key(pool.name, key))
        lookup.addCallbacks(self._recalled, self._failed, callbackArgs=(pool, key))
        lookup.addBoth(self._answered, waiting, timer)
        return waiting

    def _recalled(self, url, pool, key):
        if url is not None and not pool.knows(key):  # a pin published meanwhile is as new
            pool.pin(key, url.decode("utf-8", "replace"))

    def _too_slow(self, waiting):
        self._slow = True
        waiting.callback(None)

    def _answered(self, result, waiting, timer):
        self._slow = False
        if timer.active():
            timer.cancel()
        if not waiting.called:
            waiting.callback(None)
        if isinstance(result, Failure):  # not Redis's: a bug
            self.log.failure("looking up a session pin failed", result)

    # -- pins made elsewhere ----------------------------------------------------------

    def _listen(self):
        """The subscriber thread: every message on the channel goes to the reactor, in order."""
        pubsub = None
        try:
            while not self._stopping.is_set():
                try:
                    if pubsub is None:
                        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                        pubsub.subscribe(self._channel, self._wake_channel)
                        self._reactor.callFromThread(self._subscribed)
                    message = pubsub.get_message(timeout=POLL)
                except self._errors as e:
                    if pubsub is not None:
                        _close(pubsub)
                        pubsub = None
                    if not self._stopping.is_set():
                        self._reactor.callFromThread(self._lost, e)
                        self._stopping.wait(self._retry_after)
                    continue
                if message is not None and message["channel"] == self._channel_bytes:
                    self._reactor.callFromThread(self._received, message["data"])
        finally:
            if pubsub is not None:
                _close(pubsub)
            self._reactor.callFromThread(self._listener_ended)

    def _listener_ended(self):
        self._thread.join()
        self._ended.callback(None)

    def _subscribed(self):
        self._down_until = 0.0
        self._subscribed_at = self._reactor.seconds()

    def _lost(self, error):
        self._subscribed_at = None  # pins published from now on are missed: look sessions up again
        self._down(error)

    def _received(self, data):
        """Apply a message's pins (a JSON list of C{[provider, key, replica URL]}); anything else is ignored."""
        if not self._running:
            return
        try:
            pins = jsonutil.loads(data)
        except ValueError:
            return
        if not isinstance(pins, list):
            return
        pools = self._pools
        for pin in pins:
            if isinstance(pin, list) and len(pin) == 3:
                pool = pools.get(pin[0])
                if pool is not None and isinstance(pin[1], str) and isinstance(pin[2], str):
                    pool.pin(pin[1], pin[2])

    # -- failures -----------------------------------------------------------------------

    def _failed(self, failure):
        failure.trap(*self._errors)
        self.failures += 1
        self._down(failure.value)

    def _down(self, error):
        """Redis failed with C{error} (one of redis-py's): the pins are this process's own for C{retry_after}."""
        self.misconfigured = misconfigured(error)
        now = self._reactor.seconds()
        self._down_until = now + self._retry_after
        if self._warned_at is None or now - self._warned_at >= self._warn_every:
            self._warned_at = now
            self.log.warn("Redis session pins unreachable, each host keeps its own for {retry}s: {error}",
                          retry=self._retry_after, error=reason(error))


def _close(pubsub):
    try:
        pubsub.close()
    except Exception:  # a connection already broken: nothing more to free
        pass

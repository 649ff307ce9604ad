"""A provider as a pool of replicas: their state, their load, and the choice of one per request.

A replica is one server of a provider (one vLLM per GPU or node). It is
C{loading} until it has answered a health check and listed its models,
C{ready} while it serves, C{down} after C{failure_threshold} failures in a
row (connect errors, 5xx without C{Retry-After}, timeouts, failed probes)
until a probe succeeds again and its models are read again, and C{stalled}
while its engine runs requests without generating a token. Only ready
replicas that list the requested model get requests. One that goes down ends
at once its requests still waiting for a response head
(L{gomodel.interfaces.IUpstream.abandon}): they go on to another replica as
if their response-header timeout had passed, rather than wait it out; so
does a stalled one while another ready replica lists every model it does
(its sends so ended count as its failures: enough of them take it down, held
out as below). One
taken down by failed requests while its probes passed (C{/health} answers,
inference fails) is held out: a passing probe readmits it only after
L{Replica.hold} seconds (its health interval, doubling each time it fails
again, up to L{HOLD_MAX}), and then on one trial request (half-open: at most
one in flight) whose success gives it full traffic again and whose failure
takes it down again; a failed probe meanwhile (it was really down) lifts the
hold, and its probes alone decide, as before. One that answers an error with
C{Retry-After} stays ready but is passed over until then while another
replica can start the request (L{Replica.asked_to_wait}); so is one whose
last probe failed, until one passes (L{Replica.doubted}: a host frozen or
gone, whose probes time out one by one, would otherwise take its share of
the new requests until its failures reach the threshold, each of them
waiting meanwhile).

The C{load} strategy scores each candidate by what is known of its load,
freshest first: the gateway's own in-flight count (exact, instant), and the
queue, running count and KV-cache use the replica last reported (its
answers' load header, or the background C{/metrics} scrape) while that
report is fresh. With several gateway processes each one counts only its own
requests in flight, but the replica's reports count everyone's: the score
takes the larger of the two. Each replica's pace is learned from what the
gateway sees: a moving mean of the seconds its successful requests took,
send to end. A replica clearly slower than the fastest candidate (over
L{SLOWER} times its pace, and by more than L{PACE_NOISE} seconds, more while
the event loop runs late: L{gomodel.routing.lag}) takes only
overflow: requests that no faster replica could start at once (each would
wait in its queue, see below). With vLLM's batching a fast replica with a
few more requests running still finishes each far sooner than a slow one
would, and requests sent to a slow one make the tail of the latencies; a
request in a fast replica's queue, though, makes the tail of the first
tokens, so overflow goes to the slow one's free slots. Idle for
L{PACE_REFRESH} seconds, a slow replica gets the next request, so its pace
is learned again (its durations weigh L{RARE_WEIGHT} each) and one that
became fast regains its share. Replicas alike differ in pace by chance, and
count alike. A session (or a conversation, by its opening) stays on the
replica that served it last while that replica's score is within
C{affinity_max_ratio} times (plus C{affinity_slack}) the best one's; a
request of it that overflows to a clearly slower replica does not move its
pin there. With shared pins (L{gomodel.routing.pins}, when C{REDIS_URL} is
set) every pin this pool makes or changes is shared with the other processes
and hosts, whose pins it takes in turn; its choice still reads only its own
table. Before scoring, replicas where a request would wait in vLLM's queue
(the replica reports requests waiting, or the gateway alone has as many in
flight as the replica was seen to run at once: its batch size, learned;
until a replica has shown its own, the largest one seen in its pool) are
left out while another has room in its batch: a warm prefix cache is not
worth a wait in the queue, and that wait is the tail of the first tokens.
When every candidate would queue, the request goes where it would wait least
(its place in the queue times the replica's slowness over its batch size),
whatever its affinity. While no replica of the pool reports its load or has
shown a batch size and none is clearly slower (the pool keeps these as its
replicas learn them), the score is the gateway's own count, as with
C{least_requests}, worked out in one comprehension.

Admission: a replica may have a concurrency limit; when every candidate is
full the request waits in the pool's queue up to C{queue_timeout}, then gets
429 C{replicas_busy}. Waiting requests start first come first served; one
whose candidates are still full holds back none behind it.
"""

import random
from collections import OrderedDict, deque
from itertools import compress, filterfalse, repeat
from operator import attrgetter, eq
from math import inf

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import Logger

from gomodel.errors import InvalidRequest, ModelNotFound, NoReadyReplica, ReplicasBusy, whole_seconds
from gomodel.routing.selectors import qualified
from gomodel.addresses import ModelPath, marks
from gomodel.proxy.renamed import ModelNamed

LOADING, READY, DOWN, STALLED = "loading", "ready", "down", "stalled"
RETRY_AFTER = 1  # seconds a client is told to wait for a busy pool (a not-ready one: L{ReplicaPool._ready_in})
KV_FULL = 0.95  # KV-cache use past which a replica counts as queueing
PACE_SAMPLES = 10  # a replica's pace is the plain mean of its first requests' durations, then a moving mean
PACE_WEIGHT = 1 / PACE_SAMPLES  # weight of one request's duration in that moving mean
RARE_WEIGHT = 0.5  # its weight on a clearly slower replica: it gets few requests, and each says much
SLOWER = 1.5  # pace ratio past which a replica is clearly slower than another (it takes only overflow)
# Seconds of pace between two replicas that are noise, whatever their ratio: every duration the gateway
# measures holds its own event loop's delays (a collection, a burst of other requests) and the network's,
# and with answers of a millisecond or two those alone make one replica of a pool look twice as slow
# as its identical siblings for a while, which would leave it idle (its load still counts, as for all).
PACE_NOISE = 0.05
PACE_REFRESH = 30.0  # seconds after which an idle, clearly slower replica gets a request to learn its pace again
AFFINITY_ENTRIES = 10000  # sessions and prefixes remembered per pool
SIZE_SAMPLES = 50  # a pool's mean max_tokens is the plain mean of the first ones it weighed, then a moving mean
HOLD_MAX = 60.0  # seconds at most that a replica taken down by failed requests is held out (L{Replica.hold})


def clearly_slower(pace, fastest, noise=PACE_NOISE) -> bool:
    """Whether C{pace} is clearly slower than the pace C{fastest}: over L{SLOWER} times it, and by more
    than C{noise} seconds (L{PACE_NOISE}, more while the event loop runs late: L{gomodel.routing.lag})."""
    return pace > SLOWER * fastest and pace - fastest > noise


def _waits(free, queued, batch, slower) -> list:
    """Where every one of C{free} would queue a request: each one's wait (L{Replica.wait}) by
    what it holds (C{queued}), in C{free}'s order, for L{ReplicaPool._choose}."""
    return [r.wait(queued[r], batch, slower.get(r, 1.0)) for r in free]


_in_flight = attrgetter("in_flight")  # (a replica's least_requests score where every weight is 1)


class Replica:
    """One server of a provider and what the gateway knows of it.

    @ivar index: its 0-based place in the provider's replica list.
    @ivar server: its L{gomodel.interfaces.IUpstream}.
    @ivar models: the upstream model ids it listed, or None before it did.
    @ivar load: its last load report (L{gomodel.routing.vllm_metrics.LoadSample}
        or anything with C{waiting}, C{running}, C{kv_cache_usage}), C{load_at}
        when it came.
    @ivar limit: the requests it may have in flight (0: any): its C{max_concurrency}, 1 on L{trial}.
    @ivar held_until: when a replica taken down by failed requests may be readmitted (L{hold}), or None.
    @ivar trial: it was readmitted after a hold on one trial request (half-open), not yet answered.
    @ivar busy_until: when the wait it asked for with C{Retry-After} ends (L{asked_to_wait}), or None.
    @ivar doubted: its last probe failed (it is still ready, its failures below the threshold), or its requests'
        failures reached the threshold while it is its pool's last ready replica (which requests alone never take
        down): its pool passes it over while another replica (or a virtual model's other target) can start the
        request, until a probe passes.
    @ivar unanswered: every request it holds has waited past its monitor's stall timeout for an answer's head, none
        answered meanwhile (a hung engine whose model list still answers, where no C{/metrics} shows its progress:
        L{gomodel.routing.health.ReplicaMonitor}): passed over as a L{doubted} one is, until that is no longer so.
    """

    # Slots, not an instance dict: past 30 attributes CPython 3.11 gives each instance a dict of its own keys, on
    # which a method's look-up is specialised for one instance only, and a pool's replicas take turns (about 300
    # instructions more per method call).
    __slots__ = ("index", "server", "base_url", "_clock", "weight", "max_concurrency", "limit", "failure_threshold",
                 "hold_base", "held_until", "holds", "trial", "_passing", "busy_until", "doubted", "unanswered",
                 "passed_at", "requests_failing", "state", "changed_at", "in_flight", "served", "failures",
                 "last_error", "_models", "load", "load_at", "start_time", "_slots", "pace", "timed", "timed_at",
                 "rare", "checked", "on_change", "on_listed", "on_learned", "on_busy", "busy_why", "on_doubt",
                 "others_ready", "streams")

    def __init__(self, index, server, base_url, clock, *, weight=1.0, max_concurrency=0, failure_threshold=3):
        self.index = index
        self.server = server
        self.base_url = base_url
        self._clock = clock
        self.weight = weight
        self.max_concurrency = max_concurrency
        self.limit = max_concurrency
        self.failure_threshold = failure_threshold
        self.hold_base = 5.0  # seconds of its first hold (its monitor's health interval)
        self.held_until = None
        self.holds = 0  # holds in a row: each one doubles the next (L{hold})
        self.trial = False
        self._passing = False  # on trial: its next request's success is the trial's (L{succeeded})
        self.busy_until = None
        self.doubted = False
        self.unanswered = False
        self.passed_at = None  # when it was last readmitted in full (a trial passed, or no hold)
        self.requests_failing = False  # its last failure was a request's (L{probe_passed})
        self.state = LOADING
        self.changed_at = clock.seconds()
        self.in_flight = 0
        self.served = 0
        self.failures = 0
        self.last_error = None
        self._models = None
        self.load = None
        self.load_at = None
        self.start_time = None
        self._slots = None  # L{slots}
        self.pace = None  # seconds its requests take, learned: a moving mean of those that succeeded
        self.timed = 0  # requests in that mean, up to PACE_SAMPLES
        self.timed_at = None  # when the last of them ended
        self.rare = False  # it was chosen while clearly slower: its next duration weighs RARE_WEIGHT
        self.checked = False  # its first discovery and health check have answered (or failed)
        self.on_change = None  # called with the replica after every change of state
        self.on_listed = None  # called with the replica after its model list changed
        self.on_learned = None  # called with the replica after its batch size (L{slots}) or its first load report
        self.on_busy = None  # called with the replica when it asks to be left alone (L{asked_to_wait})
        self.busy_why = None  # why it is passed over until C{busy_until} where no C{Retry-After} asked it
        self.on_doubt = None  # called with the replica when it is L{doubted}, and when no longer
        self.others_ready = None  # set by its pool: whether another of its replicas is ready
        self.streams = set()  # its answers being relayed as they come (each a StreamRelay: L{ReplicaPool._abandon})

    def __repr__(self):
        return f"<Replica {self.server.name}#{self.index} {self.state}>"

    @property
    def models(self):
        return self._models

    @models.setter
    def models(self, models):
        self._models = models
        if self.on_listed is not None:
            self.on_listed(self)

    @property
    def slots(self):
        """How many requests it runs at once, learned (its running count while it queued), or None."""
        return self._slots

    @slots.setter
    def slots(self, slots):
        self._slots = slots
        if self.on_learned is not None:
            self.on_learned(self)

    @property
    def ready(self) -> bool:
        return self.state == READY

    def serves(self, model) -> bool:
        models = self._models  # (not the property: a read of one costs some 700 instructions in CPython 3.11)
        return model is None or (models is not None and model in models)

    def has_room(self) -> bool:
        return not self.limit or self.in_flight < self.limit

    def standing(self, now, max_age, batch=None):
        """C{(busy, queued)}: the requests it holds, and whether one sent now would wait in its queue.

        Busy: in flight or running, plus queued ones (with a full KV cache, more). Queued: its last
        fresh load report says requests wait, or the gateway alone has as many in flight as it was
        seen to run at once (C{batch}, the largest batch size seen on its pool, until it has shown its
        own). A load report older than C{max_age} seconds is not read.
        """
        in_flight = self.in_flight
        slots = self._slots or batch
        queued = bool(slots and in_flight >= slots)
        load = self.load
        if load is None or now - self.load_at > max_age:
            return float(in_flight), queued
        busy = float(in_flight)
        if load.running is not None and load.running > busy:
            busy = float(load.running)
        if load.waiting:
            busy += load.waiting
            queued = True
        if load.kv_cache_usage is not None and load.kv_cache_usage >= KV_FULL:
            busy += 1 + busy  # a full KV cache queues whatever comes next
        return busy, queued

    def wait(self, busy, batch, slowness=1.0) -> float:
        """How long a request sent now would wait in its queue, holding C{busy} requests (L{standing}),
        in paces of the fastest candidate: its place in the queue times its C{slowness} over its batch
        size (else C{batch}, the largest seen in its pool): one of its slots frees every pace / slots
        seconds."""
        slots = self._slots or batch or 1
        place = max(1.0, busy + 1 - slots)
        return place * slowness / slots / self.weight

    @property
    def paced(self) -> bool:
        """Whether its pace is learned from enough requests to compare it with others'."""
        return self.timed == PACE_SAMPLES

    def slowness(self, fastest, noise=PACE_NOISE) -> float:
        """How many times slower than the pace C{fastest} it is when clearly so (L{clearly_slower}, C{noise}
        seconds of pace being noise), else 1: replicas alike differ by chance, and count alike."""
        if fastest and self.paced and clearly_slower(self.pace, fastest, noise):
            return self.pace / fastest
        return 1.0

    def due(self, now) -> bool:
        """Whether, clearly slower than another, it should still start the next request: idle, its pace
        has not been learned again for L{PACE_REFRESH} seconds."""
        return not self.in_flight and (self.timed_at is None or now - self.timed_at >= PACE_REFRESH)

    def slower_than(self, other, noise=PACE_NOISE) -> bool:
        """Whether it is clearly slower than C{other} (both paced; C{noise}: L{slowness}'s)."""
        return other.paced and self.slowness(other.pace, noise) > 1.0

    # -- what happens to it ------------------------------------------------------

    def set_state(self, state, why=None):
        if state == self.state:
            return
        if self.trial and state != READY:  # (a trial is ready, until it is over)
            self._end_trial()
        if state != READY:
            self.doubted = False  # (only a ready one is passed over for it)
        self.state = state
        self.changed_at = self._clock.seconds()
        if why is not None:
            self.last_error = why
        if self.on_change is not None:
            self.on_change(self)

    def succeeded(self):
        """A request's answer came: failures in a row start again (on trial, the trial passed: L{_passed})."""
        if self._passing:  # (its requests' success ends the trial: nothing added for the others)
            self._passed()
            return
        self.failures = 0

    def probe_passed(self):
        """Its health probe passed: failures in a row start again, unless they are its requests' (a passing
        C{/health} says nothing of inference: requests that fail one by one, between probes, still count); it is
        no longer L{doubted}."""
        if not self.requests_failing:
            self.failures = 0
        if self.doubted:
            self.doubted = False
            if self.on_doubt is not None:
                self.on_doubt(self)

    def failed(self, why, probe=False):
        """A request or probe failed; past the threshold a ready replica goes down (a loading one stays loading).

        Requests alone never take down the last ready replica of a pool: with nowhere
        else to go, its own C{/health} probe decides (C{probe=True}), so that a burst of
        connection errors does not turn into seconds of 503s for a replica that is up.
        Taken down by requests, it is held out (L{hold}); a failed probe lifts that. A request's failure on a
        replica already down (one in flight as it went) says nothing new: its probes decide.
        """
        if not probe and self.state == DOWN:
            return
        self.failures += 1
        self.last_error = why
        self.requests_failing = not probe
        if probe:
            self.held_until = None  # really down: its probes decide when it is back
        if self.failures >= self.failure_threshold and self.state in (READY, STALLED):
            if not probe and self.state == READY and self.others_ready is not None and not self.others_ready(self):
                self._doubt()  # (the last ready one: passed over where another target can take its requests)
                return
            if not probe:
                self.hold()
            self.set_state(DOWN, why)
        elif probe and self.state == READY:
            self._doubt()

    def answering(self, answering, why=None):
        """Whether it answers its requests (L{unanswered}: C{why} not), as its monitor saw."""
        if self.unanswered == (not answering):
            return
        self.unanswered = not answering
        if why is not None:
            self.last_error = why
        if self.on_doubt is not None:
            self.on_doubt(self)

    def _doubt(self):
        """It is L{doubted} (a ready one): passed over while another replica or target can start a request."""
        if not self.doubted:
            self.doubted = True
            if self.on_doubt is not None:
                self.on_doubt(self)

    def hold(self):
        """It goes down for failed requests: a passing probe readmits it (L{readmit}) only after
        C{hold_base} seconds, doubling with each hold in a row (one that served in full for longer than
        L{HOLD_MAX} since starts again), at most L{HOLD_MAX}."""
        now = self._clock.seconds()
        if self.passed_at is not None and now - self.passed_at > HOLD_MAX:
            self.holds = 0
        self.held_until = now + min(self.hold_base * 2 ** self.holds, HOLD_MAX)
        self.holds += 1

    def held_for(self) -> float:
        """Seconds it is still held out (L{hold}), or 0."""
        return 0.0 if self.held_until is None else max(0.0, self.held_until - self._clock.seconds())

    def busy_for(self) -> float:
        """Seconds it is still passed over for its C{Retry-After} (L{asked_to_wait}), or 0."""
        return 0.0 if self.busy_until is None else max(0.0, self.busy_until - self._clock.seconds())

    def readmit(self) -> bool:
        """A down replica passed its probe: ready again (on trial after a hold), unless still held."""
        if self.held_until is not None:
            if self._clock.seconds() < self.held_until:
                return False
            self.held_until = None
            self.trial, self.limit = True, 1
            self.failures = self.failure_threshold - 1  # its trial request's failure takes it down again
            self.requests_failing = True
            self._passing = True
        else:
            self.passed_at = self._clock.seconds()
        self.set_state(READY)
        return True

    def _passed(self):
        """Its trial request succeeded: full traffic again."""
        self._end_trial()
        self.failures = 0
        self.passed_at = self._clock.seconds()
        if self.on_change is not None:
            self.on_change(self)

    def _end_trial(self):
        self._passing = False
        self.trial, self.limit = False, self.max_concurrency

    def forget(self, model):
        """It answered that it has no C{model}, which it listed (a restart lost a LoRA adapter loaded at run time,
        one was unloaded): struck off its list until its models are read again."""
        models = self._models
        if models is not None and model in models:
            self.models = {name: m for name, m in models.items() if name != model}

    def asked_to_wait(self, retry_after, why=None):
        """It answered a request with an error and C{Retry-After} (C{retry_after}, the header's value: seconds
        or an HTTP date): its pool passes it over until then while another replica can start the request
        (L{ReplicaPool.take}), for at most L{HOLD_MAX} seconds. A value that is no time to come changes nothing.
        C{why}: what its pool logs where that was no C{Retry-After} (a spent quota's), or None."""
        now = self._clock.seconds()
        seconds = retry_after_seconds(retry_after, now)
        if seconds is None:
            return
        resting = self.busy_until is not None and now < self.busy_until
        self.busy_until = now + min(seconds, HOLD_MAX)
        self.busy_why = why
        if not resting and self.on_busy is not None:
            self.on_busy(self)

    def took(self, seconds):
        """A request it served succeeded after C{seconds} (from send to its answer's end)."""
        if self.timed < PACE_SAMPLES:  # a plain mean at first: one odd request (a new connection) weighs little
            self.timed += 1
            self.pace = seconds if self.pace is None else self.pace + (seconds - self.pace) / self.timed
        else:
            self.pace += (RARE_WEIGHT if self.rare else PACE_WEIGHT) * (seconds - self.pace)
        self.rare = False
        self.timed_at = self._clock.seconds()

    def reported(self, sample):
        """A scrape's load report arrived (while requests wait, its running count is its batch size)."""
        first = self.load is None
        self.load = sample
        self.load_at = self._clock.seconds()
        if sample.waiting and sample.running and (self._slots is None or sample.running > self._slots):
            self.slots = int(sample.running)
        elif first and self.on_learned is not None:
            self.on_learned(self)

    def answered(self, sample):
        """An answer's load report arrived: its queue and KV use, fresher than the last scrape's."""
        load = self.load
        if load is not None:
            sample = load._replace(waiting=sample.waiting, kv_cache_usage=sample.kv_cache_usage)
        self.reported(sample)


def retry_after_seconds(value, now):
    """The seconds a C{Retry-After} value (bytes: delta-seconds or an HTTP date) asks to wait from C{now} (Unix
    time), or None where it is none or no time to come."""
    value = value.strip()
    if value.isdigit():
        seconds = int(value) if len(value) <= 9 else 10 ** 9  # (past 4,300 digits int() raises: a wait past any)
    else:
        from email.utils import parsedate_to_datetime  # (here: the email package is loaded only for a date's wait)

        try:
            seconds = parsedate_to_datetime(value.decode("latin-1")).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return seconds if seconds > 0 else None


class _Waiter:
    __slots__ = ("model", "exclude", "affinity", "size", "deferred", "timer")

    def __init__(self, model, exclude, affinity, size, deferred):
        self.model = model
        self.exclude = exclude
        self.affinity = affinity
        self.size = size
        self.deferred = deferred
        self.timer = None


class ReplicaPool:
    """A provider: its name and type, its replicas, and the choice of one for each request.

    @ivar hidden: every replica's URLs and host (and key), never to be shown to a client.
    @ivar hidden_pattern: a pattern (bytes) matching any of them (each replica's host, key), or None.
    """

    log = Logger()

    def __init__(self, name, type_, replicas, clock, *, configured_models=(), strategy="load", queue_timeout=5.0,
                 load_max_age=6.0, affinity_max_ratio=1.5, affinity_slack=2, priority_scheduling=False,
                 max_stops=None, rng=None, pins=None):
        """
        @param max_stops: the most chat stop sequences it is sent (a translated Messages request's: the
            configured C{max_stop_sequences}, else its type's), or None: all.
        @param pins: the L{gomodel.routing.pins.SharedPins} this pool's pins are shared through, or None.
        """
        self.name = name
        self.type = type_
        # how a model name a request sends begins when it names this provider (by instance or by type)
        self.named_by = (name + "/", type_ + "/")
        self.replicas = list(replicas)
        self.configured_models = tuple(configured_models)
        self.priority_scheduling = priority_scheduling
        self.max_stops = max_stops
        # Longest first: one replica's host must not be replaced inside another's host and port.
        self.hidden = tuple(sorted(dict.fromkeys(h for r in self.replicas for h in r.server.hidden), key=len,
                                   reverse=True))
        # Its hosts (by every name: any case, a loopback one's other names) and keys, as one pattern of bytes: what
        # an upstream's header or error that names one of its addresses holds (L{gomodel.http.headers
        # .copy_response_headers}, L{gomodel.addresses.marks}); None: none.
        self.hidden_pattern = marks(self.hidden)
        # upstream id -> public id of each model it lists by a path (set by the registry, L{gomodel.routing.registry
        # .ModelRegistry._names}): its answers name it by the public id (L{gomodel.proxy.renamed})
        self.renamed = {}
        self.named = {}  # upstream id -> the L{ModelNamed} its answers are written with (L{rename})
        self._clock = clock
        self._strategy = strategy
        self._drawn = strategy in ("round_robin", "random")  # (not scored by load: L{_choose}'s one test for them)
        # whether a request's session or conversation (L{gomodel.routing.affinity}) counts in the choice: where there is
        # one to make, by load (round_robin and random choose whatever it is): its key is worked out only then
        self.keeps_sessions = len(self.replicas) > 1 and not self._drawn
        self._only = self.replicas[0] if len(self.replicas) == 1 else None  # the one replica of a pool of one (L{take})
        self._queue_timeout = queue_timeout
        self._load_max_age = load_max_age
        self._affinity_ratio = affinity_max_ratio
        self._affinity_slack = affinity_slack
        self._rng = rng or random.Random()
        self._next = 0  # round robin
        self._turns = [0.0] * len(self.replicas)  # each replica's count in a weighted round robin (L{_weighted_turn})
        self._size_mean = None  # the mean max_tokens of requests it weighed for a clearly slower replica
        self._sizes = 0  # how many, up to SIZE_SAMPLES
        self._queue = deque()
        self._affinity = OrderedDict()  # session or prefix key -> (replica index, when it was last shared)
        self._by_url = {r.base_url: r.index for r in self.replicas}
        self._capped = any(r.limit for r in self.replicas)  # a replica can be full
        # every weight is 1: a replica's count per unit of weight is its count (read in C, L{_in_flight})
        self._unweighted = all(r.weight == 1 for r in self.replicas)
        self._resting = False  # a replica may still be waiting out its Retry-After (L{_awake})
        # What its load choice needs of its replicas, kept as they learn it (L{_learned}): the largest batch
        # size learned (0: none), whether any reports its load, and the lowest and highest learned pace
        # (an envelope: L{release} only widens it, L{_choose} makes it tight) with whether those are
        # alike (none clearly slower).
        self._batch, self._reported, self._pace_low, self._pace_high, self._alike = 0, False, inf, -inf, True
        self.noise = PACE_NOISE  # seconds of pace that are noise now (L{lagged})
        # whether L{_choose} scores by count alone as things stand (least_requests, or none of the above stands in
        # the way): one look a request rather than four; kept with them (L{_learned}, L{_widen})
        self._by_count = True
        self.pins = pins
        self.forgotten = 0.0  # when the newest pin this pool had to forget was last shared
        # model -> its ready replicas that serve it (a list never changed), until a state or a model list changes
        self._serving = {}
        self._abandoning = {}  # replica index -> the call of L{_abandon} to come
        for replica in self.replicas:
            replica.on_change = self._changed
            replica.on_listed = self._relisted
            replica.on_learned = self._learned
            replica.others_ready = self._others_ready
            replica.on_busy = self._busy
            replica.on_doubt = self._doubt
        self._learned(None)

    def __repr__(self):
        return f"<ReplicaPool {self.name} ({len(self.replicas)} replicas)>"

    def rename(self, renamed: dict):
        """Name each model it lists by a path as clients know it (C{renamed}: upstream id -> public id, the registry's
        L{gomodel.routing.registry.ModelRegistry._names}): in its answers (L{gomodel.proxy.renamed}), and where an
        error or header names the path, which is hidden as its addresses are (L{gomodel.addresses.ModelPath})."""
        self.renamed = renamed
        self.named = {path: ModelNamed(path, public) for path, public in renamed.items()}
        kept = tuple(h for h in self.hidden if h.__class__ is not ModelPath)
        paths = tuple(ModelPath(path, public) for path, public in renamed.items())
        if paths or len(kept) != len(self.hidden):
            self.hidden = tuple(sorted(kept + paths, key=len, reverse=True))
            self.hidden_pattern = marks(self.hidden)

    def hide_too(self, server, address: str):
        """Hide C{address} (an IP address the host name of C{server}, one of its replicas', led a connection to)
        as the configured ones are: in C{server}'s errors and the pool's (its C{hidden}, C{hidden_pattern})."""
        if address not in server.hidden:
            server.hidden += (address,)
        if address not in self.hidden:
            self.hidden = tuple(sorted(self.hidden + (address,), key=len, reverse=True))
            self.hidden_pattern = marks(self.hidden)

    @property
    def load_max_age(self):
        """Seconds after which a replica's load report is too old to route by (3 x C{REPLICA_METRICS_INTERVAL})."""
        return self._load_max_age

    @property
    def first(self):
        """The first replica's server (for what all replicas share: URL layout, auth)."""
        return self.replicas[0].server

    @property
    def settled(self) -> bool:
        """Whether a replica is ready, or every replica was checked once."""
        return any(r.state == READY for r in self.replicas) or all(r.checked for r in self.replicas)

    def models(self):
        """The model ids some replica listed (None while none has)."""
        listed = [r.models for r in self.replicas if r.models is not None]
        if not listed:
            return None
        union = {}
        for models in listed:
            union.update(models)
        return union

    # -- choosing ----------------------------------------------------------------------

    def take(self, model, exclude=(), prefer=None, affinity=None, size=None):
        """A ready replica with room for a request for C{model} now, counted in flight until
        L{release}; or None (then L{acquire} waits, or says why not). The request path passes every argument by
        position (a keyword call costs CPython 3.11 about 280 instructions more).

        @param exclude: replicas already tried for this request.
        @param prefer: a replica index to use while it is ready, has room and is not passed over (L{_awake}:
            doubted, unanswered or waiting out a C{Retry-After}, where another can start the request).
        @param affinity: a session or prefix key, or None.
        @param size: a function returning the output tokens the request asks for at most (its
            C{max_tokens}) or None, called only when a clearly slower replica is the one that could
            start it at once; or None.
        """
        replica = self._only
        if replica is not None:  # one server: nothing to choose
            if replica.state == READY and replica.serves(model) and replica.has_room() and not exclude:
                return self._lease(replica, None)
            return None
        free = None if exclude else self._serving.get(model)  # (L{_candidates}' common case, inline)
        if free is None:
            free = self._candidates(model, exclude)
        if self._capped:
            free = self._with_room(free)
        if prefer is not None and 0 <= prefer < len(self.replicas) and self.replicas[prefer] in free and (
                not self._resting or self._awake([self.replicas[prefer]])):  # (doubted: passed over as any other)
            return self._lease(self.replicas[prefer], affinity)
        if self._resting:
            free = self._awake(free) or free  # (one that asked to be left alone takes what no other can start)
        replica = self._choose(free, affinity, size)
        return None if replica is None else self._lease(replica, affinity)

    def _long(self, size) -> bool:
        """Whether a request asking for C{size} output tokens (None: unknown) asks for more than the
        requests weighed before it did on average (the mean, which it joins)."""
        if size is None:
            return False
        mean = self._size_mean
        if self._sizes < SIZE_SAMPLES:
            self._sizes += 1
            self._size_mean = size if mean is None else mean + (size - mean) / self._sizes
        else:
            self._size_mean = mean + (size - mean) / SIZE_SAMPLES
        return mean is not None and size > mean

    def acquire(self, model, exclude=(), pin=None, prefer=None, affinity=None, size=None) -> Deferred:
        """Like L{take}, waiting for room when every candidate is full.

        @param pin: a replica index that must serve it, whatever its state (diagnostics).
        @return: a Deferred firing with the L{Replica}; failing with
            L{NoReadyReplica} when no ready replica serves C{model} (L{ModelNotFound}
            when no replica lists it), or with L{ReplicasBusy} when all were full for
            C{queue_timeout}; a request waiting for room learns the first two as soon
            as a replica's state or model list makes them so.
        """
        if pin is not None:
            return self._pinned(pin)
        replica = self.take(model, exclude, prefer, affinity, size)
        if replica is not None:
            return succeed(replica)
        if not self._candidates(model, exclude):
            return fail(self._unavailable(model))
        return self._wait(model, exclude, affinity, size)

    def _unavailable(self, model):
        """Why no ready replica serves C{model}: none lists it any more (L{ModelNotFound}; a replica that has
        not listed its models yet may still), or none that does is ready (L{NoReadyReplica})."""
        if model is not None and not any(r.models is None or model in r.models for r in self.replicas):
            return ModelNotFound(qualified(self.name, model))
        return NoReadyReplica(self.name, model or "(any)", self._ready_in(model))

    def _ready_in(self, model) -> int:
        """Whole seconds (at least 1) until a replica that may serve C{model} may be ready again, its C{Retry-After}:
        the soonest of their next health checks (within their C{hold_base}, the health interval: a loading or down
        replica is ready only once one passes; a stalled one once a scrape sees progress, sooner) and, for one held
        out (L{Replica.hold}), the end of its hold."""
        soonest = min((r.held_for() or r.hold_base for r in self.replicas
                       if model is None or r.models is None or model in r.models), default=RETRY_AFTER)
        return whole_seconds(soonest)

    def standing_for(self, model) -> int:
        """2 when a ready replica that serves C{model} has room for another request now (and is not waiting out
        a C{Retry-After}: L{Replica.asked_to_wait}), 1 when ready ones serve it but every one is full or waiting
        that out, 0 when none is ready."""
        candidates = self._candidates(model, ())
        if not candidates:
            return 0
        if self._capped and not any(r.has_room() for r in candidates):
            return 1
        return 1 if self._resting and not self._awake(self._with_room(candidates)) else 2

    def passed_over(self, model) -> bool:
        """Whether no ready replica that serves C{model} would be chosen where another target can take a request:
        none is ready, or each is waiting out a C{Retry-After} (a spent quota's too) or passed over after a failed
        check or failed requests (L{Replica.doubted})."""
        candidates = self._candidates(model, ())
        return not candidates or self._resting and not self._awake(candidates)

    def has_alternative(self, model, exclude) -> bool:
        """Whether another ready replica than those in C{exclude} serves C{model}."""
        return bool(self._candidates(model, exclude))

    def release(self, replica, took=None):
        """A request that L{acquire} counted has ended (C{took}: the seconds it took, if it succeeded)."""
        replica.in_flight -= 1
        if took is not None:
            replica.took(took)
            if replica.timed == PACE_SAMPLES and not self._pace_low <= replica.pace <= self._pace_high:
                self._widen(replica.pace)
        self._serve_queue()

    def _pinned(self, index):
        if not 0 <= index < len(self.replicas):
            return fail(InvalidRequest(f"Provider '{self.name}' has no replica {index} "
                                       f"(it has {len(self.replicas)}).", code="unknown_replica"))
        replica = self.replicas[index]
        replica.in_flight += 1
        replica.served += 1
        return succeed(replica)

    def _candidates(self, model, exclude):
        """The ready replicas that serve C{model}, but those in C{exclude} (a list not to be changed)."""
        serving = self._serving.get(model)
        if serving is None:
            serving = self._serving_now(model)
        return list(filterfalse(exclude.__contains__, serving)) if exclude else serving

    def _serving_now(self, model):
        """The ready replicas that serve C{model}, worked out and kept until the replicas change."""
        if len(self._serving) > 1000:
            self._serving.clear()
        serving = self._serving[model] = [r for r in self.replicas if r.state == READY and r.serves(model)]
        return serving

    def _with_room(self, replicas):
        """Those of C{replicas} with room for one more request (all of them where none has a limit)."""
        return [r for r in replicas if r.has_room()] if self._capped else replicas

    def _awake(self, free):
        """Those of C{free} not waiting out a C{Retry-After} (L{Replica.asked_to_wait}) (a new list, maybe empty)."""
        now = self._clock.seconds()
        awake = []
        over = False
        for r in free:
            until = r.busy_until
            if until is not None and now >= until:
                r.busy_until = until = None
                over = True
            if until is None and not r.doubted and not r.unanswered:
                awake.append(r)
        if over:
            self._rested()
        return awake

    def _rested(self):
        """Work out again whether a replica may be passed over (L{_awake})."""
        self._resting = any(r.busy_until is not None or r.doubted or r.unanswered for r in self.replicas)

    def _doubt(self, replica):
        """A replica's probe failed, or passed again (L{Replica.doubted})."""
        self._rested()
        if replica.unanswered:
            self.log.warn("provider {provider} replica {index}: {why}; passed over where another replica or target "
                          "can take its requests, until it answers", provider=self.name, index=replica.index,
                          why=replica.last_error)
        if replica.doubted:
            self.log.info("provider {provider} replica {index}: {what} ({why}); passed over until a check passes "
                          "where another replica or target can take its requests", provider=self.name,
                          index=replica.index, why=replica.last_error,
                          what="its requests fail" if replica.requests_failing else "a check failed")

    def _busy(self, replica):
        """A replica asked to be left alone for a while (L{Replica.asked_to_wait})."""
        self._resting = True
        self.log.info("provider {provider} replica {index}: {why}; passed over {seconds:.0f}s where another replica "
                      "or target can take its requests", provider=self.name, index=replica.index,
                      why=replica.busy_why or "asked to wait (Retry-After)",
                      seconds=replica.busy_until - self._clock.seconds(), busy_until=replica.busy_until)

    def _relisted(self, replica):
        """A replica's model list was read: the waiting requests may start there, or fail (their model gone)."""
        self._serving.clear()
        self._serve_queue(every=True)

    def _learned(self, replica):
        """A replica learned its batch size or its first load report (None: look at all): work out again
        what L{_choose} needs of them all, the envelope of their paces made tight."""
        # the largest batch size learned (L{Replica.slots}), or 0: one a replica that has not shown its own is taken
        # to run; whether any reports its load; the envelope of the learned paces (L{Replica.paced}). One loop, its
        # fields read as they are (no property, no comprehension's closure). The envelope is only widened as paces
        # change (L{_widen}): L{_choose} makes it tight again when the free replicas' paces are alike.
        batch, reported, low, high = 0, False, inf, -inf
        for r in self.replicas:
            if r._slots is not None and r._slots > batch:
                batch = r._slots
            if r.load is not None:
                reported = True
            if r.timed == PACE_SAMPLES:
                pace = r.pace
                if pace < low:
                    low = pace
                if pace > high:
                    high = pace
        self._batch, self._reported = batch, reported
        if high >= low:
            self._pace_low, self._pace_high = low, high
            self._alike = not clearly_slower(high, low, self.noise)
        else:
            self._pace_low, self._pace_high, self._alike = inf, -inf, True
        self._by_count = self._strategy == "least_requests" or (not self._batch and not self._reported and self._alike)

    def lagged(self, noise):
        """The event loop's delays make C{noise} seconds of pace noise now (L{gomodel.routing.lag.LoopLag}): paces
        that differ by no more count alike."""
        self.noise = noise
        self._learned(None)

    def _widen(self, pace):
        """A replica's learned pace moved outside the envelope: widen it to C{pace}."""
        if pace < self._pace_low:
            self._pace_low = pace
        if pace > self._pace_high:
            self._pace_high = pace
        alike = not clearly_slower(self._pace_high, self._pace_low, self.noise)
        if alike is not self._alike:
            self._alike = alike
            self._by_count = self._strategy == "least_requests" or (not self._batch and not self._reported and alike)

    def _lease(self, replica, affinity):
        replica.in_flight += 1
        replica.served += 1
        if affinity is not None:
            table = self._affinity
            known = table.get(affinity)
            pins = self.pins
            if known is not None and known[0] == replica.index and (
                    pins is None or self._clock.seconds() - known[1] < pins.refresh_after):
                table.move_to_end(affinity)
            elif known is not None and replica.slower_than(self.replicas[known[0]], self.noise):
                table.move_to_end(affinity)  # an overflow to a slower replica: the pin stays where it was
            else:  # a new or changed pin (or, shared, one to write again before it expires)
                self._remember(affinity, replica.index)
                if pins is not None:
                    pins.pinned(self, affinity, replica)
        return replica

    def _remember(self, affinity, index):
        table = self._affinity
        table[affinity] = (index, self._clock.seconds() if self.pins is not None else 0.0)
        table.move_to_end(affinity)
        if len(table) > AFFINITY_ENTRIES:
            _, (_, shared_at) = table.popitem(last=False)
            if shared_at > self.forgotten:
                self.forgotten = shared_at

    # -- pins shared with other processes ------------------------------------------------

    def knows(self, affinity) -> bool:
        """Whether this pool has a pin for C{affinity}."""
        return affinity in self._affinity

    def pin(self, affinity, base_url):
        """Another process pinned C{affinity} to the replica at C{base_url} (ignored when this pool has none)."""
        index = self._by_url.get(base_url)
        if index is not None:
            self._remember(affinity, index)

    def recall(self, affinity):
        """What to wait for before choosing a replica for C{affinity}: None when nothing (no shared
        pins, a pin known here, or a key that is never looked up), else a Deferred firing None once
        the pin stored for this session, if any, is known here (or the lookup took too long); it never fails."""
        if self.pins is None or affinity in self._affinity:
            return None
        return self.pins.recall(self, affinity)

    def _others_ready(self, replica) -> bool:
        return any(r.ready for r in self.replicas if r is not replica)

    def _others_take_over(self, replica) -> bool:
        """Whether another ready replica lists every model C{replica} does (the requests it holds have somewhere
        else to go: L{_abandon})."""
        models = replica.models
        return any(r.ready and (models is None or r.models is not None and r.models.keys() >= models.keys())
                   for r in self.replicas if r is not replica)

    def _choose(self, free, affinity, size=None):
        """The replica to use among C{free} (all ready, all with room), or None.

        @param size: L{take}'s. With the C{load} strategy, a request that asks for more output than
            the pool's requests do on average goes to a clearly slower replica only when no faster one
            is free (it queues on a faster one instead).
        """
        if not free:
            return None
        if len(free) == 1:
            return free[0]
        if self._drawn:
            if self._strategy == "round_robin":
                if not self._unweighted:
                    return self._weighted_turn(free)
                replica = free[self._next % len(free)]
                self._next += 1
                return replica
            return self._rng.choices(free, weights=[r.weight for r in free])[0]
        # With the load strategy, where none would queue it (no batch size learned), none reports its load
        # and none is clearly slower (their paces' envelope alike), each is scored by its own count per unit
        # of weight, as least_requests scores them (L{_by_count}: so as things stand). Where the envelope says
        # otherwise, the one pass below looks at the free ones' paces: with no batch and no report it scores
        # them the same way.
        if self._by_count:
            scores = list(map(_in_flight, free)) if self._unweighted else [r.in_flight / r.weight for r in free]
            if affinity is None:  # (L{_lowest} without a session, inline: most requests)
                best = min(scores)
                ties = scores.count(best)
                if ties == 1:
                    return free[scores.index(best)]
                if not self._unweighted:
                    return self._turn(free, scores, best, ties)
                # L{_turn} where the scores are the counts, inline: the next in turn of the tied, in their order (an
                # idle pool's all of them); found by index in C, not sorted (about 3 k instructions with 4 replicas)
                turn = self._next % ties
                self._next += 1
                if ties == len(free):
                    return free[turn]
                at = scores.index(best)
                for _ in range(turn):
                    at = scores.index(best, at + 1)
                return free[at]
            return self._lowest(free, scores, affinity)
        now = self._clock.seconds()
        max_age = self._load_max_age
        batch = self._batch
        # A request that would wait in a replica's queue goes where it would start at once, if
        # any replica has room in its batch: the wait in vLLM's queue is the tail of first tokens.
        # Those are scored by their load per unit of weight. One pass over the candidates (each step
        # a call less: this runs for every request) scores them, finds the lowest score and how many
        # share it, and the fastest and slowest learned paces.
        scores, queued = {}, {}  # queued: what each replica that would queue it holds
        best = lowest = fastest = slowest = None
        ties = 0
        for r in free:
            if r.load is None:  # no load report: L{Replica.standing} is its own count
                busy = r.in_flight
                slots = r._slots or batch
                queues = slots and busy >= slots
            else:
                busy, queues = r.standing(now, max_age, batch)
            if queues:
                queued[r] = busy
            else:
                score = scores[r] = busy / r.weight
                if best is None or score < best:
                    best, lowest, ties = score, r, 1
                elif score == best:
                    ties += 1
            if r.timed == PACE_SAMPLES:  # (L{Replica.paced})
                pace = r.pace
                if fastest is None or pace < fastest:
                    fastest = pace
                if slowest is None or pace > slowest:
                    slowest = pace
        if fastest is not None and clearly_slower(slowest, fastest, self.noise):
            return self._choose_paced(free, scores, queued, batch, fastest, now, affinity, size)
        if not self._alike and not batch and not self._reported:  # (the free ones' paces alike: is the envelope
            self._learned(None)                                      # holding a pace since gone? L{_by_count})
        if not scores:  # every one would queue: where the wait is shortest (no warm cache is worth a longer one)
            return self._lowest(free, _waits(free, queued, batch, {}), None)
        if ties == 1 and affinity is None:
            return lowest
        return self._pick(list(scores), list(scores.values()), affinity, best, ties, lowest)

    def _weighted_turn(self, free):
        """C{round_robin} among C{free} where weights differ: smooth weighted round robin (nginx's, as a virtual
        model's targets take turns): each turn adds every one's weight to its own count, takes the largest, and
        takes the sum of the weights off it."""
        turns = self._turns
        total = 0.0
        best = None
        for r in free:
            turns[r.index] += r.weight
            total += r.weight
            if best is None or turns[r.index] > turns[best.index]:
                best = r
        turns[best.index] -= total
        return best

    def _choose_paced(self, free, scores, queued, batch, fastest, now, affinity, size):
        """L{_choose} where some replicas are clearly slower than the pace C{fastest} (L{_slower}): one takes only
        what no faster one could start at once, and each of its requests counts as many times as it is slower.

        This runs for every request while one is (a chance one too: the gateway's own delays are in every pace), so
        its steps are plain loops: no comprehension (each a closure over this call's locals, and a frame), no call
        per replica."""
        slower = self._slower(free, fastest) if fastest else {}  # (none is slower than a pace of 0)
        # Those that can start it at once (not clearly slower, or due to learn their pace again), with their
        # scores, each a slower one's times its slowness.
        prompt, weighed = [], []
        for r, score in scores.items():
            times = slower.get(r)
            if times is None:
                prompt.append(r)
                weighed.append(score)
            elif r.due(now):
                prompt.append(r)
                weighed.append(score * times)
        if not prompt:
            if size is not None and self._long(size()):
                # Only a clearly slower replica could start it: a long answer there is the tail of
                # latency (a 3x slower replica makes 2 s 6 s), so it waits for a faster one.
                faster = list(filterfalse(slower.__contains__, free))  # (in C: no closure cell of C{slower})
                if faster:
                    free, scores = faster, {}
            for r, score in scores.items():
                prompt.append(r)
                weighed.append(score * slower.get(r, 1.0))
        if prompt:
            replica = self._lowest(prompt, weighed, affinity)
        else:
            replica = self._lowest(free, _waits(free, queued, batch, slower), None)
        if replica in slower:
            replica.rare = True
        return replica

    def _slower(self, free, fastest) -> dict:
        """Each clearly slower replica of C{free} than the pace C{fastest} (not 0): how many times slower
        (L{Replica.slowness}, inline)."""
        slower = {}
        least = SLOWER * fastest
        noise = self.noise
        for r in free:  # (a loop: a comprehension here would make a closure cell on every call)
            if r.timed == PACE_SAMPLES:  # (L{Replica.paced}; L{clearly_slower}, inline)
                pace = r.pace
                if pace > least and pace - fastest > noise:
                    slower[r] = pace / fastest
        return slower

    def _lowest(self, replicas, scores, affinity):
        """The replica of C{replicas} with the lowest of C{scores} (each one's, in their order), or the warm
        one of C{affinity} within the guard."""
        best = min(scores)
        ties = scores.count(best)
        if affinity is None:  # (L{_pick} with no warm one to look for, inline: most requests have no session)
            return replicas[scores.index(best)] if ties == 1 else self._turn(replicas, scores, best, ties)
        return self._pick(replicas, scores, affinity, best, ties, replicas[scores.index(best)] if ties == 1 else None)

    def _pick(self, replicas, scores, affinity, best, ties, lowest):
        """L{_lowest} of C{replicas} and their C{scores} whose lowest score C{best} C{ties} replicas share
        (C{lowest}, when one)."""
        if affinity is not None:
            known = self._affinity.get(affinity)
            if known is not None:
                warm = self.replicas[known[0]]
                if warm in replicas and \
                        scores[replicas.index(warm)] <= best * self._affinity_ratio + self._affinity_slack:
                    return warm
        return lowest if ties == 1 else self._turn(replicas, scores, best, ties)

    def _turn(self, replicas, scores, best, ties):
        """The next in turn of the C{ties} (more than one) of C{replicas} whose score is C{best}: ties (an idle
        pool) take turns, so that equal replicas share the work."""
        # (those scoring C{best} picked out in C: no loop here, no closure cell of a comprehension)
        lowest = replicas if ties == len(scores) else list(compress(replicas, map(eq, scores, repeat(best))))
        replica = lowest[self._next % ties]
        self._next += 1
        return replica

    # -- the queue -------------------------------------------------------------------

    def _wait(self, model, exclude, affinity, size):
        waiter = _Waiter(model, tuple(exclude), affinity, size, None)
        d = Deferred(lambda _: self._drop(waiter))
        waiter.deferred = d
        self._queue.append(waiter)
        waiter.timer = self._clock.callLater(self._queue_timeout, self._expire, waiter)
        return d

    def _drop(self, waiter):
        if waiter in self._queue:
            self._queue.remove(waiter)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()

    def _expire(self, waiter):
        waiter.timer = None
        self._drop(waiter)
        waiter.deferred.errback(ReplicasBusy(self.name, RETRY_AFTER))

    def _serve_queue(self, every=False):
        """Start the waiting requests that can start now, first come first served; one that cannot yet (the
        replicas serving its model, or those it did not try, are full) does not hold back those behind it.

        @param every: look at every waiting request even while every replica is full (a replica's state or
            model list changed): one that no ready replica serves any more fails at once (L{_unavailable}).
        """
        if not self._queue:
            return
        for waiter in list(self._queue):
            if not every and self._capped and not any(r.has_room() for r in self.replicas):
                return  # every replica is full: none behind can start either (one look, not one per waiter)
            if waiter.deferred.called:  # served, failed or gone while an earlier one's callbacks ran
                continue
            candidates = self._candidates(waiter.model, waiter.exclude)
            if not candidates:
                self._drop(waiter)
                waiter.deferred.errback(self._unavailable(waiter.model))
                continue
            free = self._with_room(candidates)
            replica = self._choose(self._awake(free) or free if self._resting else free, waiter.affinity, waiter.size)
            if replica is not None:
                self._drop(waiter)
                waiter.deferred.callback(self._lease(replica, waiter.affinity))

    def _changed(self, replica):
        self._serving.clear()
        self._capped = any(r.limit for r in self.replicas)  # (a replica on trial takes one request at a time)
        if self._resting:
            self._rested()  # (one no longer ready is no longer doubted)
        held = replica.held_until
        if replica.trial:
            note = " (on trial: one request at a time)"
        elif held is not None:
            note = f"; held out for {held - self._clock.seconds():.0f}s, then on trial"
        else:
            note = ""
        self.log.info("provider {provider} replica {index}: {state}{why}{note}", provider=self.name,
                      index=replica.index, state=replica.state,
                      why=f" ({replica.last_error})" if replica.state != READY and replica.last_error else "",
                      note=note, held_until=held, trial=replica.trial)
        self._serve_queue(every=True)
        if replica.in_flight and (replica.state == DOWN
                                  or replica.state == STALLED and self._others_take_over(replica)):
            # Its requests still waiting for their answer's head would wait out their response-header timeout,
            # its streams fallen silent their idle timeout (minutes): they end now (the first go on to another
            # replica, as one timed out would). Once this change is over: their failover chooses among the
            # replicas as they are now. A stalled one (no token for REPLICA_STALL_TIMEOUT) keeps them where
            # no other ready replica lists its models: a stall may pass, and there is nowhere else to go.
            if replica.index not in self._abandoning:
                self._abandoning[replica.index] = self._clock.callLater(0, self._abandon, replica)

    def _abandon(self, replica):
        """End the requests of a replica gone down (or stalled, another ready one listing its models:
        L{_others_take_over}) that still wait for their answer's head (L{gomodel.interfaces.IUpstream.abandon}),
        and let its answers being relayed be silent for at most its health interval from now on
        (L{gomodel.proxy.relay.StreamRelay.shorten_idle}); unless it is back already."""
        del self._abandoning[replica.index]
        state = replica.state
        if state != DOWN and (state != STALLED or not self._others_take_over(replica)):
            return
        ended = replica.server.abandon("went down" if state == DOWN else "stopped generating")
        streams = list(replica.streams)
        for relay in streams:
            relay.shorten_idle(replica.hold_base)
        if ended or streams:
            self.log.info("provider {provider} replica {index}: {state}; {ended} requests waiting for their answer "
                          "end now (each tried elsewhere), {streams} streams may be silent {seconds:g}s at most",
                          provider=self.name, index=replica.index, state=state, ended=ended, streams=len(streams),
                          seconds=replica.hold_base)

    def close(self):
        """Fail every waiting request (the gateway is stopping)."""
        for call in self._abandoning.values():
            call.cancel()
        self._abandoning.clear()
        while self._queue:
            waiter = self._queue.popleft()
            self._drop(waiter)
            waiter.deferred.errback(CancelledError())

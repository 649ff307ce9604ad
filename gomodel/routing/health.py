"""Watching every replica: what it serves, whether it is up, how loaded it is, whether it progresses.

For each replica of each provider, on the injected clock:

  - B{discovery}: its C{GET /models}, retried with backoff (1 s doubling to
    30 s) until it answers, then refreshed every C{refresh_interval}; a
    failed refresh keeps the last known models. Also re-read at once when a
    replica recovers or restarted (its C{process_start_time_seconds} changed).
  - B{health}: C{GET /health} (vLLM; the model list elsewhere) every
    C{health_interval}. A replica is ready once it has answered and listed
    its models; C{failure_threshold} failures in a row (probes, or requests
    the exchange reports) put a ready one down, and a successful probe brings
    it back by itself: at once when its probes had failed too, else (its
    requests failed, its C{/health} did not) after a hold, on one trial
    request (L{gomodel.routing.pool.Replica.hold}); either way once its
    models are read again (it may have come back with others).
  - B{load}: vLLM's C{/metrics} every C{metrics_interval} (0: never), parsed
    for its queue, running count, KV-cache use, generation tokens and start
    time only.
  - B{progress}: a replica whose running count stays above 0 while its
    generation-token counter does not move for C{stall_timeout} is
    C{stalled} (C{/health} stays 200 on a hung engine) until it moves again;
    back from down, its progress is watched afresh.
  - B{answers}: a ready replica whose progress no C{/metrics} shows (an
    OpenAI-compatible engine other than vLLM: SGLang, llama.cpp, TGI; or
    scrapes off) is C{unanswered} while every request it holds has waited
    past C{stall_timeout} for its answer's head and none of its answers ended
    meanwhile (a hung engine whose model list still answers): passed over
    where another replica or target can take a request, as a doubted one is,
    until that is no longer so (looked at with each health check). Its waiting
    requests are not ended: a long answer that is not streamed looks the same
    until it comes.
"""

from twisted.application.service import Service
from twisted.internet.defer import CancelledError
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gomodel.routing.pool import DOWN, LOADING, READY, STALLED
from gomodel.routing.vllm_metrics import parse_metrics

BACKOFF_START = 1.0
BACKOFF_MAX = 30.0


class _Watch:
    """What the monitor keeps per replica."""

    __slots__ = ("pool", "replica", "discovery", "in_discovery", "backoff", "healthy", "probed", "discovered_once",
                 "loops", "tokens", "progress_at", "pending", "scrape_failing", "awaiting")

    def __init__(self, pool, replica):
        self.pool = pool
        self.replica = replica
        self.discovery = None  # the delayed call of the next discovery
        self.in_discovery = None  # the Deferred of one under way
        self.backoff = BACKOFF_START / 2
        self.healthy = False
        self.probed = False
        self.discovered_once = False
        self.loops = []
        self.tokens = None
        self.progress_at = None
        self.pending = set()  # probes and scrapes under way, cancelled when the monitor stops
        self.scrape_failing = False  # its metrics scrapes fail (logged once, until one answers again)
        self.awaiting = {}  # its sends waiting for a head -> when a health check first saw them (L{_check_answers})


def _pending(watch, d):
    """Keep C{d} in C{watch.pending} until it fires."""
    watch.pending.add(d)

    def done(result):
        watch.pending.discard(d)
        return result

    return d.addBoth(done)


class ReplicaMonitor(Service):
    """Discovery, health probes, load scrapes and stall detection for every replica."""

    log = Logger()

    def __init__(self, registry, clock, *, mode="fallback", refresh_interval=300.0, health_interval=5.0,
                 metrics_interval=2.0, stall_timeout=60.0):
        self._registry = registry
        self._clock = clock
        self._mode = mode
        self._refresh_interval = refresh_interval
        self._health_interval = health_interval
        self._metrics_interval = metrics_interval
        self._stall_timeout = stall_timeout
        self._watches = [_Watch(pool, replica) for pool in registry.providers for replica in pool.replicas]
        for watch in self._watches:
            watch.replica.hold_base = health_interval

    def startService(self):
        super().startService()
        for watch in self._watches:
            pool, replica = watch.pool, watch.replica
            if self._mode == "allowlist" and pool.configured_models:
                replica.models = self._registry.inventory(pool)
                watch.discovered_once = True
            else:
                self._schedule_discovery(watch, 0)
            self._loop(watch, self._probe, self._health_interval, now=True)
            if self._metrics_interval:
                self._loop(watch, self._scrape, self._metrics_interval, now=False)

    def _loop(self, watch, f, interval, now):
        loop = LoopingCall(f, watch)
        loop.clock = self._clock
        watch.loops.append(loop)
        loop.start(interval, now=now)

    def stopService(self):
        super().stopService()
        for watch in self._watches:
            for loop in watch.loops:
                if loop.running:
                    loop.stop()
            watch.loops = []
            if watch.discovery is not None and watch.discovery.active():
                watch.discovery.cancel()
            if watch.in_discovery is not None:
                watch.in_discovery.cancel()
            for d in list(watch.pending):
                d.cancel()  # their request timers would outlive the gateway
        for pool in self._registry.providers:
            pool.close()

    def refresh(self):
        """Re-read every replica's models now (an operator asked)."""
        for watch in self._watches:
            self._schedule_discovery(watch, 0)

    # -- discovery ----------------------------------------------------------------------

    def _schedule_discovery(self, watch, delay):
        if not self.running:
            return
        if watch.discovery is not None and watch.discovery.active():
            watch.discovery.cancel()
        watch.discovery = self._clock.callLater(delay, self._discover, watch)

    def _discover(self, watch):
        watch.discovery = None
        if watch.in_discovery is not None:
            return
        d = watch.in_discovery = watch.replica.server.list_models()
        d.addCallbacks(self._discovered, self._discovery_failed, callbackArgs=(watch,), errbackArgs=(watch,))
        d.addBoth(self._settled, watch)

    @staticmethod
    def _settled(_, watch):
        watch.in_discovery = None

    def _discovered(self, data, watch):
        pool, replica = watch.pool, watch.replica
        watch.backoff = BACKOFF_START / 2
        watch.discovered_once = True
        before = replica.models
        models = {m["id"]: m for m in data}
        if not models and pool.configured_models:
            models = {m: {"id": m} for m in pool.configured_models}
            self.log.warn("provider {provider} replica {index} lists no models; using its {count} configured ones",
                          provider=pool.name, index=replica.index, count=len(models))
        replica.models = models
        if before is None or set(before) != set(models):
            self.log.info("provider {provider} replica {index}: {count} models", provider=pool.name,
                          index=replica.index, count=len(models))
        if replica.state == LOADING and watch.healthy:
            replica.set_state(READY)  # it answered its health check already
        elif replica.state == DOWN and watch.healthy and replica.readmit():  # (unless held out)
            watch.progress_at = None  # (back: its progress is watched afresh, not from a count before it went)
        self._checked(watch)
        if models != before:  # listings and resolutions are made again only when something changed
            self._registry.models_changed()
        else:
            self._registry.replicas_changed()
        self._schedule_discovery(watch, self._refresh_interval)

    def _discovery_failed(self, failure, watch):
        if failure.check(CancelledError):
            return None
        pool, replica = watch.pool, watch.replica
        watch.discovered_once = True
        watch.backoff = delay = min(watch.backoff * 2, BACKOFF_MAX)
        why = getattr(failure.value, "message", None) or failure.getErrorMessage()
        kept = "keeping its last known models" if replica.models else "no models yet"
        self.log.warn("provider {provider} replica {index}: model discovery failed ({error}); {kept}; "
                      "retrying in {delay:.0f}s", provider=pool.name, index=replica.index, error=why, kept=kept,
                      delay=delay)
        replica.last_error = why
        self._checked(watch)
        self._registry.replicas_changed()  # a provider whose replicas all failed is known now (its configured models)
        self._schedule_discovery(watch, delay)
        return None

    def _checked(self, watch):
        """Both first checks (health and discovery) of a replica have answered or failed."""
        if watch.probed and watch.discovered_once:
            watch.replica.checked = True

    # -- health ------------------------------------------------------------------------

    def _probe(self, watch):
        if self._stall_timeout:
            self._check_answers(watch)
        d = watch.replica.server.health()
        d.addCallbacks(self._healthy, self._unhealthy, callbackArgs=(watch,), errbackArgs=(watch,))
        return _pending(watch, d)

    def _healthy(self, _, watch):
        replica = watch.replica
        was_healthy, watch.healthy = watch.healthy, True
        watch.probed = True
        replica.probe_passed()
        if replica.state == LOADING and replica.models is not None:
            replica.set_state(READY)
        elif replica.state == LOADING and not was_healthy:
            # It has just come up (a loading vLLM answers /health once its engine is ready):
            # list its models now rather than at the end of the discovery backoff (up to 30s).
            self._schedule_discovery(watch, 0)
        elif replica.state == DOWN and not replica.held_for():  # (else held out)
            # Back: ready again once its models are read again (L{_discovered}): it may have come back with
            # others (a restart loses the LoRA adapters loaded at run time), and none must go there before.
            self._schedule_discovery(watch, 0)
        self._checked(watch)
        self._registry.replicas_changed()

    def _unhealthy(self, failure, watch):
        if failure.check(CancelledError):
            return None
        watch.healthy = False
        watch.probed = True
        why = getattr(failure.value, "message", None) or failure.getErrorMessage()
        watch.replica.failed(why, probe=True)
        self._checked(watch)
        self._registry.replicas_changed()
        return None

    def _check_answers(self, watch):
        """Whether a replica whose progress no C{/metrics} shows is L{gomodel.routing.pool.Replica.unanswered}:
        each request it holds waiting for a head (none past its head) seen waiting C{stall_timeout} ago or more,
        and none of its answers ended since then."""
        replica = watch.replica
        awaiting = getattr(replica.server, "awaiting", None)
        if (not awaiting or watch.tokens is not None or replica.state != READY
                or replica.in_flight > len(awaiting)):  # (one holds an answer coming: it answers)
            watch.awaiting = {}
            replica.answering(True)
            return
        now = self._clock.seconds()
        seen = watch.awaiting
        watch.awaiting = seen = {d: seen.get(d, now) for d in awaiting}
        newest = max(seen.values())
        ended = replica.timed_at
        if now - newest >= self._stall_timeout and (ended is None or ended <= newest):
            replica.answering(False, f"{len(seen)} requests waited {now - newest:.0f}s or more for an answer, "
                                     f"none answered meanwhile")
        else:
            replica.answering(True)

    # -- load and progress -----------------------------------------------------------------

    def _scrape(self, watch):
        if watch.replica.state in (LOADING, DOWN):
            return None
        d = watch.replica.server.scrape()
        d.addCallbacks(self._scraped, self._scrape_failed, callbackArgs=(watch,), errbackArgs=(watch,))
        return _pending(watch, d)

    def _scraped(self, page, watch):
        if page is None:
            return
        if watch.scrape_failing:
            watch.scrape_failing = False
            self.log.info("provider {provider} replica {index}: metrics scrape answers again",
                          provider=watch.pool.name, index=watch.replica.index)
        sample = parse_metrics(page)
        replica = watch.replica
        if sample.start_time is not None and replica.start_time is not None and sample.start_time != replica.start_time:
            self.log.info("provider {provider} replica {index} restarted; re-reading its models",
                          provider=watch.pool.name, index=replica.index)
            replica.slots = None  # it may run another batch size now
            self._schedule_discovery(watch, 0)
        if sample.start_time is not None:
            replica.start_time = sample.start_time
        replica.reported(sample)
        self._check_progress(watch, sample)

    def _scrape_failed(self, failure, watch):
        """Log the first failure of a streak (a server without C{/metrics} fails every scrape: one line, not
        one every interval); the replica's load is then its own count of requests (L{Replica.standing}), and its
        progress, which no scrape shows now, is judged by its answers (L{_check_answers}; its token count watched
        afresh once a scrape answers again)."""
        if failure.check(CancelledError):
            return None
        watch.tokens = watch.progress_at = None
        if not watch.scrape_failing:
            watch.scrape_failing = True
            self.log.warn("provider {provider} replica {index}: metrics scrape failed: {error} (logged again "
                          "only after one answers; its load is counted by the gateway meanwhile)",
                          provider=watch.pool.name, index=watch.replica.index, error=failure.getErrorMessage())
        return None

    def _check_progress(self, watch, sample):
        replica = watch.replica
        now = self._clock.seconds()
        if not self._stall_timeout or not sample.running or sample.generation_tokens is None:
            watch.tokens, watch.progress_at = sample.generation_tokens, now
            if replica.state == STALLED:
                replica.set_state(READY)
            return
        if sample.generation_tokens != watch.tokens or watch.progress_at is None:
            watch.tokens, watch.progress_at = sample.generation_tokens, now
            if replica.state == STALLED:
                replica.set_state(READY)
        elif now - watch.progress_at >= self._stall_timeout and replica.state == READY:
            replica.set_state(STALLED, f"{sample.running:g} requests running and no token generated for "
                                       f"{now - watch.progress_at:.0f}s")

"""Running batches: validate the input file, send each line upstream, write the output files.

Every step is persisted before the next one, so that a gateway stopped (or
killed) in the middle of a batch resumes it at its next start without losing
or repeating an answer:

  - C{validating}: the input file is read in slices; valid lines are stored
    as the batch's requests (a failed validation stores the errors with their
    line numbers and ends in C{failed}).
  - C{in_progress}: lines without a result are sent upstream, at most
    C{BATCH_CONCURRENCY_PER_PROVIDER} at a time per provider; each answer is
    recorded (keyed by batch and line, exactly once) as soon as it is read. A
    line falls back as an online request does (a virtual model's other
    targets, failover candidates: see L{gomodel.proxy.exchange.Exchange});
    transient failures of every target (unreachable upstream, 429 but a spent
    quota's, 502, 503, 504, an answer that broke off) are retried from the
    first with backoff up to C{BATCH_MAX_ATTEMPTS}. A line holds one slot of the provider it is at
    (its first target's, then each fallback's it goes on to, then the first's
    again for a retry), giving the one it holds up before it waits for the
    next: fallbacks count at the provider they reach, and no two lines wait
    on each other's slot. A line refused by its key's budget while lines of
    its batch are in flight waits for one of them to end without a slot.
  - C{finalizing} -> C{completed}: the output and error files are written
    from the recorded results.
  - Past C{expires_at}: the lines not answered get C{batch_expired} errors and
    the batch ends C{expired}, with its files.
  - C{cancelling} -> C{cancelled}: requests in flight are cancelled (vLLM
    aborts them, having read their prompts: each is kept in the usage ledger,
    estimated, as an expired or stopped batch's are); what was answered is
    kept in the files.

Any process may run any batch: the runner I{claims} it in the store (an
owner, a lease of C{lease} seconds renewed as a heartbeat, a fencing token
incremented per claim) and releases it when done. Every
C{poll_interval} seconds, and as soon as one of its batches ends, it claims
unfinished batches whose lease is free or expired (a process that died),
resuming them where the recorded results end, and passes on cancellations
stored by other processes. It holds at most C{max_claimed} batches, and
leaves fresh ones to idler processes first (L{gomodel.batches.claiming}):
batches spread over the hosts wherever they were created. Results are
written with the token: a runner that lost its lease records nothing, so no
line is ever recorded twice. A batch whose results cannot be written (a full
disk) is released with a backoff (exponential, capped) instead of being
driven again at once. A batch that stops with an unexpected error (not the
store being unavailable) C{BATCH_MAX_ATTEMPTS} times in a row on one process
ends C{failed}, with an C{internal_error} and the files of what was answered,
instead of being tried forever. At a drain, no line is sent any more, those in flight are answered and recorded,
and a batch left with no line to send is concluded. At stop, requests in flight are cancelled,
answers already read are recorded, and the claims are released.
"""

import uuid
from functools import partial
from inspect import isawaitable

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, DeferredSemaphore
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from gomodel import jsonutil
from gomodel.accounting.tokens import prompt_estimate
from gomodel.batches.claiming import MAX_CLAIMED, ClaimLoop
from gomodel.batches.concluding import conclude, give_up
from gomodel.batches.lines import PAGE_BYTES, Job, error_line, output_line
from gomodel.batches.validating import validate
from gomodel.batches.validation import checked_metadata
from gomodel.errors import (BadUpstreamResponse, BudgetExceeded, Conflict, GatewayError, NoReadyReplica, NotFound,
                            ReplicasBusy, StorageUnavailable, UpstreamUnreachable, shown)
from gomodel.api.inference import held, key_priority, plan_model
from gomodel.api.messages import MAX_COMPLETION_TYPES
from gomodel.http.context import CLIENT_GONE, CLIENT_GONE_STATUS
from gomodel.http.headers import is_event_stream
from gomodel.proxy import gather as gathered
from gomodel.proxy.exchange import upstream_call, usage_of
from gomodel.proxy.renamed import model_named, model_renamed
from gomodel.proxy.sse import StreamIncomplete
from gomodel.proxy.transfers import without_transfers
from gomodel.responses_history import (checked_previous_id, continued, error_hidden, names_previous, no_chosen_id,
                                      normalise_input, relink, unknown_previous, with_history, with_references)
from gomodel.store.records import OPENAI_BATCH, LeaseLost, process_owner
from gomodel.translate.call_ids import SHORT_ID_TYPES, fit_call_ids
from gomodel.translate.openai_body import OPENAI_TYPES, for_openai
from gomodel.translate.responses_chat import (NativeResponses, chat_to_response, checked_include,
                                              native_kept_nowhere, no_native_route, request_to_chat)
from gomodel.upstream.errors import out_of_quota, upstream_error

TRANSIENT_STATUSES = frozenset((429, 502, 503, 504))
BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
PAGE = 256  # requests read from the store at a time
READY_WAIT = 30.0  # at start, how long resumed batches wait for model discovery
POLL_INTERVAL = 1.0  # how often a runner looks for batches to claim and for cancellations
LEASE = 30.0  # how long a claim on a batch lasts without a heartbeat
CANCELLABLE = ("validating", "in_progress")  # what a cancellation moves to cancelling
CANCELLED = ("cancelling", "cancelled")  # what a cancellation leaves as it is (idempotent)


class _Answer:
    """What the upstream said to one request: C{provider} and C{model}, the target that answered (the line's
    first, or a fallback) and its upstream model, C{replica} the index of its replica that did, in
    C{seconds}."""

    def __init__(self, status, request_id, body, provider, model, replica=None, seconds=None):
        self.status = status
        self.request_id = request_id
        self.body = body
        self.provider = provider
        self.model = model
        self.replica = replica
        self.seconds = seconds


class _NoAnswer:
    """A request that got no usable answer: C{reached}, where it was sent and no answer came (the upstream
    timed out, or lost the connection, or the line was halted while it was there), the C{(pool, replica index,
    model)} of its last such send (it read the prompt: L{BatchRunner._account_unanswered}), else None;
    C{status}, its error's; C{gone}: the gateway left first (the line was halted)."""

    def __init__(self, code, message, reached=None, status=None, gone=False):
        self.code = code
        self.message = message
        self.reached = reached
        self.status = status
        self.gone = gone


def _chat_response(echo, now, answer: bytes, model) -> bytes:
    """A translated C{/v1/responses} line's C{answer}: the response object of a chat completion (L{chat_to_response},
    C{echo} the line's settings), or as it is where it is one already (a fallback asked natively answered it)."""
    try:
        native = jsonutil.loads(answer).get("object") == "response"
    except (jsonutil.JSONError, AttributeError):
        native = False
    return answer if native else chat_to_response(answer, echo, now)


def _relinked(previous_id, answer: bytes, model) -> bytes:
    """A line's response, sent its conversation explicitly, naming the response it follows (L{relink})."""
    return relink(previous_id, None, answer)


class _Slot:
    """The one provider slot (L{BatchRunner.semaphore}) a line of C{job} holds, if any: the provider it is at."""

    __slots__ = ("_job", "_semaphore", "_held")

    def __init__(self, job, semaphore, held):
        """
        @param job: the line's L{Job} (halted: a slot that comes sends nothing).
        @param semaphore: provider name -> its L{DeferredSemaphore}.
        @param held: the semaphore acquired for the line's first target.
        """
        self._job = job
        self._semaphore = semaphore
        self._held = held

    async def enter(self, pool):
        """Hold a slot of C{pool} instead of the one held, given up first (none is held while waiting);
        fires with None once it holds it (at once when it did already). Cancelled while it waits, it holds
        none.

        @raise CancelledError: the job was halted (a drain too) before, or by the time the slot came (a slot
            given back by a line the halt just cancelled): nothing more is sent; the slot is held until the line's
            L{release}.
        """
        if self._job.stop is not None:
            raise CancelledError()
        semaphore = self._semaphore(pool.name)
        if semaphore is self._held:
            return
        self.release()
        await semaphore.acquire()
        self._held = semaphore
        if self._job.stop is not None:
            raise CancelledError()

    def release(self):
        """Give the slot held back (if any)."""
        held, self._held = self._held, None
        if held is not None:
            held.release()


class _Reserved:
    """What a line reserved of its key's budgets (L{gomodel.limits.gate.Gate.reserve_line}), settled once: by the
    charge of what it used, or given back when it is done without one."""

    __slots__ = ("_reservation",)

    def __init__(self, reservation):
        self._reservation = reservation

    def take(self):
        """The reservation, the first time (None after, or where nothing was reserved)."""
        reservation, self._reservation = self._reservation, None
        return reservation


class BatchRunner(Service):
    """Executes batches against the providers, durably, under claims (see the module docstring)."""

    log = Logger()

    def __init__(self, batches, blobs, registry, clock, exchange, *, concurrency=4, max_attempts=4,
                 backoff_start=BACKOFF_START, backoff_max=BACKOFF_MAX, lease=LEASE, poll_interval=POLL_INTERVAL,
                 max_claimed=MAX_CLAIMED, owner=None, usage=None, keys=None, salts=None, gate=None,
                 responses=None, messages=None, native_responses=None, over=None):
        """
        @param batches: the L{gomodel.store.interfaces.IBatchStore}.
        @param usage: the L{gomodel.accounting.usage.UsageLedger} each answered line is recorded in, or None.
        @param exchange: the L{gomodel.proxy.exchange.Exchange} that sends each line.
        @param blobs: the L{gomodel.store.interfaces.IBlobStore} holding input and output contents.
        @param lease: seconds a claim lasts; renewed every third of it while working.
        @param poll_interval: seconds between looks for batches to claim (0: never); a runner holding
            C{k} batches takes a free one only once it has been free for C{k} of them.
        @param max_claimed: how many batches this runner holds at most.
        @param owner: this process's owner id for claims (default: a new unique one).
        @param keys: the L{gomodel.auth.keys.KeyRing}: a batch made with a managed key runs as
            that key (its model access, its usage), for the batch's tenant (its cache salt: L{_body_for}).
        @param salts: the L{gomodel.auth.tenancy.CacheSalts}, or None.
        @param gate: the L{gomodel.limits.gate.Gate}: a line whose key or user path spent its
            budget fails with C{budget_exceeded} instead of being sent.
        @param responses: the L{gomodel.store.interfaces.IResponseStore}: a managed key's C{/v1/responses}
            line continues only a stored response of its tenant (None: no such line is checked).
        @param messages: the L{gomodel.anthropic.batches.MessagesLines}: how a C{/v1/messages} line goes
            upstream, natively or translated (None: natively).
        @param native_responses: the L{NativeResponses} shared with the online Responses route: a C{/v1/responses}
            line to a provider known to have no C{/responses} goes translated at once (default: the runner's own).
        @param over: the online Responses route's L{gomodel.api.responses.ResponsesRoute.over}: a C{/v1/responses}
            line continuing a background response still queued or in progress fails as online, unsent (None: such a
            line is not checked).
        """
        self._batches = batches
        self._blobs = blobs
        self._registry = registry
        self._clock = clock
        self._exchange = exchange  # a gomodel.proxy.exchange.Exchange
        self._usage = usage
        self._keys = keys
        self._salts = salts
        self._gate = gate
        self._responses = responses
        self._messages = messages
        self._native_responses = native_responses if native_responses is not None else NativeResponses(clock)
        self._over = over
        self._concurrency = concurrency
        self._max_attempts = max_attempts
        self._backoff_start = backoff_start
        self._backoff_max = backoff_max
        self._lease = lease
        self.owner = owner if owner is not None else process_owner()
        self._semaphores = {}
        self._jobs = {}
        self._parked = {}  # batch id -> how many times in a row it could not be recorded
        self._broken = {}  # batch id -> how many times in a row it stopped with an unexpected error
        self._resuming = None
        self.draining = False  # the gateway is stopping: no batch is claimed, no line sent (L{drain})
        self.lines_recorded = None  # lines_recorded(ok, count): the metrics' (GatewayMetrics.batch_lines), or None
        # tokens_counted(provider type, name, model, usage, principal, endpoint) of a line's usage, or None: the
        # metrics' and OpenTelemetry's (GatewayMetrics.tokens_apart, Telemetry.tokens_apart)
        self.tokens_counted = None
        self._claims = ClaimLoop(batches, clock, self.owner, lease, poll_interval, self._jobs, self._start,
                                 max_claimed)

    # -- service ----------------------------------------------------------------

    def startService(self):
        super().startService()
        self._claims.start()
        self._resuming = Deferred.fromCoroutine(self._resume())
        self._resuming.addErrback(self._resume_failed)
        self._resuming.addCallback(lambda _: self._claims.poll())

    def drain(self):
        """Stop starting batch work, the gateway stopping (L{gomodel.lifecycle.Drain}): no batch is claimed any
        more and no line is sent, sent again or sent on to a fallback (the lines not sent stay pending); the lines
        in flight go on and their answers are recorded, then a batch with no line left to send is concluded (its
        files written, as without a drain) and each other one is released as it is, to resume at the next start or
        on another host. L{stopService} cuts what is still in flight then.

        @return: a Deferred firing once every batch held here is released.
        """
        self.draining = True
        return self._halt_all(self._claims.stop_claiming, "drain")

    def stopService(self):
        super().stopService()
        return self._halt_all(self._claims.stop, "shutdown")

    def _halt_all(self, stop_claims, reason):
        """Stop resuming, C{stop_claims()}, and halt every job held here for C{reason}.

        @return: a Deferred firing once every job's task has ended."""
        if self._resuming is not None:
            self._resuming.cancel()
        stop_claims()
        jobs = list(self._jobs.values())
        for job in jobs:
            job.halt(reason)
        return DeferredList([job.task for job in jobs])

    async def _resume(self):
        if not await self._batches.unfinished():
            return
        await self._models_known()
        await self._claims.claim_free()

    async def _models_known(self):
        """Wait (a while) for model discovery, so that resumed lines resolve as they did."""
        ready = self._registry.ready()
        timer = self._clock.callLater(READY_WAIT, ready.cancel)
        try:
            await ready
        except CancelledError:
            if timer.active():
                raise  # we are stopping
        finally:
            if timer.active():
                timer.cancel()

    def _resume_failed(self, failure):
        if failure.check(CancelledError):
            return None
        if failure.check(StorageUnavailable):
            self.log.warn("batches cannot be resumed: {error}", error=failure.value.message)
            return None
        self.log.failure("resuming batches failed", failure)
        return None

    # -- what the API asks ------------------------------------------------------

    @property
    def held(self) -> frozenset:
        """The ids of the batches this runner holds now."""
        return frozenset(self._jobs)

    def semaphore(self, provider_name) -> DeferredSemaphore:
        """The per-provider limit on requests in flight, shared by every batch."""
        sem = self._semaphores.get(provider_name)
        if sem is None:
            sem = self._semaphores[provider_name] = DeferredSemaphore(self._concurrency)
        return sem

    async def create(self, endpoint, input_file_id, window_text, window_seconds, metadata, *, output_expiry=None,
                     tenant=None, auth_key_id=None, total=None, kind=OPENAI_BATCH):
        """Store a new batch (C{validating}); returns its record.

        It starts here at once when this runner holds no batch; otherwise it
        waits, unclaimed, for the first runner (on any host) with room to take it.

        @param output_expiry: the seconds after which its output and error files expire once written
            (C{output_expires_after}), or None: they are kept.
        @param tenant: who owns it and its output (see L{gomodel.auth.tenancy}).
        @param auth_key_id: the managed key that made it (its lines are that key's usage).
        @param total: how many requests it has, when that is known before its validation (a message batch's).
        @param kind: L{OPENAI_BATCH} or L{gomodel.store.records.MESSAGE_BATCH}: the API that shows it.
        """
        now = int(self._clock.seconds())
        record = {
            "id": "batch_" + uuid.uuid4().hex, "endpoint": endpoint, "input_file_id": input_file_id,
            "completion_window": window_text, "status": "validating", "created_at": now,
            "expires_at": now + max(1, round(window_seconds)), "metadata": metadata, "tenant": tenant,
            "auth_key_id": auth_key_id, "output_expires_after": output_expiry, "kind": kind,
        }
        if total is not None:
            record["total"] = total
        record = await self._batches.add(record)
        await self._claims.claim_new(record["id"])
        return record

    async def _claim(self, batch_id):
        """Claim C{batch_id} and start it, unless it is ours already or held elsewhere (whatever we hold)."""
        if not self.running or self.draining or batch_id in self._jobs:
            return
        got = await self._batches.claim(batch_id, self.owner, self._lease)
        if got is not None:
            self._start(*got)

    async def cancel(self, batch_id):
        """Ask a batch to stop (C{POST /v1/batches/{id}/cancel}); returns its record.

        As OpenAI's: a C{validating} or C{in_progress} batch moves to C{cancelling} (its C{cancelling_at}
        set), then to C{cancelled} once the process holding its claim has stopped it (at its next poll),
        keeping what was answered. Cancelling is idempotent: a batch already C{cancelling} or C{cancelled}
        is returned as it is (200). Any other has nothing left to stop and is refused with L{Conflict}
        (409, code C{batch_not_cancellable}): one C{finalizing} (every line answered, its files being
        written: it ends C{completed}) and the other ends, C{completed}, C{failed} and C{expired}.

        @raise NotFound: no such batch (C{batch_not_found}).
        @raise Conflict: the batch cannot be cancelled (C{batch_not_cancellable}).
        """
        batch = await self._batches.get(batch_id)
        if batch is None:
            raise NotFound(f"No such Batch object: {shown(batch_id)}", param="batch_id", code="batch_not_found")
        status = batch["status"]
        if status in CANCELLABLE:
            updated = await self._batches.update(
                batch_id, {"status": "cancelling", "cancelling_at": int(self._clock.seconds())},
                only_if_status=CANCELLABLE)
            if updated is None:  # it moved on meanwhile: answer from where it is now
                return await self.cancel(batch_id)
            job = self._jobs.get(batch_id)
            if job is not None:
                job.halt("cancel")
            else:
                await self._claim(batch_id)
            return updated
        if status in CANCELLED:
            return batch
        raise Conflict(f"Cannot cancel the batch {batch_id}: its status is '{status}', and only a batch "
                       "'validating' or 'in_progress' can be cancelled.", code="batch_not_cancellable")

    # -- one batch ----------------------------------------------------------------

    def _start(self, record, token):
        batch_id, expires_at = record["id"], record["expires_at"]
        if batch_id in self._jobs:
            self._jobs[batch_id].token = token
            return
        job = self._jobs[batch_id] = Job(batch_id, token)
        if not self.running:
            job.stop = "shutdown"
        elif self.draining:  # (a claim under way when the drain began)
            job.stop = "drain"
        delay = expires_at - self._clock.seconds() if expires_at is not None else None
        if delay is not None:
            if delay <= 0:
                job.halt("expire")
            else:
                job.expiry = self._clock.callLater(delay, job.halt, "expire")
        job.task = Deferred.fromCoroutine(self._work(job))
        job.task.addBoth(self._job_done, job)

    async def _work(self, job):
        """Run the batch, then give the claim up (with a backoff when it could not be recorded)."""
        try:
            await self._run(job)
        except Exception:
            self._job_failed(Failure(), job)
        if job.stop == "lost":  # (its lines' writes are over: refused, its claim's token stale)
            self.log.warn("batch {batch_id}: our claim was taken over; stopped here", batch_id=job.batch_id)
            return
        if job.broken and await self._broke(job):
            delay = 0
        elif job.stop == "park" or job.failed:
            count = self._parked.get(job.batch_id, 0)
            self._parked[job.batch_id] = count + 1
            delay = min(self._backoff_start * 2 ** count, self._backoff_max)
            self.log.warn("batch {batch_id}: results cannot be recorded; it is tried again in {delay} s",
                          batch_id=job.batch_id, delay=delay)
        else:
            delay = 0
            if job.stop not in ("drain", "shutdown"):
                self._parked.pop(job.batch_id, None)
                self._broken.pop(job.batch_id, None)
        try:
            await self._batches.release(job.batch_id, self.owner, job.token, delay)
        except Exception as e:  # the lease runs out by itself
            self.log.warn("batch {batch_id}: releasing its claim failed ({error})", batch_id=job.batch_id,
                          error=getattr(e, "message", None) or repr(e))

    async def _broke(self, job):
        """Count a stop of C{job} with an unexpected error; the C{max_attempts}-th in a row ends its batch
        C{failed} (L{give_up}). Whether it did: else it is released with a backoff, to be tried again."""
        count = self._broken[job.batch_id] = self._broken.get(job.batch_id, 0) + 1
        if count < self._max_attempts:
            return False
        try:
            await give_up(self._batches, self._blobs, job, count, self._now)
        except Exception:
            self.log.failure("batch {batch_id}: ending it failed; it is tried again later", batch_id=job.batch_id)
            return False
        self._broken.pop(job.batch_id, None)
        self._parked.pop(job.batch_id, None)
        self.log.error("batch {batch_id} failed: it stopped with an unexpected error {count} times in a row",
                       batch_id=job.batch_id, count=count)
        return True

    def _job_failed(self, failure, job):
        if failure.check(LeaseLost):
            job.halt("lost")
            return
        if job.stop in ("drain", "shutdown") and failure.check(StorageUnavailable, CancelledError):
            return  # stopping: the batch resumes where it is
        if failure.check(CancelledError):
            return
        job.failed = True
        job.halt("park")
        if failure.check(StorageUnavailable):
            self.log.warn("batch {batch_id} paused: {error}", batch_id=job.batch_id, error=failure.value.message)
        else:
            job.broken = True
            self.log.failure("batch {batch_id} stopped unexpectedly; it is tried again later", failure,
                             batch_id=job.batch_id)

    def _job_done(self, _, job):
        if job.expiry is not None and job.expiry.active():
            job.expiry.cancel()
        if self._jobs.get(job.batch_id) is job:
            del self._jobs[job.batch_id]
        if self.running and self._resuming is not None and self._resuming.called:
            self._claims.look()  # room for another batch (after the start's resumption: models are known)
        watchers, job.watchers = job.watchers, []  # (after that look began: L{settled} waits for it too)
        for d in watchers:
            d.callback(None)

    async def settled(self, batch_id):
        """Wait until nothing works on C{batch_id} here (after batches were resumed at start), and no look for
        free batches is under way (the one a batch's end starts): a batch left free while this runner was busy,
        which that look takes, is held here when this returns, and its own C{settled} waits for it."""
        if self._resuming is not None and not self._resuming.called:
            resumed = Deferred()
            self._resuming.addBoth(lambda result: (resumed.callback(None), result)[1])
            await resumed
        job = self._jobs.get(batch_id)
        if job is not None:
            d = Deferred()
            job.watchers.append(d)
            await d
        await self._claims.quiet()

    async def _run(self, job):
        batch = await self._batches.get(job.batch_id)
        if batch is None:
            return
        job.tenant = batch.get("tenant")
        if batch.get("auth_key_id") and self._keys is not None:
            job.principal = await self._principal(batch["auth_key_id"])
        if batch["status"] == "validating":
            if not await validate(self._batches, self._blobs, self._registry, job, batch, self._now):
                return
            batch = await self._batches.get(job.batch_id)
        if batch["status"] == "in_progress" and job.stop is None:
            await self._dispatch(job, batch)
        await conclude(self._batches, self._blobs, job, self._now)

    def _now(self):
        return int(self._clock.seconds())

    # -- in progress ------------------------------------------------------------------

    async def _dispatch(self, job, batch):
        path = batch["endpoint"][len("/v1"):]
        after = 0
        while job.stop is None:
            rows = await self._batches.pending(job.batch_id, after, PAGE, max_bytes=PAGE_BYTES)
            if not rows:
                break
            for line, custom_id, body in rows:
                if job.stop is not None:
                    break
                after = line
                await self._launch(job, path, line, custom_id, body)
        while job.lines:
            await DeferredList(list(job.lines))

    async def _principal(self, key_id):
        """The managed key a batch runs as, read again when this process has not seen it yet (made on
        another process since the last refresh): never None, which would run the lines unrestricted.

        @raise StorageUnavailable: the key cannot be read now (keys are never deleted); the job backs off.
        """
        principal = self._keys.by_id(key_id)
        if principal is None:
            await self._keys.refresh()
            principal = self._keys.by_id(key_id)
        if principal is None:
            raise StorageUnavailable(f"The key {key_id} that made the batch cannot be read yet.")
        return principal

    async def _launch(self, job, path, line, custom_id, body):
        """Send one line once its first target's provider has room (the line then runs on its own, holding
        the slot of the provider it is at: L{_Slot}). A managed key's line runs as the key is now (L{_key_now});
        one of a key deactivated or expired since the batch started fails (C{invalid_api_key}) instead of being
        sent."""
        self._key_now(job)
        body_for = self._bodies(job)
        try:
            payload = jsonutil.loads(body)
            route, *fallbacks = plan_model(self._registry, payload, None, job.principal)
            prefer = unheld = again = answer = previous = None  # answer: what makes a successful answer the line's
            sending = payload  # (None: it is, as it came); sending: the line's body as it goes upstream
            if path == "/responses" and "request_id" in payload:
                await no_chosen_id(self._responses, payload, job.principal)
            if path == "/responses":  # (as online, L{ResponsesRoute.create}: refused before any upstream)
                checked_include(payload.get("include"))
                checked_metadata(payload.get("metadata"))
                native_kept_nowhere(route.provider.type, payload)
            if path == "/responses" and payload.get("previous_response_id") is not None:
                previous = await self._previous(payload, job.principal, job.tenant)
                if previous is not None and self._over is not None:  # (one still running: refused, as online)
                    previous = await self._over(previous, f"{job.batch_id}-{line}".encode("ascii"))
                fallbacks = ()  # (the conversation is held where it was made: another target would refuse it)
                if previous is not None and await self._responses.follows_deleted(previous["id"]):
                    # (a turn deleted: it goes on from the turns after it, explicitly, as online)
                    sending = await with_history(self._responses, payload, previous)
                    answer = partial(_relinked, payload["previous_response_id"])
                elif previous is not None:  # to that instance and replica, as online (where the key may use it)
                    route = held(self._registry, route, previous, job.principal)
                    # (its item_references as the items of the conversation they name: vLLM does not resolve them)
                    sending = await with_references(self._responses, payload, previous)
                    prefer = previous.get("replica") if previous["provider"] == route.provider.name else None
                    # (an instance that no longer holds it, restarted: sent the conversation explicitly, as online)
                    again = partial(self._explicitly, payload, previous, route, body_for)
                else:  # (a master key's id the gateway does not hold: the upstream's 404 for it is OpenAI's 400)
                    unheld = payload["previous_response_id"]
            if path == "/messages" and self._messages is not None:  # natively, or translated to chat
                again = partial(self._translated, payload, route, fallbacks, job.principal, body_for)
                sent, first, fallbacks, rebody, answer = self._messages.plan(
                    payload, route, fallbacks, job.principal, body_for)
                if sent != "/messages":
                    again = None  # (translated already)
            else:
                if path == "/responses":  # (a provider without /responses: translated to chat completions, as online)
                    again = partial(self._responses_again, payload, previous, route, body_for, again,
                                    fallbacks, prefer)
                sent, rebody = path, partial(body_for, sending)
                first = rebody(route.upstream_model, route.provider)
        except StorageUnavailable:
            raise  # the line stays pending: the job backs off
        except GatewayError as e:
            await self._unsent(job, line, custom_id, e.code or "invalid_request", e.message)
            return
        sem = self.semaphore(route.provider.name)
        job.waiting = sem.acquire()
        try:
            await job.waiting
        except CancelledError:
            return
        finally:
            job.waiting = None
        if job.stop is not None:
            sem.release()
            return
        if self._key_now(job) is False:
            sem.release()
            await self._unsent(job, line, custom_id, "invalid_api_key", "The API key that made the batch was "
                               "deactivated or has expired: its lines are not sent.")
            return
        if path == "/responses" and not self._native_responses.native(route.provider.name):
            # (a provider known, maybe since the line was read, to have no /responses: translated at once, as online)
            body_for = self._bodies(job)  # (as the key is now, after the wait)
            try:
                translated, answer = await self._as_chat(payload, previous, route, body_for, fallbacks, prefer)
            except BaseException as e:
                sem.release()
                if not isinstance(e, GatewayError) or isinstance(e, StorageUnavailable):
                    raise
                await self._unsent(job, line, custom_id, e.code or "invalid_request", e.message)
                return
            sent, first, fallbacks, rebody = translated.path, translated.body, translated.fallbacks, translated.rebody
            # (a fallback asked natively that has no /responses: translated there, as online)
            again = partial(self._fallback_refused, route, payload, previous, body_for, fallbacks)
        reserved = None
        if self._gate is not None:
            try:
                reserved = await self._reserve(job, sem, f"{route.provider.name}/{route.upstream_model}", first, sent)
            except GatewayError as e:
                if isinstance(e, StorageUnavailable):
                    raise
                if isinstance(e, BudgetExceeded) and self._usage is not None:  # (the key's usage, as online)
                    self._usage.refusal(f"{job.batch_id}-{line}", self._clock.seconds(), route.provider.type,
                                        route.provider.name, route.upstream_model, "/v1" + path, job.principal)
                await self._unsent(job, line, custom_id, e.code or "invalid_request", e.message)
                return
            if reserved is None:
                return
        slot = _Slot(job, self.semaphore, sem)
        call = upstream_call(sent, first, model=route.upstream_model, prefer=prefer, fallbacks=fallbacks,
                             rebody=rebody if fallbacks else None)
        kept = payload if path == "/responses" and self._responses is not None and payload.get("store") is not False \
            else None
        d = Deferred.fromCoroutine(self._line(job, path, line, custom_id, route.provider, call, slot, answer, again,
                                              unheld, kept, reserved))

        def release(result):
            slot.release()
            if reserved is not None:  # (what no charge settled: a line halted, or answered without usage)
                rest = reserved.take()
                if rest is not None:
                    self._gate.charge(job.principal, None, None, rest)
            return result

        self._track(job, d.addBoth(release))

    def _key_now(self, job):
        """Take the managed key a batch runs as as it is now (its budgets, models and priority as last edited,
        on any process): whether it is still active (None for a batch of the master key)."""
        principal = job.principal
        if principal is None:
            return None
        principal = job.principal = self._keys.by_id(principal.id) or principal
        return principal.active and (principal.expires_at is None or self._clock.seconds() < principal.expires_at)

    async def _reserve(self, job, sem, model, body, path):
        """Reserve the line's estimate from the budgets of the batch's key once the line holds its slot (C{sem},
        given back if refused), as an online request's admission does (L{gomodel.limits.gate.Gate.reserve_line}:
        C{body} as sent to its first target, at C{path}, C{model}): a line that waited for its slot is refused by what
        the lines before it spent, and those in flight reserved, meanwhile (before, lines sent at once were each
        checked, then charged: each saw the room left). A budget spent while lines of the batch are in flight is
        tried again once one of them ends (it gives back what it reserved and did not use), the slot given back
        meanwhile and taken again before (other batches' lines at the provider go on while it waits); spent with
        none, it is the line's error (C{budget_exceeded}).

        @return: the line's L{_Reserved} (the slot held), or None: the job was halted meanwhile (no slot held).
        @raise GatewayError: refused (C{BudgetExceeded}; the slot given back).
        """
        while True:
            try:
                reservation = await self._gate.reserve_line(job.principal, model, body, path)
            except BudgetExceeded:
                sem.release()
                if not job.lines:
                    raise
            except BaseException:
                sem.release()
                raise
            else:
                return _Reserved(reservation)
            await DeferredList(list(job.lines), fireOnOneCallback=True)  # (one ends: tracked, it never fails)
            if job.stop is not None:
                return None
            job.waiting = sem.acquire()
            try:
                await job.waiting
            except CancelledError:  # (halted while it waited)
                return None
            finally:
                job.waiting = None
            if job.stop is not None:
                sem.release()
                return None

    def _unsent(self, job, line, custom_id, code, message):
        """Record the error C{code} of a line that is not sent, as L{_track} does; fires once it is written (or
        its failure was taken in), so that a batch of such lines has one write under way at a time, not each."""
        recorded = self._record(job, line, custom_id, False, error_line(custom_id, code, message))
        self._track(job, recorded)
        return recorded

    def _bodies(self, job):
        """C{body_for(payload, model, provider)}: L{_body_for} for a line of C{job}, as its key is now, for its
        batch's tenant."""
        return partial(self._body_for, job.principal, job.tenant)

    def _body_for(self, principal, tenant, payload, model, provider) -> bytes:
        """The body of a line (C{payload}, as the client wrote it) for C{model} at C{provider}, with what
        that provider takes of the batch's key (C{principal}): the C{cache_salt} of the batch's C{tenant} (the team
        the key was in when it made the batch, wherever it moved since, as the batch's output and stored responses
        are that team's: or the new team would share the prefix cache with its prompts; every endpoint of a batch
        takes it at vLLM: generation and pooling) and, where it schedules by priority, the key's C{priority} (as
        online: the key's wins over the line's; a key without one, the line's no sooner than the default:
        L{key_priority}); never another target's. For an OpenAI provider, its tool call ids as short as it takes
        them and no vLLM-only field (L{for_openai})."""
        body = dict(payload, model=model)
        if self._salts is not None:
            self._salts.apply(principal, provider, body, tenant)
        if provider.priority_scheduling:
            key_priority(principal, body)
        if provider.type in OPENAI_TYPES:
            for_openai(body)
        return jsonutil.dumps(body)

    async def _previous(self, payload, principal, tenant):
        """The stored record of the response a line continues, or None (a master key's id the gateway does not
        hold goes upstream as it is). Like an online request, a managed key's line continues no response but
        its tenant's stored ones (the upstream may hold another tenant's); and, the batch's answers being its
        C{tenant}'s wherever its key moved since, none but that tenant's and the key's own (not those of a team
        the key joined since: they would go on in its old team's output).

        @raise InvalidRequest: C{previous_response_id} is no response id (L{checked_previous_id}, as online), or names a
            response the key may not continue.
        """
        previous_id = payload.get("previous_response_id")
        if previous_id is None:
            return None
        checked_previous_id(previous_id)
        if self._responses is None:
            return None
        record = await continued(self._responses, previous_id, principal)
        if record is not None and tenant is not None and record.get("tenant") != tenant and (
                principal is None or record.get("tenant") != f"key:{principal.id}"):
            raise unknown_previous(previous_id)
        return record

    def _track(self, job, d):
        job.lines.add(d)

        def done(result):
            job.lines.discard(d)
            return result

        def failed(failure):
            # The line stays pending; sending more is pointless until results can be written again.
            if failure.check(LeaseLost):
                job.halt("lost")
                return
            job.failed = True
            if failure.check(StorageUnavailable):
                self.log.warn("batch {batch_id}: recording a line failed: {error}", batch_id=job.batch_id,
                              error=failure.value.message)
                job.halt("park")
            else:
                self.log.failure("batch {batch_id}: recording a line failed", failure, batch_id=job.batch_id)
                job.broken = True
                job.halt("park")

        d.addErrback(failed)
        d.addBoth(done)

    async def _line(self, job, path, line, custom_id, provider, call, slot, answer=None, again=None, unheld=None,
                    kept=None, reserved=None):
        """Send one line (C{call}, holding C{slot}) and record its result; C{answer(body, model)} makes a
        successful answer the line's (a translated message batch line's chat completion, a message);
        C{again(outcome)}, for a message batch's line sent natively, is the C{(call, answer)} to send it with
        translated instead (L{_translated}), and for a Responses line, the one to send it with its conversation
        explicitly or translated (L{_responses_again}, awaited; a third item: the provider it goes to), or None; C{unheld}: the C{previous_response_id} of a line that
        continues a response the gateway does not hold (the upstream's 404 naming it is the line's
        C{previous_response_not_found}, as online), or None; C{kept}, a C{/v1/responses} line's body whose
        response the gateway keeps (L{_keep_response}), or None; C{reserved}, its L{_Reserved} (settled by its
        charge), or None."""
        outcome = await self._outcome(job, path, line, provider, call, slot, reserved)
        if (unheld is not None and isinstance(outcome, _Answer) and outcome.status == 404
                and names_previous(outcome.body, unheld)):
            error = unknown_previous(unheld)
            outcome = _NoAnswer(error.code, error.message)
        if again is not None and isinstance(outcome, _Answer) and outcome.status >= 400:
            try:
                retried = again(outcome)
                if isawaitable(retried):
                    retried = await retried
            except GatewayError as e:  # (a conversation that cannot be sent: an earlier turn swept, ...)
                if isinstance(e, StorageUnavailable):
                    raise
                retried, outcome = None, _NoAnswer(e.code or "invalid_request", e.message)
            if retried is not None:
                call, answer, *elsewhere = retried  # (a fallback's provider, where it goes there)
                if elsewhere:
                    provider = elsewhere[0]
                outcome = await self._outcome(job, path, line, provider, call, slot, reserved)
        if outcome is None:
            return  # halted: the line stays pending
        if isinstance(outcome, _NoAnswer) and outcome.reached is not None:
            self._account_unanswered(job, path, outcome, f"{job.batch_id}-{line}", call.body, reserved)
        if isinstance(outcome, _Answer):
            self._account(job, path, outcome, f"{job.batch_id}-{line}", reserved)
            if (200 <= outcome.status < 300 and self._salts is not None
                    and self._salts.strips(job.principal, outcome.provider)):
                outcome.body = without_transfers(outcome.body)  # (the line went without them: as online, and kept so)
            if path == "/responses" and 200 <= outcome.status < 300:  # (a failed one's error, as online)
                outcome.body = error_hidden(outcome.provider, None, outcome.body)
            if answer is not None and 200 <= outcome.status < 300:
                try:
                    outcome.body = answer(outcome.body, outcome.model)
                except GatewayError as e:  # (a generation the upstream aborted)
                    outcome = _NoAnswer(e.code, e.message)
                except (ValueError, TypeError):
                    outcome = _NoAnswer("bad_upstream_response", f"The upstream provider '{outcome.provider.name}' "
                                        "answered with something that is not a chat completion.")
            if kept is not None and isinstance(outcome, _Answer) and 200 <= outcome.status < 300:
                self._keep_response(job, kept, outcome)  # (as answered: a translated line's response object)
        ok, data = self._result(custom_id, outcome)
        await self._record(job, line, custom_id, ok, data)

    async def _outcome(self, job, path, line, provider, call, slot, reserved=None):
        """Send one line's C{call} (L{_call}); fires with its L{_Answer} or L{_NoAnswer}, or None when the job
        was halted meanwhile (the usage of a send it cut short is kept: L{_account_unanswered}), or before (a line
        to be sent again, halted as it made its second call: nothing more is sent)."""
        if job.stop is not None:
            return None
        request_id = f"{job.batch_id}-{line}"
        upstream = Deferred.fromCoroutine(self._call(job, provider, call, request_id, slot))
        job.upstream.add(upstream)
        try:
            return await upstream
        except CancelledError as e:
            reached = getattr(e, "reached", None)
            if reached is not None:  # (in flight at a cancel, an expiry, a stop: vLLM read the prompt)
                self._account_unanswered(job, path, _NoAnswer("cancelled", "", reached, CLIENT_GONE_STATUS, True),
                                         request_id, call.body, reserved)
            return None
        except Exception:
            self.log.failure("batch {batch_id} line {line}: unexpected failure", batch_id=job.batch_id, line=line)
            return _NoAnswer("internal_error", "The gateway failed to process this request.")
        finally:
            job.upstream.discard(upstream)

    async def _explicitly(self, payload, previous, route, body_for, outcome):
        """C{(call, answer)} to send a C{/v1/responses} line (C{payload}, continuing the stored C{previous})
        again with its stored conversation as explicit input, when its C{outcome} is its instance's 404 for the
        response it continues (vLLM keeps them in memory: it restarted), as an online follow-up is (its body made by
        C{body_for}, the line's L{_bodies}); the answer then names the response it follows (L{relink}); else None."""
        previous_id = payload["previous_response_id"]
        if outcome.status != 404 or not names_previous(outcome.body, previous_id):
            return None
        body = await with_history(self._responses, payload, previous)
        call = upstream_call("/responses", body_for(body, route.upstream_model, route.provider),
                             model=route.upstream_model)
        return call, partial(_relinked, previous_id)

    async def _responses_again(self, payload, previous, route, body_for, explicitly, fallbacks, prefer, outcome):
        """C{(call, answer)} to send a C{/v1/responses} line (C{payload}, continuing the stored C{previous} or
        None) again after its native C{outcome} failed: with its conversation explicit (C{explicitly}, the
        L{_explicitly} of a line continuing a stored response, or None) where its instance forgot it, or
        translated to chat completions where its first target has no C{/responses} (L{no_native_route}), as an
        online create is, its answer made a response object naming the request's settings (its C{fallbacks} and
        C{prefer} as L{_as_chat}'s); or where a fallback its first target's failure sent it to has none, translated
        there, on to the fallbacks after it (C{(call, answer, provider)}: it goes to that provider); else None.

        @raise GatewayError: the line cannot be translated (L{request_to_chat}: a C{prompt}, an unknown item).
        """
        if explicitly is not None:
            retried = await explicitly(outcome)
            if retried is not None:
                return retried
        if not no_native_route(outcome.status, outcome.body):
            return None
        self._native_responses.remember(outcome.provider.name)  # (the next lines go translated at once)
        if outcome.provider.name == route.provider.name:
            return await self._as_chat(payload, previous, route, body_for, fallbacks, prefer)
        return await self._translated_at(payload, previous, body_for, fallbacks, outcome)

    async def _fallback_refused(self, route, payload, previous, body_for, fallbacks, outcome):
        """C{(call, answer, provider)} to send a C{/v1/responses} line sent translated (L{_as_chat}: C{route},
        then C{fallbacks}) again, translated, at the fallback whose native C{outcome} says it has no
        C{/responses} (as online; the next lines go translated there at once), on to the fallbacks after it; else
        None (its first target's or a translated fallback's answer).

        @raise GatewayError: the line cannot be translated.
        """
        if outcome.provider.name == route.provider.name or not no_native_route(outcome.status, outcome.body):
            return None  # (route's provider is translated, each target of it too)
        self._native_responses.remember(outcome.provider.name)
        return await self._translated_at(payload, previous, body_for, fallbacks, outcome)

    async def _translated_at(self, payload, previous, body_for, fallbacks, outcome):
        """C{(call, answer, provider)} to send a C{/v1/responses} line (C{payload}, continuing C{previous} or
        None) translated at the fallback (of C{fallbacks}) whose C{outcome} it is, then at those after it; or
        None where none of them gave it."""
        for at, fallback in enumerate(fallbacks):  # (its first target failed: translated where it went on to)
            if fallback.provider.name == outcome.provider.name and fallback.upstream_model == outcome.model:
                call, answer = await self._as_chat(payload, previous, fallback, body_for, fallbacks[at + 1:])
                return call, answer, fallback.provider
        return None

    async def _as_chat(self, payload, previous, route, body_for, fallbacks=(), prefer=None):
        """C{(call, answer)} to send a C{/v1/responses} line (C{payload}, continuing the stored C{previous} or
        None) translated to chat completions at C{route}, then at each of its C{fallbacks} (L{gomodel.routing.
        registry.Route}s) that the first's failure sends it to, as online, preferring C{route}'s replica C{prefer}
        (a follow-up's), each body made by C{body_for} (the line's L{_bodies}); its answer made a response object
        naming the request's settings.

        A fallback whose provider has a Responses API of its own (not known to lack one: L{NativeResponses}) gets
        the line natively, as online each target is asked natively first: its answer is its own response object.

        @raise GatewayError: the line cannot be translated (L{request_to_chat}: a C{prompt}, an unknown item).
        """
        echo = dict(payload, model=route.upstream_model, store=payload.get("store") is not False)
        body = echo if previous is None else await with_history(self._responses, echo, previous)

        def as_chat(model, provider):
            chat = request_to_chat(body, "max_completion_tokens" if provider.type in MAX_COMPLETION_TYPES
                                   else "max_tokens")
            if provider.type in SHORT_ID_TYPES:  # (a vLLM's call ids are too long for OpenAI)
                fit_call_ids(chat)
            return body_for(chat, model, provider)

        def rebody(model, provider):
            if previous is None and self._native_responses.native(provider.name):  # (a line that continues none:
                return "/responses", body_for(payload, model, provider)  # its own body, natively)
            return as_chat(model, provider)

        call = upstream_call("/chat/completions", as_chat(route.upstream_model, route.provider),
                             model=route.upstream_model, prefer=prefer, fallbacks=fallbacks,
                             rebody=rebody if fallbacks else None)
        now = int(self._clock.seconds())
        return call, partial(_chat_response, echo, now)

    def _translated(self, payload, route, fallbacks, principal, body_for, outcome):
        """C{(call, answer)} to send a message batch's line (C{payload}, planned for C{route} and C{fallbacks})
        again translated to chat, when its native C{outcome} says the provider has no Messages API (as an online
        request is); else None."""
        if not self._messages.no_native(outcome.provider, outcome.model, outcome.status, outcome.body):
            return None
        sent, first, fallbacks, rebody, answer = self._messages.plan(payload, route, fallbacks, principal, body_for)
        if sent == "/messages":  # (a fallback said so: the first target is still asked natively)
            return None
        call = upstream_call(sent, first, model=route.upstream_model, fallbacks=fallbacks,
                             rebody=rebody if fallbacks else None)
        return call, answer

    def _account(self, job, path, answer, request_id, reserved=None):
        """Keep the usage record of one answered line and charge it to its key's budgets (batch lines
        count as requests do), under the target that answered, settling what it C{reserved} (a L{_Reserved})."""
        pool, principal = answer.provider, job.principal
        model = f"{pool.name}/{answer.model}"
        usage = usage_of(answer.body) if answer.status < 400 else None
        if self._usage is not None:
            duration = None if answer.seconds is None else round(answer.seconds * 1e6) / 1000  # (ms, as the ledger's)
            self._usage.keep(request_id, self._clock.seconds(), pool.type, pool.name, answer.replica, model,
                             "/v1" + path, answer.status, False, usage, duration,
                             auth_key_id=None if principal is None else principal.id,
                             user_path=None if principal is None else principal.user_path)
        if self.tokens_counted is not None:
            self.tokens_counted(pool.type, pool.name, model, usage, principal, "/v1" + path)
        if self._gate is not None:
            self._gate.charge(principal, model, usage, None if reserved is None else reserved.take())

    def _account_unanswered(self, job, path, outcome, request_id, body, reserved=None):
        """Keep the usage record of one line sent upstream whose answer never came (C{outcome}, a L{_NoAnswer}
        that C{reached} a replica; a 499, C{client_gone}, for one the job's halt cut short) and charge it to its
        key's budgets: its prompt, estimated from the C{body} sent
        (L{prompt_estimate}), which the upstream read, as an online request's is (L{gomodel.proxy.exchange}),
        settling what it C{reserved} (a L{_Reserved})."""
        prompt = prompt_estimate(body)
        if not prompt:
            return
        pool, replica, upstream_model = outcome.reached
        principal, model, usage = job.principal, f"{pool.name}/{upstream_model}", {"prompt_tokens": prompt}
        if self._usage is not None:
            self._usage.keep(request_id, self._clock.seconds(), pool.type, pool.name, replica, model, "/v1" + path,
                             outcome.status, False, usage, client_gone=outcome.gone, estimated=True,
                             outcome=CLIENT_GONE if outcome.gone else None,
                             auth_key_id=None if principal is None else principal.id,
                             user_path=None if principal is None else principal.user_path)
        if self.tokens_counted is not None:
            self.tokens_counted(pool.type, pool.name, model, usage, principal, "/v1" + path)
        if self._gate is not None:
            self._gate.charge(principal, model, usage, None if reserved is None else reserved.take())

    def _keep_response(self, job, payload, answer):
        """Keep the response a C{/v1/responses} line (C{payload}) was C{answer}ed with, as an online create's is
        (L{gomodel.api.responses.ResponsesRoute.keep}), the batch's tenant its owner: it is retrieved, its input
        items listed and it is continued as one."""
        try:
            response = jsonutil.loads(answer.body)
        except jsonutil.JSONError:
            return
        if response.__class__ is not dict or response.get("id").__class__ is not str:
            return
        previous_id = payload.get("previous_response_id")
        record = {"id": response["id"], "provider": answer.provider.name, "replica": answer.replica,
                  "created_at": self._now(), "previous_response_id": previous_id, "status": response.get("status"),
                  "input_items": normalise_input(payload.get("input")), "response": response,
                  "tenant": job.tenant, "streamed": False}  # (a line is answered whole)
        renamed = model_renamed(answer.provider, response)  # (a model it lists by a path: kept as clients know it)
        if previous_id is not None and response.get("previous_response_id") is None:
            response["previous_response_id"] = previous_id  # (vLLM's own object, sent none, says null)
        elif not renamed:
            record["response_json"] = answer.body
        self._responses.keep(record)

    def _record(self, job, line, custom_id, ok, data):
        recorded = self._batches.record_results(job.batch_id, [(line, custom_id, ok, data)], job.token)
        if self.lines_recorded is not None:  # (the count newly recorded: a line recorded before counts once)
            recorded.addCallback(self._count_lines, ok)
        return recorded

    def _count_lines(self, count, ok):
        if count:
            self.lines_recorded(ok, count)
        return count

    async def _call(self, job, provider, call, request_id, slot):
        """Send C{call} to C{provider}, then to its fallbacks (L{gomodel.proxy.exchange.Exchange.fetch}),
        retrying transient failures from the first target, each send holding C{slot} at its provider (a
        backoff keeps the last one's); fires with an L{_Answer} (naming the target that answered) or a
        L{_NoAnswer}."""
        entering = slot.enter if call.fallbacks else None
        delay = self._backoff_start
        attempt = 0
        reached = None  # the last send that reached a replica, no answer coming (L{_NoAnswer})
        try:
            while True:
                attempt += 1
                last = attempt >= self._max_attempts
                await slot.enter(provider)  # (held already unless a fallback was tried)
                try:
                    fetched = await self._exchange.fetch(request_id.encode("ascii"), provider, call,
                                                         entering=entering)
                except (NoReadyReplica, ReplicasBusy):  # no replica can take it now: wait, it is no attempt
                    attempt -= 1
                    await self._sleep(delay, job)
                    delay = min(delay * 2, self._backoff_max)
                    continue
                except UpstreamUnreachable as e:  # not reached, or it broke off its answer
                    reached = getattr(e, "reached", None) or reached
                    if last:
                        return _NoAnswer(e.code, e.message, reached, e.status)
                    await self._sleep(delay, job)
                    delay = min(delay * 2, self._backoff_max)
                    continue
                except GatewayError as e:  # a timeout (the upstream may still be working on it), too large
                    return _NoAnswer(e.code or "upstream_error", e.message, getattr(e, "reached", None) or reached,
                                     e.status)
                response = fetched.response
                if response.code in TRANSIENT_STATUSES and not last and not out_of_quota(response.code, fetched.body):
                    await self._sleep(max(delay, min(_retry_after(response), self._backoff_max)), job)
                    delay = min(delay * 2, self._backoff_max)
                    continue
                upstream_id = response.headers.getRawHeaders(b"x-request-id", [request_id.encode("ascii")])[0]
                status, body = response.code, fetched.body
                if status < 300 and is_event_stream(response.headers):  # (a line never streams: one answer asked)
                    gather = gathered.BY_PATH.get(fetched.path)  # (the path sent there: a fallback's may be its own)
                    if gather is not None:
                        try:
                            body = gather(body)
                        except gathered.InBandError as e:
                            status, body = e.status, e.body
                        except StreamIncomplete as e:
                            return _NoAnswer("bad_upstream_response", f"The upstream provider "
                                             f"'{fetched.upstream.name}' streamed an answer that was asked for "
                                             f"whole, and {e}.")
                return _Answer(status, upstream_id.decode("latin-1"), body, fetched.upstream,
                               fetched.model, fetched.replica, fetched.seconds)
        except CancelledError as e:  # halted: the send it cut short reached, or else an earlier one
            if getattr(e, "reached", None) is None:
                e.reached = reached
            raise

    async def _sleep(self, seconds, job):
        """Wait C{seconds} before C{job}'s line is sent again.

        @raise CancelledError: the job was halted meanwhile or before (a drain too): nothing more is sent."""
        if job.stop is not None:
            raise CancelledError()
        d = deferLater(self._clock, seconds, lambda: None)
        job.sleeping.add(d)
        try:
            await d
        finally:
            job.sleeping.discard(d)

    def _result(self, custom_id, outcome):
        """(ok, the output or error line) for one request's outcome."""
        if isinstance(outcome, _NoAnswer):
            return False, error_line(custom_id, outcome.code, outcome.message)
        status, body, provider = outcome.status, outcome.body, outcome.provider
        if 200 <= status < 300:
            try:
                parsed = jsonutil.loads(body)
            except jsonutil.JSONError:
                error_body = jsonutil.dumps({"error": {
                    "message": f"The upstream provider '{provider.name}' answered with something that is not JSON.",
                    "type": "provider_error", "param": None, "code": "bad_upstream_response"}})
                # (the status an online request gets for it: no reader takes this line for an answer)
                return False, output_line(custom_id, BadUpstreamResponse.status, outcome.request_id, error_body)
            if b"\n" in body or b"\r" in body:  # one line per result in a JSONL file
                body = jsonutil.dumps(parsed)
            named = model_named(provider, outcome.model) if provider.renamed else None
            if named is not None:  # (a model it lists by a path: named as clients know it, as online)
                body = named(body)
            return True, output_line(custom_id, status, outcome.request_id, body)
        error = upstream_error(status if status >= 400 else 502, body, provider.name, provider.hidden)
        error_body = error.body()
        if b"\n" in error_body or b"\r" in error_body:
            error_body = jsonutil.dumps(jsonutil.loads(error_body))
        # (the error's status, as online: an upstream's 401 is the gateway's 502 upstream_auth_failed, not the key's)
        return False, output_line(custom_id, error.status if status >= 400 else status, outcome.request_id, error_body)

def _retry_after(response) -> float:
    value = response.headers.getRawHeaders(b"retry-after", [b""])[0]
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0


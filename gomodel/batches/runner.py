"""Running batches: validate the input file, send each line upstream, write the output files.

Every step is persisted before the next one, so that a gateway stopped (or
killed) in the middle of a batch resumes it at its next start without losing
or repeating an answer:

  - C{validating}: the input file is read in slices; valid lines are stored
    as the batch's requests (a failed validation stores the errors with their
    line numbers and ends in C{failed}).
  - C{in_progress}: lines without a result are sent upstream, at most
    C{BATCH_CONCURRENCY_PER_PROVIDER} at a time per provider; each answer is
    recorded (keyed by batch and line, exactly once) as soon as it is read.
    Transient failures (unreachable upstream, 429, 502, 503, 504, an answer
    that broke off) are retried with backoff up to C{BATCH_MAX_ATTEMPTS}.
  - C{finalizing} -> C{completed}: the output and error files are written
    from the recorded results.
  - Past C{expires_at}: the lines not answered get C{batch_expired} errors and
    the batch ends C{expired}, with its files.
  - C{cancelling} -> C{cancelled}: requests in flight are cancelled (vLLM
    aborts them); what was answered is kept in the files.

Any process may run any batch: the runner I{claims} it in the store (an
owner, a lease of C{lease} seconds renewed as a heartbeat, a fencing token
incremented per claim) and releases it when done. Every
C{poll_interval} seconds it claims unfinished batches whose lease is free or
expired (a process that died), resuming them where the recorded results
end, and passes on cancellations stored by other processes. Results are
written with the token: a runner that lost its lease records nothing, so no
line is ever recorded twice. A batch whose results cannot be written (a full
disk) is released with a backoff (exponential, capped) instead of being
driven again at once. At stop, requests in flight are cancelled, answers
already read are recorded, and the claims are released.
"""

import uuid

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, DeferredSemaphore
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from gomodel import jsonutil
from gomodel.batches.validation import LineError, Request, check_line
from gomodel.batches.outputs import discard_files, write_results
from gomodel.errors import Conflict, GatewayError, NotFound, StorageUnavailable, UpstreamUnreachable
from gomodel.httpclient import BodyTooLarge, deadline, read_body
from gomodel.store.records import LeaseLost, owner_is_gone, process_owner
from gomodel.upstream_errors import upstream_error

TRANSIENT_STATUSES = frozenset((429, 502, 503, 504))
BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
RESPONSE_LIMIT = 256 * 1024 * 1024
ERROR_LIMIT = 1024 * 1024
PAGE = 256  # requests read from the store at a time
LINES_PER_READ = 1000  # input lines validated at a time
MAX_LINE_BYTES = 64 * 1024 * 1024
MAX_ERRORS = 1000  # validation errors reported (the batch fails either way)
READY_WAIT = 30.0  # at start, how long resumed batches wait for model discovery
POLL_INTERVAL = 1.0  # how often a runner looks for batches to claim and for cancellations
LEASE = 30.0  # how long a claim on a batch lasts without a heartbeat
CLAIMS_PER_POLL = 16


def result_id() -> str:
    return "batch_req_" + uuid.uuid4().hex


def output_line(custom_id, status, request_id, body: bytes) -> bytes:
    """One output-file line, with the upstream's JSON C{body} spliced in as it came."""
    return b"".join((
        b'{"id":', jsonutil.dumps(result_id()), b',"custom_id":', jsonutil.dumps(custom_id),
        b',"response":{"status_code":', str(status).encode(), b',"request_id":', jsonutil.dumps(request_id),
        b',"body":', body, b'},"error":null}'))


def error_line(custom_id, code, message) -> bytes:
    """One error-file line for a request that got no upstream answer."""
    return jsonutil.dumps({"id": result_id(), "custom_id": custom_id, "response": None,
                           "error": {"code": code, "message": message}})


class _Answer:
    """What the upstream said to one request."""

    def __init__(self, status, request_id, body, provider):
        self.status = status
        self.request_id = request_id
        self.body = body
        self.provider = provider


class _NoAnswer:
    """A request that got no usable answer."""

    def __init__(self, code, message):
        self.code = code
        self.message = message


class _Job:
    """One batch being worked on, in memory."""

    def __init__(self, batch_id, token):
        self.batch_id = batch_id
        self.token = token  # the fencing token of our claim
        self.stop = None  # None, "cancel", "expire", "shutdown", "lost" (the claim) or "park" (cannot record)
        self.upstream = set()  # Deferreds of requests in flight (cancelled to halt)
        self.lines = set()  # Deferreds of lines not yet recorded
        self.waiting = None  # a semaphore acquisition in progress
        self.expiry = None  # the IDelayedCall that expires the batch
        self.task = None
        self.watchers = []  # Deferreds fired when the job ends

    def halt(self, why):
        """Stop sending: C{cancel}, C{expire}, C{park}, C{shutdown} or C{lost} (the last two win)."""
        if self.stop is None or why in ("shutdown", "lost"):
            self.stop = why
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.cancel()
        for d in list(self.upstream):
            d.cancel()


class BatchRunner(Service):
    """Executes batches against the providers, durably, under claims (see the module docstring)."""

    log = Logger()

    def __init__(self, batches, blobs, registry, clock, timeouts, *, concurrency=4, max_attempts=4,
                 backoff_start=BACKOFF_START, backoff_max=BACKOFF_MAX, lease=LEASE, poll_interval=POLL_INTERVAL,
                 owner=None):
        """
        @param batches: the L{gomodel.store.interfaces.IBatchStore}.
        @param blobs: the L{gomodel.store.interfaces.IBlobStore} holding input and output contents.
        @param lease: seconds a claim lasts; renewed every third of it while working.
        @param poll_interval: seconds between looks for batches to claim (0: never).
        @param owner: this process's owner id for claims (default: a new unique one).
        """
        self._batches = batches
        self._blobs = blobs
        self._registry = registry
        self._clock = clock
        self._timeouts = timeouts
        self._concurrency = concurrency
        self._max_attempts = max_attempts
        self._backoff_start = backoff_start
        self._backoff_max = backoff_max
        self._lease = lease
        self._poll_interval = poll_interval
        self.owner = owner if owner is not None else process_owner()
        self._semaphores = {}
        self._jobs = {}
        self._parked = {}  # batch id -> how many times in a row it could not be recorded
        self._resuming = None
        self._poll = None
        self._beat = None
        self._scanning = None

    # -- service ----------------------------------------------------------------

    def startService(self):
        super().startService()
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = self._clock
        self._beat.start(self._lease / 3, now=False)
        self._resuming = Deferred.fromCoroutine(self._resume())
        self._resuming.addErrback(self._resume_failed)
        self._resuming.addCallback(self._start_polling)

    def stopService(self):
        super().stopService()
        if self._resuming is not None:
            self._resuming.cancel()
        for loop in (self._poll, self._beat):
            if loop is not None and loop.running:
                loop.stop()
        if self._scanning is not None:
            self._scanning.cancel()
        jobs = list(self._jobs.values())
        for job in jobs:
            job.halt("shutdown")
        return DeferredList([job.task for job in jobs])

    async def _resume(self):
        if not await self._batches.unfinished():
            return
        await self._models_known()
        await self._claim_work()

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

    async def _claim_work(self):
        """Claim and start unfinished batches nobody holds (or whose holder died)."""
        gone = tuple(o for o in await self._batches.holders() if owner_is_gone(o))
        for _ in range(CLAIMS_PER_POLL):
            if not self.running:
                return
            got = await self._batches.claim_next(self.owner, self._lease, exclude=tuple(self._jobs), gone=gone)
            if got is None:
                return
            record, token = got
            self.log.info("claimed batch {batch_id} ({status})", batch_id=record["id"], status=record["status"])
            self._start(record, token)

    def _start_polling(self, _):
        if not self.running or self._poll_interval <= 0:
            return
        self._poll = LoopingCall(self._scan)
        self._poll.clock = self._clock
        self._poll.start(self._poll_interval, now=False)

    def _scan(self):
        """Claim batches that are free; pass on cancellations other processes stored for ours."""
        if self._scanning is not None:
            return
        self._scanning = Deferred.fromCoroutine(self._look())

        def failed(failure):
            if not failure.check(CancelledError, StorageUnavailable):
                self.log.failure("looking for batches to run failed", failure)

        def done(_):
            self._scanning = None

        self._scanning.addErrback(failed)
        self._scanning.addBoth(done)

    async def _look(self):
        if self._jobs:
            for batch in await self._batches.unfinished():
                job = self._jobs.get(batch["id"])
                if job is not None and batch["status"] == "cancelling" and job.stop is None:
                    job.halt("cancel")
        await self._claim_work()

    def _heartbeat(self):
        """Renew the lease of every batch we work on; a lost one stops at once."""
        for job in list(self._jobs.values()):
            if job.stop in ("lost", "shutdown"):
                continue
            d = self._batches.renew(job.batch_id, self.owner, job.token, self._lease)

            def renewed(held, job=job):
                if not held and job.stop != "lost":
                    self.log.warn("batch {batch_id}: our claim was taken over; stopping", batch_id=job.batch_id)
                    job.halt("lost")

            d.addCallbacks(renewed, lambda f: self.log.warn("renewing a batch claim failed: {error}",
                                                            error=f.getErrorMessage()))

    def _resume_failed(self, failure):
        if failure.check(CancelledError):
            return None
        if failure.check(StorageUnavailable):
            self.log.warn("batches cannot be resumed: {error}", error=failure.value.message)
            return None
        self.log.failure("resuming batches failed", failure)
        return None

    # -- what the API asks ------------------------------------------------------

    def semaphore(self, provider_name) -> DeferredSemaphore:
        """The per-provider limit on requests in flight, shared by every batch."""
        sem = self._semaphores.get(provider_name)
        if sem is None:
            sem = self._semaphores[provider_name] = DeferredSemaphore(self._concurrency)
        return sem

    async def create(self, endpoint, input_file_id, window_text, window_seconds, metadata):
        """Store a new batch (C{validating}), claim it and start it; returns its record."""
        now = int(self._clock.seconds())
        record = await self._batches.add({
            "id": "batch_" + uuid.uuid4().hex, "endpoint": endpoint, "input_file_id": input_file_id,
            "completion_window": window_text, "status": "validating", "created_at": now,
            "expires_at": now + max(1, round(window_seconds)), "metadata": metadata,
        })
        await self._claim(record["id"])
        return record

    async def _claim(self, batch_id):
        """Claim C{batch_id} and start it, unless it is ours already or held elsewhere."""
        if not self.running or batch_id in self._jobs:
            return
        got = await self._batches.claim(batch_id, self.owner, self._lease)
        if got is not None:
            self._start(*got)

    async def cancel(self, batch_id):
        """Ask a batch to stop; returns its record (C{cancelling}, or already cancelled).

        The process holding its claim sees the cancellation at its next poll.
        """
        batch = await self._batches.get(batch_id)
        if batch is None:
            raise NotFound(f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
        status = batch["status"]
        if status in ("validating", "in_progress"):
            updated = await self._batches.update(
                batch_id, {"status": "cancelling", "cancelling_at": int(self._clock.seconds())},
                only_if_status=("validating", "in_progress"))
            if updated is None:  # it moved on meanwhile: answer from where it is now
                return await self.cancel(batch_id)
            job = self._jobs.get(batch_id)
            if job is not None:
                job.halt("cancel")
            else:
                await self._claim(batch_id)
            return updated
        if status in ("cancelling", "cancelled"):
            return batch
        raise Conflict(f"Cannot cancel a batch with status '{status}'.", code="batch_not_cancellable")

    # -- one batch ----------------------------------------------------------------

    def _start(self, record, token):
        batch_id, expires_at = record["id"], record["expires_at"]
        if batch_id in self._jobs:
            self._jobs[batch_id].token = token
            return
        job = self._jobs[batch_id] = _Job(batch_id, token)
        if not self.running:
            job.stop = "shutdown"
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
        if job.stop == "lost":
            return
        if job.stop == "park":
            count = self._parked.get(job.batch_id, 0)
            self._parked[job.batch_id] = count + 1
            delay = min(self._backoff_start * 2 ** count, self._backoff_max)
            self.log.warn("batch {batch_id}: results cannot be recorded; it is tried again in {delay} s",
                          batch_id=job.batch_id, delay=delay)
        else:
            delay = 0
            if job.stop != "shutdown":
                self._parked.pop(job.batch_id, None)
        try:
            await self._batches.release(job.batch_id, self.owner, job.token, delay)
        except Exception as e:  # the lease runs out by itself
            self.log.warn("batch {batch_id}: releasing its claim failed ({error})", batch_id=job.batch_id,
                          error=getattr(e, "message", None) or repr(e))

    def _job_failed(self, failure, job):
        if failure.check(LeaseLost):
            job.halt("lost")
            return
        if job.stop == "shutdown" and failure.check(StorageUnavailable, CancelledError):
            return  # stopping: the batch resumes where it is
        if failure.check(CancelledError):
            return
        job.halt("park")
        if failure.check(StorageUnavailable):
            self.log.warn("batch {batch_id} paused: {error}", batch_id=job.batch_id, error=failure.value.message)
        else:
            self.log.failure("batch {batch_id} stopped unexpectedly; it is tried again later", failure,
                             batch_id=job.batch_id)

    def _job_done(self, _, job):
        if job.expiry is not None and job.expiry.active():
            job.expiry.cancel()
        if self._jobs.get(job.batch_id) is job:
            del self._jobs[job.batch_id]
        watchers, job.watchers = job.watchers, []
        for d in watchers:
            d.callback(None)

    async def settled(self, batch_id):
        """Wait until nothing works on C{batch_id} here (after batches were resumed at start)."""
        if self._resuming is not None and not self._resuming.called:
            resumed = Deferred()
            self._resuming.addBoth(lambda result: (resumed.callback(None), result)[1])
            await resumed
        job = self._jobs.get(batch_id)
        if job is not None:
            d = Deferred()
            job.watchers.append(d)
            await d

    async def _run(self, job):
        batch = await self._batches.get(job.batch_id)
        if batch is None:
            return
        if batch["status"] == "validating":
            if not await self._validate(job, batch):
                return
            batch = await self._batches.get(job.batch_id)
        if batch["status"] == "in_progress" and job.stop is None:
            await self._dispatch(job, batch)
        await self._conclude(job)

    def _now(self):
        return int(self._clock.seconds())

    # -- validating -----------------------------------------------------------------

    async def _validate(self, job, batch):
        """Check every input line and store the requests; False when the batch failed."""
        batch_id, endpoint = job.batch_id, batch["endpoint"]
        await self._batches.clear_requests(batch_id, job.token)  # a validation cut short starts over
        seen, resolved, errors = set(), {}, []
        count = number = offset = 0
        while True:
            if job.stop is not None:
                return True
            got = await self._blobs.read_lines(batch["input_file_id"], offset, LINES_PER_READ, MAX_LINE_BYTES)
            if got is None:
                errors.append(LineError("file_not_found", f"The input file {batch['input_file_id']} does not exist.",
                                        "input_file_id", None))
                break
            lines, offset = got
            rows = []
            for raw in lines:
                number += 1
                if raw is not None and not raw.strip():
                    continue
                checked = check_line(raw, number, endpoint)
                if isinstance(checked, Request):
                    if checked.custom_id in seen:
                        checked = LineError("duplicate_custom_id",
                                            f"The custom_id '{checked.custom_id}' is used by an earlier line.",
                                            "custom_id", number)
                    else:
                        seen.add(checked.custom_id)
                        problem = self._model_problem(checked.model, resolved)
                        if problem is not None:
                            checked = LineError(problem.code or "invalid_model", problem.message, "body.model", number)
                if isinstance(checked, LineError):
                    errors.append(checked)
                    if len(errors) >= MAX_ERRORS:
                        break
                    continue
                count += 1
                if not errors:
                    rows.append((number, checked.custom_id, checked.body))
            if rows and not errors:
                await self._batches.add_requests(batch_id, rows, job.token)
            if offset is None or len(errors) >= MAX_ERRORS:
                break
        if not errors and count == 0:
            errors.append(LineError("empty_file", "The input file has no requests.", None, None))
        if errors:
            await self._batches.clear_requests(batch_id, job.token)
            failed = await self._batches.update(
                batch_id, {"status": "failed", "failed_at": self._now(), "errors": [e.as_dict() for e in errors]},
                only_if_status=("validating",), token=job.token)
            return failed is None  # None: cancelled meanwhile, which _conclude finishes
        await self._batches.update(batch_id, {"status": "in_progress", "in_progress_at": self._now(),
                                              "total": count}, only_if_status=("validating",), token=job.token)
        return True

    def _model_problem(self, model, resolved):
        if model not in resolved:
            try:
                self._registry.resolve(model)
                resolved[model] = None
            except GatewayError as e:
                resolved[model] = e
        return resolved[model]

    # -- in progress ------------------------------------------------------------------

    async def _dispatch(self, job, batch):
        path = batch["endpoint"][len("/v1"):]
        after = 0
        while job.stop is None:
            rows = await self._batches.pending(job.batch_id, after, PAGE)
            if not rows:
                break
            for line, custom_id, body in rows:
                if job.stop is not None:
                    break
                after = line
                await self._launch(job, path, line, custom_id, body)
        while job.lines:
            await DeferredList(list(job.lines))

    async def _launch(self, job, path, line, custom_id, body):
        """Send one line once its provider has room (the line then runs on its own)."""
        try:
            payload = jsonutil.loads(body)
            route = self._registry.resolve(payload["model"])
        except GatewayError as e:
            self._track(job, self._record(job, line, custom_id, False,
                                          error_line(custom_id, e.code or "invalid_request", e.message)))
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
        payload["model"] = route.upstream_model
        d = Deferred.fromCoroutine(self._line(job, path, line, custom_id, jsonutil.dumps(payload), route))

        def release(result):
            sem.release()
            return result

        self._track(job, d.addBoth(release))

    def _track(self, job, d):
        job.lines.add(d)

        def done(result):
            job.lines.discard(d)
            return result

        def failed(failure):
            # The line stays pending; sending more is pointless until results can be written again.
            if failure.check(LeaseLost):
                job.halt("lost")
            elif failure.check(StorageUnavailable):
                self.log.warn("batch {batch_id}: recording a line failed: {error}", batch_id=job.batch_id,
                              error=failure.value.message)
                job.halt("park")
            else:
                self.log.failure("batch {batch_id}: recording a line failed", failure, batch_id=job.batch_id)
                job.halt("park")

        d.addErrback(failed)
        d.addBoth(done)

    async def _line(self, job, path, line, custom_id, payload, route):
        upstream = Deferred.fromCoroutine(self._call(route, path, payload, f"{job.batch_id}-{line}"))
        job.upstream.add(upstream)
        try:
            outcome = await upstream
        except CancelledError:
            return  # halted: the line stays pending
        except Exception:
            self.log.failure("batch {batch_id} line {line}: unexpected failure", batch_id=job.batch_id, line=line)
            outcome = _NoAnswer("internal_error", "The gateway failed to process this request.")
        finally:
            job.upstream.discard(upstream)
        ok, data = self._result(custom_id, outcome)
        await self._record(job, line, custom_id, ok, data)

    def _record(self, job, line, custom_id, ok, data):
        return self._batches.record_results(job.batch_id, [(line, custom_id, ok, data)], job.token)

    async def _call(self, route, path, payload, request_id):
        """Send one request, retrying transient failures; an L{_Answer} or a L{_NoAnswer}."""
        provider = route.provider
        delay = self._backoff_start
        attempt = 0
        while True:
            attempt += 1
            last = attempt >= self._max_attempts
            try:
                response = await provider.send("POST", path, payload, request_id.encode("ascii"))
            except UpstreamUnreachable as e:
                if last:
                    return _NoAnswer(e.code, e.message)
                await self._sleep(delay)
                delay = min(delay * 2, self._backoff_max)
                continue
            except GatewayError as e:  # UpstreamTimeout: the upstream may still be working on it
                return _NoAnswer(e.code or "upstream_error", e.message)
            if response.code in TRANSIENT_STATUSES and not last:
                wait = max(delay, min(_retry_after(response), self._backoff_max))
                _drain(response)
                await self._sleep(wait)
                delay = min(delay * 2, self._backoff_max)
                continue
            limit = RESPONSE_LIMIT if response.code < 400 else ERROR_LIMIT
            try:
                body = await deadline(read_body(response, limit), self._timeouts.response_header, self._clock)
            except CancelledError:
                raise
            except BodyTooLarge:
                return _NoAnswer("response_too_large", f"The answer of '{provider.name}' is too large.")
            except DeferredTimeout:
                return _NoAnswer("upstream_timeout", f"The upstream provider '{provider.name}' stopped sending.")
            except Exception:
                if last:
                    return _NoAnswer("upstream_unreachable",
                                     f"The upstream provider '{provider.name}' broke off its answer.")
                await self._sleep(delay)
                delay = min(delay * 2, self._backoff_max)
                continue
            upstream_id = response.headers.getRawHeaders(b"x-request-id", [request_id.encode("ascii")])[0]
            return _Answer(response.code, upstream_id.decode("latin-1"), body, provider)

    def _sleep(self, seconds):
        return deferLater(self._clock, seconds, lambda: None)

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
                return False, output_line(custom_id, status, outcome.request_id, error_body)
            if b"\n" in body or b"\r" in body:  # one line per result in a JSONL file
                body = jsonutil.dumps(parsed)
            return True, output_line(custom_id, status, outcome.request_id, body)
        error = upstream_error(status if status >= 400 else 502, body, provider.name, provider.hidden)
        error_body = error.body()
        if b"\n" in error_body or b"\r" in error_body:
            error_body = jsonutil.dumps(jsonutil.loads(error_body))
        return False, output_line(custom_id, status, outcome.request_id, error_body)

    # -- the end of a batch ---------------------------------------------------------------

    async def _conclude(self, job):
        """Take the batch to its final status, from what the store says now."""
        if job.stop in ("shutdown", "lost", "park"):
            return
        batch_id = job.batch_id
        status = (await self._batches.get(batch_id))["status"]
        if status == "cancelling":
            await self._finalize(job, {"status": "cancelled", "cancelled_at": self._now()}, ("cancelling",))
            return
        if status == "validating":
            if job.stop == "expire":
                await self._batches.clear_requests(batch_id, job.token)
                await self._batches.update(batch_id, {"status": "expired", "expired_at": self._now()},
                                           only_if_status=("validating",), token=job.token)
            return
        if status == "in_progress":
            if await self._batches.pending(batch_id, 0, 1):
                if job.stop == "expire":
                    await self._expire_rest(job)
                    done = await self._finalize(job, {"status": "expired", "expired_at": self._now()},
                                                ("in_progress",))
                    if done is None:  # cancelled meanwhile
                        await self._conclude(job)
                elif job.stop is None:
                    job.halt("park")  # lines left unanswered: released with a backoff, never re-driven at once
                return
            moved = await self._batches.update(batch_id, {"status": "finalizing", "finalizing_at": self._now()},
                                               only_if_status=("in_progress",), token=job.token)
            if moved is None:  # cancelled meanwhile
                await self._conclude(job)
                return
            status = "finalizing"
        if status == "finalizing":
            await self._finalize(job, {"status": "completed", "completed_at": self._now()}, ("finalizing",))

    async def _finalize(self, job, changes, only_if_status):
        """Write the output and error files from the results, then apply C{changes}; the record, or None."""
        if (await self._batches.get(job.batch_id))["status"] not in only_if_status:
            return None
        files = {}
        try:
            for ok, kind in ((True, "output"), (False, "error")):
                files[kind] = await write_results(self._batches, self._blobs, job.batch_id, ok)
            done = await self._batches.finalize(job.batch_id, changes, files, only_if_status, job.token)
        except BaseException:
            await discard_files(self._blobs, files)
            raise
        if done is None:
            await discard_files(self._blobs, files)
        return done

    async def _expire_rest(self, job):
        message = "This request could not be executed before the batch's completion window expired."
        after = 0
        while True:
            rows = await self._batches.pending(job.batch_id, after, PAGE)
            if not rows:
                return
            await self._batches.record_results(job.batch_id, [
                (line, custom_id, False, error_line(custom_id, "batch_expired", message))
                for line, custom_id, _ in rows], job.token)
            after = rows[-1][0]


def _retry_after(response) -> float:
    value = response.headers.getRawHeaders(b"retry-after", [b""])[0]
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0


def _drain(response):
    d = read_body(response, ERROR_LIMIT)
    d.addErrback(lambda _: None)

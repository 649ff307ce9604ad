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

At start every batch in C{validating}, C{in_progress}, C{finalizing} or
C{cancelling} is resumed. At stop, requests in flight are cancelled and timers
removed; answers already read are recorded first.

With several gateway processes on one data directory (C{--workers}), only
one runner executes (C{execute=True}, the primary); the others only store
new batches and cancellations, which the executing runner picks up from the
store every C{poll_interval} seconds (its own are started at once).
"""

import uuid

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, DeferredSemaphore
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from gomodel import jsonutil
from gomodel.batches.validation import LineError, Request, check_line
from gomodel.errors import (Conflict, GatewayError, NoReadyReplica, NotFound, ReplicasBusy, StorageUnavailable,
                            UpstreamUnreachable)
from gomodel.proxy.exchange import UpstreamCall
from gomodel.upstream.errors import upstream_error

TRANSIENT_STATUSES = frozenset((429, 502, 503, 504))
BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
PAGE = 256  # requests read from the store at a time
LINES_PER_READ = 1000  # input lines validated at a time
MAX_LINE_BYTES = 64 * 1024 * 1024
MAX_ERRORS = 1000  # validation errors reported (the batch fails either way)
READY_WAIT = 30.0  # at start, how long resumed batches wait for model discovery
POLL_INTERVAL = 1.0  # how often the executing runner looks for work other processes stored


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

    def __init__(self, batch_id):
        self.batch_id = batch_id
        self.stop = None  # None, "cancel", "expire" or "shutdown"
        self.upstream = set()  # Deferreds of requests in flight (cancelled to halt)
        self.lines = set()  # Deferreds of lines not yet recorded
        self.waiting = None  # a semaphore acquisition in progress
        self.expiry = None  # the IDelayedCall that expires the batch
        self.task = None
        self.watchers = []  # Deferreds fired when the job ends

    def halt(self, why):
        """Stop sending: C{cancel}, C{expire} or C{shutdown} (which wins: the stored status says the rest)."""
        if self.stop is None or why == "shutdown":
            self.stop = why
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.cancel()
        for d in list(self.upstream):
            d.cancel()


class BatchRunner(Service):
    """Executes batches against the providers, durably (see the module docstring)."""

    log = Logger()

    def __init__(self, store, registry, clock, exchange, *, concurrency=4, max_attempts=4,
                 backoff_start=BACKOFF_START, backoff_max=BACKOFF_MAX, execute=True,
                 poll_interval=POLL_INTERVAL):
        self._store = store
        self._registry = registry
        self._clock = clock
        self._exchange = exchange  # a gomodel.proxy.exchange.Exchange
        self._concurrency = concurrency
        self._max_attempts = max_attempts
        self._backoff_start = backoff_start
        self._backoff_max = backoff_max
        self._semaphores = {}
        self._jobs = {}
        self._resuming = None
        self._execute = execute
        self._poll_interval = poll_interval
        self._poll = None
        self._scanning = None

    # -- service ----------------------------------------------------------------

    def startService(self):
        super().startService()
        if not self._execute:
            return
        self._resuming = Deferred.fromCoroutine(self._resume())
        self._resuming.addErrback(self._resume_failed)
        self._resuming.addCallback(self._start_polling)

    def stopService(self):
        super().stopService()
        if self._resuming is not None:
            self._resuming.cancel()
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self._scanning is not None:
            self._scanning.cancel()
        jobs = list(self._jobs.values())
        for job in jobs:
            job.halt("shutdown")
        return DeferredList([job.task for job in jobs])

    async def _resume(self):
        await self._store.started()
        batches = await self._store.unfinished_batches()
        if not batches:
            return
        await self._models_known()
        for batch in batches:
            self.log.info("resuming batch {batch_id} ({status})", batch_id=batch["id"], status=batch["status"])
            self._start(batch["id"], batch["expires_at"])

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

    def _start_polling(self, _):
        if not self.running or self._poll_interval <= 0:
            return
        self._poll = LoopingCall(self._scan)
        self._poll.clock = self._clock
        self._poll.start(self._poll_interval, now=False)

    def _scan(self):
        """Start batches stored by other processes; pass on cancellations they stored."""
        if self._scanning is not None:
            return
        self._scanning = self._store.unfinished_batches()

        def found(batches):
            for batch in batches:
                job = self._jobs.get(batch["id"])
                if job is None:
                    self._start(batch["id"], batch["expires_at"])
                elif batch["status"] == "cancelling" and job.stop is None:
                    job.halt("cancel")

        def failed(failure):
            if not failure.check(CancelledError, StorageUnavailable):
                self.log.failure("looking for batches to run failed", failure)

        def done(_):
            self._scanning = None

        self._scanning.addCallbacks(found, failed)
        self._scanning.addBoth(done)

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
        """Store a new batch (C{validating}) and start it; returns its record."""
        now = int(self._clock.seconds())
        record = await self._store.add_batch({
            "id": "batch_" + uuid.uuid4().hex, "endpoint": endpoint, "input_file_id": input_file_id,
            "completion_window": window_text, "status": "validating", "created_at": now,
            "expires_at": now + max(1, round(window_seconds)), "metadata": metadata,
        })
        self._start(record["id"], record["expires_at"])
        return record

    async def cancel(self, batch_id):
        """Ask a batch to stop; returns its record (C{cancelling}, or already cancelled)."""
        batch = await self._store.get_batch(batch_id)
        if batch is None:
            raise NotFound(f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found")
        status = batch["status"]
        if status in ("validating", "in_progress"):
            updated = await self._store.update_batch(
                batch_id, {"status": "cancelling", "cancelling_at": int(self._clock.seconds())},
                only_if_status=("validating", "in_progress"))
            if updated is None:  # it moved on meanwhile: answer from where it is now
                return await self.cancel(batch_id)
            job = self._jobs.get(batch_id)
            if job is not None:
                job.halt("cancel")
            else:
                self._start(batch_id, updated["expires_at"])
            return updated
        if status in ("cancelling", "cancelled"):
            return batch
        raise Conflict(f"Cannot cancel a batch with status '{status}'.", code="batch_not_cancellable")

    # -- one batch ----------------------------------------------------------------

    def _start(self, batch_id, expires_at):
        if not self.running or not self._execute or batch_id in self._jobs:
            return
        job = self._jobs[batch_id] = _Job(batch_id)
        delay = (expires_at or 0) - self._clock.seconds() if expires_at is not None else None
        if delay is not None:
            if delay <= 0:
                job.stop = "expire"
            else:
                job.expiry = self._clock.callLater(delay, job.halt, "expire")
        job.task = Deferred.fromCoroutine(self._run(job))
        job.task.addErrback(self._job_failed, job)
        job.task.addBoth(self._job_done, job)

    def _job_failed(self, failure, job):
        if job.stop == "shutdown" and failure.check(StorageUnavailable, CancelledError):
            return  # stopping: the batch resumes at the next start
        if failure.check(StorageUnavailable):
            self.log.warn("batch {batch_id} paused: {error}", batch_id=job.batch_id, error=failure.value.message)
        elif not failure.check(CancelledError):
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
        """Wait until nothing works on C{batch_id} (after batches were resumed at start)."""
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
        batch = await self._store.get_batch(job.batch_id)
        if batch is None:
            return
        if batch["status"] == "validating":
            if not await self._validate(job, batch):
                return
            batch = await self._store.get_batch(job.batch_id)
        if batch["status"] == "in_progress" and job.stop is None:
            await self._dispatch(job, batch)
        await self._conclude(job)

    def _now(self):
        return int(self._clock.seconds())

    # -- validating -----------------------------------------------------------------

    async def _validate(self, job, batch):
        """Check every input line and store the requests; False when the batch failed."""
        batch_id, endpoint = job.batch_id, batch["endpoint"]
        await self._store.clear_batch_requests(batch_id)  # a validation cut short starts over
        seen, resolved, errors = set(), {}, []
        count = number = offset = 0
        while True:
            if job.stop is not None:
                return True
            got = await self._store.read_lines(batch["input_file_id"], offset, LINES_PER_READ, MAX_LINE_BYTES)
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
                await self._store.add_batch_requests(batch_id, rows)
            if offset is None or len(errors) >= MAX_ERRORS:
                break
        if not errors and count == 0:
            errors.append(LineError("empty_file", "The input file has no requests.", None, None))
        if errors:
            await self._store.clear_batch_requests(batch_id)
            failed = await self._store.update_batch(
                batch_id, {"status": "failed", "failed_at": self._now(), "errors": [e.as_dict() for e in errors]},
                only_if_status=("validating",))
            return failed is None  # None: cancelled meanwhile, which _conclude finishes
        await self._store.update_batch(batch_id, {"status": "in_progress", "in_progress_at": self._now(),
                                                  "total": count}, only_if_status=("validating",))
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
            rows = await self._store.pending_requests(job.batch_id, after, PAGE)
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
            self.log.failure("batch {batch_id}: recording a line failed", failure, batch_id=job.batch_id)

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
        return self._store.record_results(job.batch_id, [(line, custom_id, ok, data)])

    async def _call(self, route, path, payload, request_id):
        """Send one request through the exchange, retrying transient failures; an L{_Answer} or a L{_NoAnswer}."""
        provider = route.provider
        call = UpstreamCall(path, payload, model=route.upstream_model)
        delay = self._backoff_start
        attempt = 0
        while True:
            attempt += 1
            last = attempt >= self._max_attempts
            try:
                response, body = await self._exchange.fetch(request_id.encode("ascii"), provider, call)
            except (NoReadyReplica, ReplicasBusy):  # no replica can take it now: wait, it is no attempt
                attempt -= 1
                await self._sleep(delay)
                delay = min(delay * 2, self._backoff_max)
                continue
            except UpstreamUnreachable as e:  # not reached, or it broke off its answer
                if last:
                    return _NoAnswer(e.code, e.message)
                await self._sleep(delay)
                delay = min(delay * 2, self._backoff_max)
                continue
            except GatewayError as e:  # a timeout (the upstream may still be working on it), too large
                return _NoAnswer(e.code or "upstream_error", e.message)
            if response.code in TRANSIENT_STATUSES and not last:
                await self._sleep(max(delay, min(_retry_after(response), self._backoff_max)))
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
        if job.stop == "shutdown":
            return
        batch_id = job.batch_id
        status = (await self._store.get_batch(batch_id))["status"]
        if status == "cancelling":
            await self._store.finalize_batch(batch_id, {"status": "cancelled", "cancelled_at": self._now()},
                                             only_if_status=("cancelling",))
            return
        if status == "validating":
            if job.stop == "expire":
                await self._store.clear_batch_requests(batch_id)
                await self._store.update_batch(batch_id, {"status": "expired", "expired_at": self._now()},
                                               only_if_status=("validating",))
            return
        if status == "in_progress":
            if await self._store.pending_requests(batch_id, 0, 1):
                if job.stop == "expire":
                    await self._expire_rest(job)
                    done = await self._store.finalize_batch(
                        batch_id, {"status": "expired", "expired_at": self._now()}, only_if_status=("in_progress",))
                    if done is None:  # cancelled meanwhile
                        await self._conclude(job)
                elif job.stop is None:
                    self.log.warn("batch {batch_id} has unanswered lines; it resumes at the next start",
                                  batch_id=batch_id)
                return
            moved = await self._store.update_batch(batch_id, {"status": "finalizing", "finalizing_at": self._now()},
                                                   only_if_status=("in_progress",))
            if moved is None:  # cancelled meanwhile
                await self._conclude(job)
                return
            status = "finalizing"
        if status == "finalizing":
            await self._store.finalize_batch(batch_id, {"status": "completed", "completed_at": self._now()},
                                             only_if_status=("finalizing",))

    async def _expire_rest(self, job):
        message = "This request could not be executed before the batch's completion window expired."
        after = 0
        while True:
            rows = await self._store.pending_requests(job.batch_id, after, PAGE)
            if not rows:
                return
            await self._store.record_results(job.batch_id, [
                (line, custom_id, False, error_line(custom_id, "batch_expired", message))
                for line, custom_id, _ in rows])
            after = rows[-1][0]


def _retry_after(response) -> float:
    value = response.headers.getRawHeaders(b"retry-after", [b""])[0]
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0


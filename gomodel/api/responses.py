"""The Responses API: create (native, or translated over chat completions) and its lifecycle.

Every response created with C{store} not false is kept by the gateway with
its input, the provider instance and replica that made it and its output, so
it can be read, listed, deleted and cancelled later, and so that a follow-up
with C{previous_response_id} goes back to that replica (vLLM keeps responses
in its process's memory), or, when it no longer knows the response (vLLM
restarted; its store is off), carries the stored conversation as explicit
input instead.
"""

import re
from functools import partial

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gomodel import errors, jsonutil
from gomodel.accounting.tokens import asked_tokens
from gomodel.anthropic.translate import count_tokens_answer
from gomodel.api.background import UNFINISHED, BackgroundWatch
from gomodel.api.inference import held, plan_model, target, unsaturated, vet_priority
from gomodel.api.messages import MAX_COMPLETION_TYPES
from gomodel.auth.tenancy import SALTED_PROVIDER_TYPES, tenant_of, visible
from gomodel.batches.validation import checked_metadata
from gomodel.http.bodies import boolean, json_answer, page, query_arg, query_limit, streams
from gomodel.http.headers import CONTENT_TYPE, EVENT_STREAM
from gomodel.http.render import RESPONSES
from gomodel.ids import new_id
from gomodel.proxy.exchange import fails_over, upstream_call
from gomodel.proxy.renamed import model_named, model_renamed
from gomodel.proxy.transfers import dropped, may_name_transfers, without_transfers
from gomodel.proxy.sse import ResponsesStreamObserver, SSEFramer, event_object
from gomodel.responses_history import (as_listed, as_retrieved, checked_previous_id, continued, cut_short,
                                      error_hidden, error_shown, error_shown_with_bytes, events_as_retrieved,
                                      no_chosen_id, normalise_input, relink, swept_for, unfinished_previous,
                                      unknown_previous, unknown_response, with_history, with_references)
from gomodel.responses_partial import PartialStream
from gomodel.routing.affinity import affinity_key
from gomodel.translate.call_ids import SHORT_ID_TYPES, fit_call_ids
from gomodel.translate.openai_body import OPENAI_TYPES, for_openai
from gomodel.translate.responses_chat import (ChatToResponsesStream, NativeResponses, chat_to_response,
                                              checked_include, native_kept_nowhere, no_native_route,
                                              request_to_chat, response_object, truncated)
from gomodel.translate.whole_response import response_events
from gomodel.upstream.client import discard
from gomodel.upstream.errors import upstream_error, without_address

# An upstream's 404 body longer than this is no error envelope worth reading.
NOT_FOUND_BODY_LIMIT = 64 * 1024


class _NotKnownUpstream(Exception):
    """The upstream answered that it does not know the previous response."""


class _Concluded(Exception):
    """The response a cancel was sent for was over at its instance already: C{response}, as it has it."""

    def __init__(self, response):
        Exception.__init__(self)
        self.response = response


class ResponsesRoute:
    """Creates responses and serves their stored lifecycle."""

    log = Logger()

    def __init__(self, exchange, clock, registry, store=None, salts=None, gate=None, usage=None, watches=None,
                 owner=None, keys=None, native=None):
        """
        @param store: an C{IResponseStore}, or None: nothing is kept.
        @param salts: the L{gomodel.auth.tenancy.CacheSalts} (a managed key's C{cache_salt} for vLLM), or None.
        @param gate: the L{gomodel.limits.gate.Gate} (a target at its limit is routed around; a background
            response's usage is charged to its key's budgets), or None.
        @param usage: the L{gomodel.accounting.usage.UsageLedger} (a background response's usage is recorded
            once it is over), or None.
        @param watches: the store's C{IBackgroundWatches}, C{owner} this process's id in it, and C{keys} the
            L{gomodel.auth.keys.KeyRing}: see L{BackgroundWatch}.
        @param native: the L{NativeResponses} shared with the batch runner (default: this route's own).
        """
        self._exchange = exchange
        self._clock = clock
        self._registry = registry
        self._store = store
        self._salts = salts
        self._gate = gate
        self._native_responses = native if native is not None else NativeResponses(clock)
        self._refreshing = {}  # response id -> its refresh from its instance (a Deferred), until its answer is stored
        self._deleted = set()  # ids deleted (while their refresh was under way): its answer is not stored back
        # (a service: started and stopped with the store's users)
        self.watch = (BackgroundWatch(clock, store, registry, self.refresh, usage, gate, watches, owner, keys)
                      if store is not None else None)

    # -- create ----------------------------------------------------------------

    async def create(self, request, ctx, body):
        """Answer a Responses API create request; see L{Exchange.relay} for what this returns.

        A virtual model's other targets and failover candidates are tried, in order, when a target fails
        before anything was sent (L{fails_over}); a follow-up's stored conversation goes to them as
        explicit input, as they do not hold it. Each target gets what its provider takes of the key and
        headers (L{target}: a vLLM's Responses and chat take C{cache_salt} and C{priority}).
        """
        stream = ctx.asked_stream = streams(body)
        background, store = boolean(body, "background"), boolean(body, "store")  # (vLLM reads "yes" as true)
        if background is True and store is False:  # (as OpenAI and vLLM answer it)
            raise errors.InvalidRequest("background can only be used when store is true: a background response "
                                        "is read back later.", param="background", code="invalid_value")
        if body.get("metadata") is not None:  # (kept and echoed: OpenAI's limits, whichever upstream makes it)
            checked_metadata(body["metadata"])
        checked_include(body.get("include"))  # (natively too: never sent for vLLM's own 400)
        if "request_id" in body:
            await no_chosen_id(self._store, body, ctx.principal)
        if background is True:  # (a drain out of time waits for its answer: L{gomodel.lifecycle.BACKGROUND_GRACE})
            request.background = True
        previous = await self._previous(body, ctx)
        first, *fallbacks = plan_model(self._registry, body, partial(affinity_key, request, body), ctx.principal)
        if fallbacks:
            vet_priority(request, ctx, fallbacks, body)
            if self._gate is not None:
                first, fallbacks = unsaturated(self._gate, first, fallbacks)
        # the instance that holds the conversation, where the key may use it
        provider = first.provider if previous is None else held(self._registry, first, previous, ctx.principal).provider
        while True:
            try:
                return await self._create_at(request, ctx, body["model"], dict(body, model=first.upstream_model),
                                             provider, stream, previous)
            except errors.GatewayError as failed:
                if not fails_over(failed) or ctx.attempts >= self._exchange.max_attempts:  # (every target's sends)
                    raise
                failing = provider
                if provider is not first.provider:  # the instance that holds the conversation: the route's own next
                    provider = first.provider
                elif fallbacks:
                    first, *fallbacks = fallbacks
                    provider = first.provider
                else:
                    raise
                self._exchange.failed_over(failing, "target", failed.code or f"HTTP {failed.status}", None, ctx)

    async def _create_at(self, request, ctx, model, body, provider, stream, previous):
        """Create the response at C{provider} for C{body} (its C{model} the upstream's; C{model}, the client's
        name for it): natively, or translated to chat completions for a provider without C{/responses}."""
        ctx.route(provider, model, body["model"])
        principal = ctx.principal
        if provider.priority_scheduling or principal is not None and not principal.master:  # (the master key's
            target(request, ctx, self._salts, provider, body)  # requests take nothing else where nothing schedules)
        elif provider.type in OPENAI_TYPES:  # (this target's own copy: without vLLM's fields; target() does it too)
            for_openai(body)
        # A follow-up goes to the replica that made the previous response (vLLM keeps it in memory); a session
        # or conversation (Codex's prompt_cache_key, a long prompt's opening) to the one that has its prefix.
        prefer = previous.get("replica") if previous is not None and previous["provider"] == provider.name else None
        affinity = affinity_key(request, body) if provider.keeps_sessions else None
        turn = _Turn(self, ctx, body, provider, previous)
        if self._native_responses.native(provider.name):
            native_kept_nowhere(provider.type, body)
            try:
                # (vLLM keeps a response in the memory of the instance that made it, with the turns before it:
                # a conversation one of whose turns was deleted goes on from the turns after it, as translated)
                if previous is not None and (previous["provider"] != provider.name
                                             or await self._store.follows_deleted(previous["id"])):
                    explicit = await with_history(self._store, body, previous)
                    return await self._native(request, ctx, provider, explicit, stream, turn, None, affinity, True)
                sent = body if previous is None else await with_references(self._store, body, previous)
                return await self._native(request, ctx, provider, sent, stream, turn, prefer, affinity)
            except _NotKnownUpstream:
                if previous is None:  # stored meanwhile (another host's write was not committed yet)
                    previous = await self._previous(body, ctx)
                    if previous is None:
                        raise unknown_previous(body["previous_response_id"]) from None
                explicit = await with_history(self._store, body, previous)
                self.log.info("provider {provider} no longer knows response {id}; sending the stored "
                              "conversation instead", provider=provider.name, id=previous["id"])
                return await self._native(request, ctx, provider, explicit, stream, turn, None, affinity, True)
            except _NoNativeRoute:
                self._native_responses.remember(provider.name)
        echo = dict(body, store=turn.stored, previous_response_id=turn.previous_id)
        if previous is not None:
            body = await with_history(self._store, body, previous)
        bound = "max_completion_tokens" if provider.type in MAX_COMPLETION_TYPES else "max_tokens"
        chat, tries = request_to_chat(body, bound), 0
        if provider.type in SHORT_ID_TYPES:  # (a vLLM's call ids, 46 characters, are too long for OpenAI)
            fit_call_ids(chat)
        while True:
            try:
                return await self._translated(request, ctx, provider, body, echo, jsonutil.dumps(chat), stream, turn,
                                              prefer, affinity)
            except errors.UpstreamError as e:
                tries += 1
                shorter = truncated(chat, e, tries) if body.get("truncation") == "auto" else None
                if shorter is None:
                    raise
                self.log.info("the prompt for {provider} did not fit its context: its {count} oldest messages "
                              "dropped (truncation auto)", provider=provider.name,
                              count=len(chat["messages"]) - len(shorter["messages"]))
                chat = shorter

    async def _translated(self, request, ctx, provider, body, echo, chat, stream, turn, prefer, affinity):
        """Create the response at C{provider}'s chat completions, C{chat} the body translated (L{_create_at})."""
        if stream:
            observer = ChatToResponsesStream(echo, self._clock, partial(without_address, upstream=provider))
            # (an upstream that ignores "stream" answers whole: its answer becomes the stream's events)
            try:
                result = await self._exchange.relay(request, ctx, provider, upstream_call(
                    "/chat/completions", chat, observer=observer, transform=observer.whole, model=body["model"],
                    prefer=prefer, affinity=affinity))
            except CancelledError:
                if turn.stored:
                    turn.keep(_final(None, observer.made, True))
                raise
            if result is not None:
                request.responseHeaders.put(CONTENT_TYPE, EVENT_STREAM)
            if turn.stored:
                turn.keep(_final(observer.response, observer.made, False, observer.error))
            return result
        now = int(self._clock.seconds())
        # (a stream nobody asked for, from an upstream that streams anyway, is gathered into one chat
        # completion first: L{gomodel.proxy.gather})
        call = upstream_call("/chat/completions", chat, model=body["model"], prefer=prefer, affinity=affinity,
                             transform=lambda answer: turn.keep_body(chat_to_response(answer, echo, now), False))
        return await self._exchange.relay(request, ctx, provider, call)

    async def input_tokens(self, request, ctx, body):
        """OpenAI's C{POST /v1/responses/input_tokens}: the input tokens of a create request C{body}, as the
        tokenizer of the first of the model's targets that has one the gateway can ask (vLLM's C{/tokenize},
        given the chat messages and tools the request becomes, a follow-up's stored conversation included);
        see L{Exchange.relay} for what this returns.

        @raise gomodel.errors.NotSupported: no provider of the model has such a tokenizer (it is never guessed).
        @raise gomodel.errors.InvalidRequest: an C{include} or a follow-up its create would refuse (L{checked_include};
            L{_previous}: one of a response nobody holds, or of a background response not over).
        """
        checked_include(body.get("include"))  # (refused as its create would be, its previous response too)
        previous = await self._previous(body, ctx)
        planned = plan_model(self._registry, body, principal=ctx.principal)
        routes = [route for route in planned if route.provider.type == "vllm"]
        first = routes[0] if routes else planned[0]
        ctx.route(first.provider, body["model"], first.upstream_model)
        if not routes:
            raise errors.NotSupported(
                f"input_tokens is not available for '{body['model']}': its provider '{first.provider.name}' "
                f"({first.provider.type}) has no tokenizer the gateway can ask, and the gateway does not guess.")
        if previous is not None:
            body = await with_history(self._store, body, previous)
        chat = request_to_chat(body)
        tokenize = {"model": first.upstream_model, "messages": chat["messages"], "add_generation_prompt": True}
        if chat.get("tools"):
            tokenize["tools"] = chat["tools"]
        call = upstream_call("tokenize", jsonutil.dumps(tokenize), native=True, model=first.upstream_model,
                             transform=_input_tokens, limited=False)
        return await self._exchange.relay(request, ctx, first.provider, call)

    async def _native(self, request, ctx, provider, body, stream, turn, prefer, affinity, explicit=False):
        """Create the response at C{provider}'s C{/responses}; see L{Exchange.relay} for what this returns.

        @param explicit: C{body} carries the stored conversation (L{with_history}): the answer names the
            response it follows (C{turn.previous_id}) where the upstream's, sent none, says null.
        """
        async def vet(upstream):
            if upstream.code in (404, 405, 501):
                await self._not_found(provider, upstream, body)

        if stream:
            # (a background response is kept from its first event: read, cancelled, deleted while its stream runs,
            # on any host; it goes on at its instance when its stream ends early)
            background = body.get("background") is True and turn.stored
            named = counted = None  # the id its instance makes it under, known before its first event (L{_named})
            if background:
                sent, named = _named(body, provider)
                if sent is not body:  # (its token estimate is the client's body's: not of the gateway's field)
                    counted, body = jsonutil.dumps(body), sent
            hide = partial(without_address, upstream=provider)
            if explicit or turn.stored:
                observer = _Relinked(turn.previous_id if explicit else None, turn if turn.stored else None, hide,
                                     background, unnamed=background and named is None)
            else:
                observer = ResponsesStreamObserver(hide)
            # (an upstream that ignores "stream" answers whole: its response becomes the stream's events)
            call = upstream_call("/responses", jsonutil.dumps(body), observer=observer, vet=vet, model=body["model"],
                                 transform=partial(_streamed, observer), prefer=prefer, affinity=affinity,
                                 counted=counted, asked=None if counted else asked_tokens(body, "/responses"))
            left = None  # whether the client left, once the stream is over; None: it failed before it began
            if background:
                ctx.hold()  # (completed once its reservation's fate is known, below)
            try:
                result = await self._exchange.relay(request, ctx, provider, call)
                if result is not None:
                    request.responseHeaders.put(CONTENT_TYPE, EVENT_STREAM)
                left = False
                return result
            except CancelledError:
                left = True
                if background and observer.naming is not None:  # its client left before the event its provider
                    # names it in: its upstream is read on until then (L{_Relinked.left}); it goes on there
                    self.log.info("background stream {request_id}: its client left before {provider} named its "
                                  "response; read on until it does", request_id=ctx.request_id.decode(),
                                  provider=provider.name)
                    await observer.naming
                    if turn.began is not None:  # (charged what its final event says, where it came in what was
                        # read on; else what it used once over, by its watch alone, as below)
                        ctx.usage, ctx.estimated = observer.usage if observer.response is not None else {}, False
                raise
            finally:  # (the client left, the stream broke: a background response kept as it began is watched)
                if background:
                    try:
                        if left and turn.began is None and named is not None and ctx.replica is not None:
                            # its client left before its first event came: it goes on at its instance all the same,
                            # kept queued and watched as from that event (charged what it used once over, by its
                            # watch alone: no estimate of its prompt besides)
                            turn.begin(response_object(dict(body, store=True, previous_response_id=turn.previous_id),
                                                       named, int(self._clock.seconds()), body["model"], "queued",
                                                       [], background=True))
                            ctx.usage, ctx.estimated = {}, False
                        turn.ended(observer.response)
                        if observer.response is None and turn.began is not None and self._gate is not None:
                            # it goes on at its instance: what it reserved of its key's token windows stays
                            # taken, as a create answered queued keeps it (its watch charges what it used)
                            self._gate.reservation_stays(ctx)
                    finally:
                        ctx.release()
                elif turn.stored:
                    turn.keep(_final(observer.response, observer.began, left, observer.error))
        transform = partial(turn.keep_body, upstream=provider)  # (its error without the upstream's addresses)
        if explicit:
            transform = partial(relink, turn.previous_id, transform)
        if body.get("background") is True and self._gate is not None:
            transform = partial(_queued, partial(self._gate.reservation_stays, ctx), transform)
        call = upstream_call("/responses", jsonutil.dumps(body), transform=transform,
                             vet=vet, model=body["model"], prefer=prefer, affinity=affinity,
                             asked=asked_tokens(body, "/responses"))
        return await self._exchange.relay(request, ctx, provider, call)

    async def _not_found(self, provider, upstream, body):
        """Sort out a 404/405/501: no such route, an unknown previous response, or a real API error.

        @raise _NoNativeRoute: the provider has no C{/responses}.
        @raise _NotKnownUpstream: it does not know the previous response, which the gateway stored.
        @raise gomodel.errors.InvalidRequest: it does not know the previous response, which the gateway does not
            hold either (L{unknown_previous}: OpenAI's 400, where vLLM answers a 404).
        @raise gomodel.errors.GatewayError: the upstream's own 404, or its body could not be read.
        """
        if upstream.code != 404:
            discard(upstream)
            raise _NoNativeRoute()
        try:
            answer = await self._exchange.read(provider, upstream, NOT_FOUND_BODY_LIMIT)
        except errors.BadUpstreamResponse:  # too large to be an error envelope
            raise upstream_error(404, b"", provider.name, provider.hidden) from None
        if no_native_route(404, answer):
            raise _NoNativeRoute()  # FastAPI's {"detail": "Not Found"}: no /responses here
        error = jsonutil.loads(answer)["error"]
        previous_id = body.get("previous_response_id")
        if previous_id and previous_id in str(error.get("message", "")):
            if self._store is not None and await self._store.get(previous_id) is not None:
                raise _NotKnownUpstream()
            raise unknown_previous(previous_id)
        raise upstream_error(404, answer, provider.name, provider.hidden)

    async def _previous(self, body, ctx):
        """The stored record of C{previous_response_id}, as it is continued (L{over}), or None (the upstream may still
        know it: a response the master key continues that was not made through the gateway, or not stored, or
        deleted).

        @raise gomodel.errors.InvalidRequest: it is no string, or empty (L{checked_previous_id}); or a background
            response not over (L{over}).
        @raise gomodel.errors.NotFound: it belongs to another tenant, or a managed key names a response the
            gateway does not hold (the upstream may still hold another tenant's: deleted, or not stored).
        """
        previous_id = body.get("previous_response_id")
        if previous_id is None:
            return None
        checked_previous_id(previous_id)
        if self._store is None:
            return None
        previous = await continued(self._store, previous_id, ctx.principal)
        return previous if previous is None else await self.over(previous, ctx.request_id, ctx.trace)

    async def over(self, previous, request_id, trace=None):
        """C{previous}, the stored record of the response a create (online, or a batch's line) continues, as it is
        continued: as stored where it was over when last read; else with its response as its instance has it now
        (L{refresh}: the gateway's copy of a background response is refreshed every few seconds alone), where that
        is over.

        @param request_id: the asking request's id (sent upstream as C{X-Request-Id}); C{trace}, its
            L{gomodel.accounting.tracing.RequestTrace}, or None.
        @raise gomodel.errors.InvalidRequest: it is still queued or in progress (or its instance cannot say):
            L{unfinished_previous}, OpenAI's refusal, before any create goes upstream.
        """
        if previous["response"].get("status") not in UNFINISHED:
            return previous
        fresh = await self.refresh(previous, request_id, trace)
        response = previous["response"] if fresh is None else fresh
        if response.get("status") in UNFINISHED:
            raise unfinished_previous(previous["id"], response["status"])
        return dict(previous, response=response, status=response.get("status"))

    def stores(self, body) -> bool:
        """Whether a response created for C{body} is kept by the gateway."""
        return self._store is not None and body.get("store") is not False

    def keep(self, body, provider, replica, response, previous_id, ctx, response_json=None, held=False):
        """Store C{response} (created for C{body}, which L{stores}, by C{provider}'s C{replica}, following
        C{previous_id} or None, for the request C{ctx}: its key's tenant owns it); one still running (in
        the background) is watched until it is over (L{BackgroundWatch}), C{held} while its stream runs.

        @param response_json: C{response} as the upstream's JSON bytes, when at hand.
        @return: the record stored, or None (C{response} is no response object).
        """
        if response.__class__ is not dict:
            return None
        response_id = response.get("id")
        if response_id.__class__ is not str:
            return None
        if model_renamed(provider, response):  # (a model it lists by a path: kept as clients know it)
            response_json = None
        if (ctx.transfers_dropped and provider.type in SALTED_PROVIDER_TYPES and may_name_transfers(response_json)
                and dropped(response)):
            response_json = None  # (its answer went without them: L{gomodel.proxy.transfers})
        record = {"id": response_id, "provider": provider.name, "replica": replica,
                  "created_at": int(self._clock.seconds()), "previous_response_id": previous_id,
                  "status": response.get("status"), "input_items": normalise_input(body.get("input")),
                  "response": response, "tenant": tenant_of(ctx.principal), "streamed": body.get("stream") is True}
        if response_json is not None:
            record["response_json"] = response_json
        self._store.keep(record)
        if record["status"] in UNFINISHED:
            self.watch.watch(record, ctx, held)
        return record

    # -- lifecycle -------------------------------------------------------------

    async def retrieve(self, request, response_id):
        """The stored response, with the fields of its output its C{include} names (L{as_retrieved}: its instance,
        a vLLM, takes none on a retrieve); a background one still running is refreshed from its instance. Asked for
        its events (C{stream=true}, the openai SDK's C{retrieve(stream=True, starting_after=N)}): L{_replay}."""
        record = await self._record(request, response_id)
        include = _include(request)
        if query_arg(request, b"stream", "false") != "false":
            return await self._replay(request, record, include)
        response = record["response"]
        if response.get("status") in UNFINISHED:
            fresh = await self.refresh(record, request.context.request_id, request.context.trace)
            if fresh is not None:
                response = fresh
        return self._answer(request, record, as_retrieved(response, include))

    def _answer(self, request, record, response) -> bytes:
        """C{response}, C{record}'s response as stored or read again from its instance (a refresh, which keeps what
        the instance has), as C{request}'s JSON answer: without its transfer fields where the key's requests to its
        provider go without them (L{_goes_without}), as its create's answer went."""
        body = jsonutil.dumps(response)
        if self._goes_without(request.context, self._registry.provider(record["provider"])):
            body = without_transfers(body)
        return json_answer(request, body)

    def _goes_without(self, ctx, provider) -> bool:
        """Whether C{ctx}'s key's requests to C{provider} (None: one no longer configured) go without transfer
        fields, and so what it reads of a response its instance has (L{gomodel.auth.tenancy.CacheSalts.strips})."""
        return provider is not None and self._salts is not None and self._salts.strips(ctx.principal, provider)

    async def _replay(self, request, record, include):
        """The events of C{record}'s background stream after sequence number C{starting_after} (all of them where
        none is named), then those still to come, relayed from the instance that holds them (its replica: vLLM
        keeps a background stream's events in its memory, OpenAI too) as a stream is relayed: with its
        backpressure, its upstream closed when its client leaves, its error events without the upstream's address,
        the fields C{include} (checked values) does not name left out as a retrieve leaves them out
        (L{events_as_retrieved}).
        What they say of usage is not charged again (its create's was). Never the response object where events
        were awaited; see L{Exchange.relay} for what this returns.

        @raise gomodel.errors.InvalidRequest: C{starting_after} is no sequence number, or the response's events
            cannot be replayed: it was not made in the background, or not streamed (vLLM's stream of one then
            breaks off at once), or it is kept by the gateway alone (made translated to chat completions: its
            provider has no Responses API), or its instance no longer holds it (it restarted).
        @raise gomodel.errors.NotFound: its provider is no longer configured.
        """
        response_id, response = record["id"], record["response"]
        after = query_arg(request, b"starting_after")
        if after is not None and not _SEQUENCE.fullmatch(after):
            raise errors.InvalidRequest("starting_after must be a sequence number: an integer from 0.",
                                        param="starting_after", code="invalid_value")
        if response.get("background") is not True:
            raise _not_replayed(response_id, "it was not created in the background (background=true, stream=true): "
                                "only a background stream's events are kept")
        provider = self._registry.provider(record["provider"])
        if provider is None:
            raise errors.NotFound(f"The provider '{record['provider']}' that made response '{response_id}' "
                                  "is no longer configured.", code="provider_not_found")
        if record.get("streamed") is False:  # (its instance's stream of it would break off at once: not asked)
            if not self._native_responses.native(provider.name):
                raise _gateways_alone(response_id)
            raise _not_streamed(response_id)
        ctx = request.context
        ctx.route(provider, response.get("model"), response.get("model"))
        ctx.dialect = RESPONSES  # (a replay that breaks ends with the Responses stream's error event)
        ctx.transfers_dropped = self._goes_without(ctx, provider)  # (its events: L{gomodel.proxy.transfers})

        async def vet(upstream):
            if upstream.code in (404, 405, 501):
                await self._unreplayable(provider, upstream, record)

        query = b"stream=true" if after is None else b"stream=true&starting_after=" + after.encode("ascii")
        observer = _Replayed(partial(without_address, upstream=provider), include)
        call = upstream_call(f"/responses/{response_id}", method=b"GET", query=query, vet=vet, limited=False,
                             observer=observer,
                             transform=partial(_no_events, response_id), pin=record.get("replica"))
        call.blames = False  # (vLLM's stream of a response it keeps no events of breaks off at once: no failure)
        call.rewrite = self._named(provider, record)  # (its events named as it was kept, as clients know it)
        try:
            return await self._exchange.relay(request, ctx, provider, call)
        except errors.UpstreamUnreachable:  # (broke off before its first event: vLLM's stream of one it keeps no
            # events of; or its instance is gone: asked for the response itself, which it answers in the first case)
            if await self.refresh(record, ctx.request_id, ctx.trace) is None:
                raise
            if record.get("streamed") is None:  # (stored before that was kept: the next replay is not asked)
                await self._store.note_streamed(response_id, False).addErrback(self._not_updated, response_id)
            raise _not_streamed(response_id) from None
        finally:  # (an answer read whole is no replay either: what it says of usage is not charged)
            ctx.usage, ctx.estimated = None, False

    async def _unreplayable(self, provider, upstream, record):
        """Sort out the 404/405/501 of a replay at C{record}'s instance: no Responses API there (the response is
        kept by the gateway alone, made translated), or an instance that no longer holds it (it restarted).

        @raise gomodel.errors.InvalidRequest: either of those.
        @raise gomodel.errors.GatewayError: the upstream's own 404, or its body could not be read.
        """
        if upstream.code != 404:
            discard(upstream)
            answer = b""
        else:
            try:
                answer = await self._exchange.read(provider, upstream, NOT_FOUND_BODY_LIMIT)
            except errors.BadUpstreamResponse:  # too large to be an error envelope
                raise upstream_error(404, b"", provider.name, provider.hidden) from None
        if upstream.code != 404 or no_native_route(404, answer):
            raise _gateways_alone(record["id"])
        if _names(answer, record["id"]):
            raise _not_replayed(record["id"], "the instance that made it no longer holds it (it restarted)")
        raise upstream_error(404, answer, provider.name, provider.hidden)

    async def delete(self, request, response_id):
        """Forget the stored response; answered as OpenAI does, C{{"id", "object": "response.deleted", "deleted":
        true}} (what the openai SDK's C{client.responses.delete} reads)."""
        await self._record(request, response_id)
        if not await self._store.delete(response_id):
            raise unknown_response(response_id)
        if response_id in self._refreshing:
            self._deleted.add(response_id)
        return json_answer(request, {"id": response_id, "object": "response.deleted", "deleted": True})

    async def input_items(self, request, response_id):
        """OpenAI's paginated list of the input items of one response, with the fields its C{include} names
        (L{as_listed})."""
        record = await self._record(request, response_id)
        include = _include(request)
        items = list(record["input_items"])
        order = query_arg(request, b"order", "desc")
        if order not in ("asc", "desc"):
            raise errors.InvalidRequest("order must be asc or desc.", param="order", code="invalid_value")
        if order == "desc":
            items.reverse()
        after = query_arg(request, b"after")
        if after is not None:
            ids = [item.get("id") for item in items]
            if after not in ids:
                raise errors.InvalidRequest(f"No input item '{errors.shown(after)}' in this response.", param="after",
                                            code="invalid_value")
            items = items[ids.index(after) + 1:]
        limit = query_limit(request, 20, 100)
        return json_answer(request, page(as_listed(items[:limit], include), len(items) > limit))

    async def cancel(self, request, response_id):
        """Forward a cancel to the instance running the (background) response; its answer is relayed (naming the
        response it follows, as L{_refreshed} does). One cancelled already, or a background one otherwise over, is
        answered as it is (OpenAI's "cancelling twice is idempotent": the final response object); one not made in
        the background is a 400 (OpenAI's: only those are cancelled); neither asks its instance."""
        record = await self._record(request, response_id)
        response = record["response"]
        status = response.get("status")
        if status == "cancelled" or status not in UNFINISHED and response.get("background") is True:
            return self._answer(request, record, response)
        if status not in UNFINISHED:
            raise errors.InvalidRequest("Only responses created with background=true can be cancelled.",
                                        param="response_id", code="response_not_cancellable")
        provider = self._registry.provider(record["provider"])
        if provider is None:
            raise errors.NotFound(f"The provider '{record['provider']}' that made response '{response_id}' "
                                  "is no longer configured.", code="provider_not_found")
        ctx = request.context
        ctx.route(provider, record["response"].get("model"), record["response"].get("model"))
        ctx.transfers_dropped = self._goes_without(ctx, provider)  # (the instance's answer: L{gomodel.proxy.transfers})
        named = self._named(provider, record)
        previous_id = record.get("previous_response_id")

        def kept(answer):
            # (a read from now on asks the instance anew: the answer of one under way is from before the cancel)
            self._refreshing.pop(response_id, None)
            answer = error_hidden(provider, None, answer)
            if previous_id is not None:  # (its instance, sent the conversation explicitly, says null: L{relink})
                answer = relink(previous_id, None, answer)
            if named is not None:
                answer = named(answer)
            try:
                self._update(record, jsonutil.loads(answer))
            except jsonutil.JSONError:
                pass
            return answer

        async def vet(upstream):
            if upstream.code == 404:
                await self._not_cancelled(provider, upstream, record)
            elif upstream.code == 400:
                await self._concluded(provider, upstream, record, ctx)

        call = upstream_call(f"/responses/{response_id}/cancel", transform=kept, vet=vet, pin=record.get("replica"))
        try:
            return await self._exchange.relay(request, ctx, provider, call)
        except _Concluded as over:
            return self._answer(request, record, over.response)

    async def _concluded(self, provider, upstream, record, ctx):
        """Sort out the 400 of a cancel at C{record}'s instance: one for a response it has finished since the
        gateway last read it (vLLM's "Cannot cancel a synchronous response.", its issue 57999) is answered as OpenAI
        does, with the final object (read from the instance, and stored); any other is the instance's own 400.

        @raise _Concluded: the response is over at its instance.
        @raise gomodel.errors.GatewayError: the instance's 400, or its body could not be read.
        """
        try:
            answer = await self._exchange.read(provider, upstream, NOT_FOUND_BODY_LIMIT)
        except errors.BadUpstreamResponse:  # too large to be an error envelope
            raise upstream_error(400, b"", provider.name, provider.hidden) from None
        fresh = await self.refresh(record, ctx.request_id, ctx.trace)
        if fresh is not None and fresh.get("status") not in UNFINISHED:
            raise _Concluded(fresh)
        raise upstream_error(400, answer, provider.name, provider.hidden)

    async def _not_cancelled(self, provider, upstream, record):
        """Sort out the 404 of a cancel at C{record}'s instance: one about the response is an instance that no
        longer knows it (it restarted): it will not finish, it is C{failed} (stored, and over for its watch).

        @raise gomodel.errors.InvalidRequest: the response failed so (C{response_not_cancellable}).
        @raise gomodel.errors.GatewayError: the upstream's own 404, or its body could not be read.
        """
        try:
            answer = await self._exchange.read(provider, upstream, NOT_FOUND_BODY_LIMIT)
        except errors.BadUpstreamResponse:  # too large to be an error envelope
            raise upstream_error(404, b"", provider.name, provider.hidden) from None
        if not _names(answer, record["id"]):
            raise upstream_error(404, answer, provider.name, provider.hidden)
        failed = _forgotten(record)
        await self._update(record, failed)
        self.watch.over(record, failed)
        raise errors.InvalidRequest(failed["error"]["message"], param="response_id", code="response_not_cancellable")

    def _named(self, provider, record):
        """The L{gomodel.proxy.renamed.ModelNamed} that writes C{record}'s model in its instance's answers (events)
        as it was kept, as clients know it, where C{provider} lists it by a path; else None."""
        model = record["response"].get("model")
        if not provider.renamed or model.__class__ is not str:
            return None
        return model_named(provider, self._registry.upstream_model(provider, model))

    async def _record(self, request, response_id):
        """The stored response the request's key may see; L{gomodel.errors.NotFound} otherwise."""
        record = await self._store.get(response_id) if self._store is not None else None
        if record is None or not visible(request.context.principal, record):
            if record is None and self._store is not None and await swept_for(self._store, response_id,
                                                                              request.context.principal):
                raise errors.NotFound(f"No response '{errors.shown(response_id)}' is stored by the gateway: it "
                                      "expired (swept past its retention, RESPONSES_RETENTION).",
                                      param="response_id", code="response_not_found")
            raise unknown_response(response_id)
        return record

    def _update(self, record, response) -> Deferred:
        """Store C{response} as C{record}'s, when it is its and C{record} is stored still (one deleted meanwhile,
        here or by another process, is not stored again), its tenant's (another tenant's of that id is left as it
        is); a Deferred firing once done."""
        if not isinstance(response, dict) or response.get("id") != record["id"]:
            return succeed(None)
        provider = self._registry.provider(record["provider"])
        if provider is not None:  # (a model it lists by a path: kept, and read back, as clients know it)
            model_renamed(provider, response)
        return self._store.update(record["id"], response.get("status"), response, record.get("tenant")).addErrback(
            self._not_updated, record["id"])

    def _not_updated(self, failure, response_id):
        """Log why C{response_id}'s response could not be stored: the database unavailable (down, or this
        gateway stopping) is a warning; anything else an error."""
        if failure.check(errors.StorageUnavailable):
            self.log.warn("response {id} not updated: {error}", id=response_id, error=failure.value.message)
        else:
            self.log.failure("updating response {id} failed", failure, id=response_id)

    def refresh(self, record, request_id, trace=None, keep=True) -> Deferred:
        """Ask C{record}'s instance (its provider's replica) for its background response, sharing an ask
        under way; the answer is stored (unless C{keep} is false: one deleted), and one found over goes to
        L{BackgroundWatch.over}.

        @param request_id: the asking request's id (sent upstream as C{X-Request-Id}).
        @param trace: its L{gomodel.accounting.tracing.RequestTrace}, or None.
        @return: a Deferred firing with the response as its instance has it now, or None when it has none
            to give (unreachable, an odd answer; its provider no longer configured); never failing.
        """
        provider = self._registry.provider(record["provider"])
        if provider is None:
            return succeed(None)
        if not keep:  # (an ask under way, shared, stores nothing back either)
            self._deleted.add(record["id"])
        refresh = self._refreshing.get(record["id"])
        if refresh is None:
            refresh = self._refreshing[record["id"]] = Deferred.fromCoroutine(
                self._refreshed(request_id, trace, provider, record))
            refresh.addBoth(self._settle, record, refresh)
        return _branch(refresh)

    def _settle(self, fresh, record, refresh):
        """Store C{fresh}, C{record}'s response as its instance has it (None: none; a refresh that failed
        unexpectedly is logged and none), then forget its C{refresh}; C{fresh} goes on to its readers."""
        if isinstance(fresh, Failure):
            self.log.failure("refreshing response {id} failed", fresh, id=record["id"])
            fresh = None
        elif fresh.__class__ is not dict or fresh.get("id") != record["id"]:
            fresh = None  # (not this response)
        # (a refresh a cancel dropped, L{cancel}, has an answer from before it: not stored)
        stale = record["id"] in self._deleted or self._refreshing.get(record["id"]) is not refresh
        stored = succeed(None) if stale else self._update(record, fresh)
        stored.addBoth(self._forget, record["id"], refresh)
        if fresh is not None and fresh.get("status") not in UNFINISHED:
            self.watch.over(record, fresh)
        return fresh

    def _forget(self, _, response_id, refresh):
        """Forget C{refresh}, of C{response_id} (its answer is stored: reads from now on find it there), unless
        a cancel dropped it meanwhile (L{cancel}: the refresh of C{response_id} now, if any, is another's)."""
        if self._refreshing.get(response_id) is refresh:
            del self._refreshing[response_id]
        if response_id not in self._refreshing:
            self._deleted.discard(response_id)

    async def _refreshed(self, request_id, trace, provider, record):
        """C{record}'s background response as its instance (C{provider}'s replica) has it now, or None when it
        has none to give (unreachable, an odd answer). One the instance no longer knows (it restarted: vLLM
        keeps responses in memory) will never finish: it is C{failed}. One that follows another names it, as its
        create's answer did, though its instance was sent the conversation explicitly (L{relink})."""
        response_id = record["id"]
        call = upstream_call(f"/responses/{response_id}", method=b"GET", pin=record.get("replica"))
        try:
            fetched = await self._exchange.fetch(request_id, provider, call, trace)
            if fetched.response.code == 404 and _names(fetched.body, response_id):
                return _forgotten(record)
            if fetched.response.code != 200:
                return None
            previous_id = record.get("previous_response_id")  # (its instance, sent the conversation explicitly,
            if previous_id is not None:  # says null: L{relink})
                return error_shown(jsonutil.loads(relink(previous_id, None, fetched.body)), provider)
            return error_shown(jsonutil.loads(fetched.body), provider)
        except (errors.GatewayError, jsonutil.JSONError):
            return None


def _named(body, provider):
    """C{(body, id)}: a background stream's C{body} naming the response its instance makes, and that id (vLLM makes
    a response's id of the body's C{request_id}: the gateway's own, C{resp_...}, unless the master key chose one), so
    that one whose client leaves before its first event is watched all the same; C{(body, None)} where the
    provider names it itself (it is then known from that event only)."""
    if provider.type != "vllm":
        return body, None
    chosen = body.get("request_id")
    if chosen is None:
        chosen = new_id("resp")
        body = dict(body, request_id=chosen)
    return body, chosen if chosen.__class__ is str and chosen else None


def _include(request) -> list:
    """A retrieve's or input items' list's C{include} (C{include[]} as the openai SDK sends it, or C{include}),
    checked as create checks it (L{checked_include})."""
    return checked_include([value.decode("utf-8", "replace") for name in (b"include[]", b"include")
                            for value in request.args.get(name, ())])


_SEQUENCE = re.compile("[0-9]{1,18}")  # a C{starting_after} (a stream's event number)


def _not_replayed(response_id, why) -> errors.InvalidRequest:
    """The 400 of a C{retrieve(stream=True)} of a response whose events cannot be replayed, saying C{why}."""
    return errors.InvalidRequest(f"The events of response '{errors.shown(response_id)}' cannot be streamed again: "
                                 f"{why}. Retrieve it without stream.", param="stream", code="unsupported_value")


def _not_streamed(response_id) -> errors.InvalidRequest:
    """The 400 of a replay of a background response not created with stream."""
    return _not_replayed(response_id, "it was not streamed (stream=true): its instance keeps the events of a "
                         "background stream alone")


def _gateways_alone(response_id) -> errors.InvalidRequest:
    """The 400 of a replay of a response made translated to chat completions."""
    return _not_replayed(response_id, "it is kept by the gateway alone (its provider has no Responses API: it was "
                         "made translated to chat completions), which keeps no events")


def _no_events(response_id, answer: bytes):
    """What a replay answered whole (a response object, not its events) becomes: never the object where events
    were awaited.

    @raise gomodel.errors.InvalidRequest: always.
    """
    raise _not_replayed(response_id, "its provider answered the response, not its events")


class _Replayed(ResponsesStreamObserver):
    """A replayed background stream (L{ResponsesRoute._replay}): relayed and watched as any Responses stream, but
    for its usage and events, which its create's stream or watch charged: none here (nor an estimate of them), and
    for the fields of its events its C{include} does not name (L{events_as_retrieved}: as a retrieve shows them)."""

    usage = property(lambda self: None, lambda self, usage: None)
    events = property(lambda self: 0, lambda self, events: None)

    def __init__(self, hide, include):
        """
        @param hide: as L{ResponsesStreamObserver}'s.
        @param include: the replay's C{include} (checked values).
        """
        super().__init__(hide)
        self._include = include

    def feed(self, data: bytes) -> bytes:
        return events_as_retrieved(super().feed(data), self._include)


def _input_tokens(answer: bytes) -> bytes:
    """OpenAI's C{input_tokens} answer for vLLM's C{/tokenize} C{answer}.

    @raise ValueError: it has no token count.
    """
    count = count_tokens_answer(jsonutil.loads(answer))["input_tokens"]
    return jsonutil.dumps({"object": "response.input_tokens", "input_tokens": count})


def _queued(hold, then, answer: bytes) -> bytes:
    """C{answer}, a background create's, passed on to C{then}; where it is queued or in progress without usage (it
    generates on at its instance), C{hold}() keeps what its admission reserved of its key's token windows taken."""
    try:
        response = jsonutil.loads(answer)
    except jsonutil.JSONError:
        response = None
    if response.__class__ is dict and response.get("status") in ("queued", "in_progress") and not response.get("usage"):
        hold()
    return then(answer)


def _branch(d: Deferred) -> Deferred:
    """A Deferred firing with C{d}'s result, which C{d} keeps for its other branches."""
    branch = Deferred()

    def fire(result):
        branch.callback(result)
        return result

    d.addBoth(fire)
    return branch


def _forgotten(record) -> dict:
    """C{record}'s response as failed: the instance running it no longer knows it (it restarted; or, a background
    stream's whose client left before its first event, it dropped it with its stream, as a vLLM that cancels a
    creation on disconnect does: never made)."""
    return dict(record["response"], status="failed", error={
        "code": "server_error", "message": f"The instance running response '{record['id']}' no longer knows it "
        "(it restarted, or dropped it when the stream creating it ended before its first event): it will not "
        "finish."})


def _names(answer: bytes, response_id) -> bool:
    """Whether C{answer}, an upstream's error, is one about C{response_id} (vLLM's for an id it does not hold)."""
    try:
        error = jsonutil.loads(answer).get("error")
    except (jsonutil.JSONError, AttributeError):
        return False
    return isinstance(error, dict) and response_id in str(error.get("message", ""))


class _NoNativeRoute(Exception):
    """The provider has no /responses route."""


class _Turn:
    """What one create call needs to store its response once it has it.

    @ivar began: the record of a background stream's response, kept from its first event (L{begin}), or None.
    """

    began = None

    def __init__(self, route, ctx, body, provider, previous):
        self._route = route
        self._ctx = ctx
        self._body = body
        self._provider = provider
        self.stored = route.stores(body)
        self.previous_id = body.get("previous_response_id") or (previous or {}).get("id")

    def keep(self, response, response_json=None):
        """Store C{response} when it is to be stored."""
        if self.stored:
            self._route.keep(self._body, self._provider, self._ctx.replica, response, self.previous_id, self._ctx,
                             response_json)

    def begin(self, response):
        """Store C{response}, a background stream's first response object, with its watch held (its stream's end
        charges it, or L{ended} lets its watch ask after it; where this process dies, another adopts it): it is
        read, cancelled and deleted on any host while its stream runs."""
        if self.stored and self.began is None:
            self.began = self._route.keep(self._body, self._provider, self._ctx.replica, response, self.previous_id,
                                          self._ctx, held=True)

    def ended(self, response):
        """A background stream ended: its final C{response} replaces the one kept at its first event, unless
        that was deleted meanwhile (it is not stored again), and its watch is given up; without one (the stream
        ended early: the client left, the connection broke) its watch asks after it until it is over."""
        if self.began is None:
            self.keep(response)
            return
        if response is not None:
            self._route._update(self.began, response)
        self._route.watch.unhold(self.began["id"], response is not None)

    def keep_body(self, answer: bytes, relayed=True, upstream=None) -> bytes:
        """Keep the response C{answer} (its JSON bytes, returned as they are) when it is to be stored.
        With C{relayed} (the upstream's own answer), its usage, parsed here anyway, is noted on the
        request context (see L{gomodel.proxy.exchange.UpstreamCall.transform}); with C{upstream} (a provider's
        pool), its error is kept and returned without that upstream's addresses (L{error_hidden}'s, one parse)."""
        if not self.stored:
            return answer if upstream is None else error_hidden(upstream, None, answer)
        try:
            response = jsonutil.loads(answer)
        except jsonutil.JSONError:
            return answer
        if upstream is not None:
            response, answer = error_shown_with_bytes(response, answer, upstream)
        if relayed and response.__class__ is dict:
            usage = response.get("usage")
            if usage.__class__ is dict:
                self._ctx.usage = usage
        self.keep(response, answer)
        return answer


class _Relinked(ResponsesStreamObserver):
    """A native Responses stream for a conversation sent explicitly, relayed naming the response it follows
    (L{relink}), and its final response object, kept, too; or (and) one of a stored response, whose first response
    object is noted (kept where the stream ends before it: L{_final}), and kept at once for a background one
    (L{_Turn.begin}): its instance goes on making it when its stream ends early.

    @ivar started: the response object of a background response stream's first event that carries one
        (C{response.created}), or None (none yet; another stream's is read only where needed: L{began}).
    @ivar usage: as L{ResponsesStreamObserver}'s; a background response's is C{{}} from its first event until its
        final one (one ended early is charged by its watch: see L{_Turn.ended}).
    """

    started = None
    _partial = None  # the events of a stored stream not in the background, folded where it ends early (L{began})
    # while its upstream is read on after its client left (L{left}): a Deferred firing with None once that is over
    naming = None

    def __init__(self, previous_id, turn=None, hide=None, background=False, unnamed=False):
        """
        @param previous_id: the response it follows, or None: not sent explicitly (nothing to relink).
        @param turn: the L{_Turn} of a stored response's stream (its first response object is kept: L{began}),
            or None.
        @param hide: as L{ResponsesStreamObserver}'s.
        @param background: it is a background response's stream (its first response object is kept at once).
        @param unnamed: (with C{background}) its provider names the response itself (OpenAI's; a vLLM's is named by
            the gateway's C{request_id}: L{_named}), in the stream's first event.
        """
        super().__init__(hide)
        self._previous_id = previous_id
        self._turn = turn
        self._background = background
        self._unnamed = unnamed

    def left(self) -> bool:
        """Its client left (L{gomodel.proxy.relay.StreamRelay}): whether its upstream is read on, its reads given
        here alone, until L{named}: a background response whose provider names it, no event having named it yet,
        goes on there (as OpenAI's does) and is kept, read and cancelled through the gateway once named; closing
        its upstream now would leave it unknown here. L{naming} is set, fired once that is over
        (L{read_on_over})."""
        if not self._unnamed or self.started is not None:
            return False
        self.naming = Deferred()
        return True

    def named(self) -> bool:
        """Whether an event named the response (its upstream, read on, is closed then: it goes on there)."""
        return self.started is not None

    def read_on_over(self):
        """Its upstream, read on after its client left, is closed (named, ended, silent for too long)."""
        if self.naming is not None and not self.naming.called:
            self.naming.callback(None)

    def feed(self, data: bytes) -> bytes:
        out = super().feed(data)
        if self._previous_id is not None:
            out = relink(self._previous_id, None, out)
        if self._turn is not None and self.started is None and out:
            if not self._background:  # (its events, read only where the stream ends before its end)
                if self._partial is None:
                    self._partial = PartialStream()
                self._partial.add(out)
                return out
            self.started = _first_response(out)
            if self.started is not None:
                self._turn.begin(self.started)
                if self.usage is None:  # (what it makes is charged by its final event, read with its first
                    self.usage = {}  # or later, or by its watch once over where its stream ends early: never an
                    # estimate of its prompt as well, L{gomodel.proxy.exchange._note_usage})
        return out

    def began(self):
        """The response object of the stream's first event that carries one (C{response.created}; naming the
        response it follows), its output as far as the stream went (L{PartialStream}), or None: what a stream
        that ends before its final event keeps (L{_final})."""
        if self.started is None and self._partial is not None:
            self.started = self._partial.response()
            self._partial = None
        return self.started

    def _observe(self, event) -> bool:
        ended = super()._observe(event)
        if (ended and self._previous_id is not None and self.response.__class__ is dict
                and self.response.get("previous_response_id") is None):
            self.response["previous_response_id"] = self._previous_id
        return ended


def _final(response, began, left, error=None):
    """What a stored stream's response is kept as: its final C{response}, or, where its stream ended before it
    (C{left}: the client left; false: it broke, or ended with an in-band C{error}; None: it failed before it
    began, nothing kept), the response it began as (C{began()}, or None: nothing kept) L{cut_short}."""
    if response is not None or left is None:
        return response
    started = began()
    return None if started is None else cut_short(started, left, error)


def _streamed(observer, answer: bytes) -> bytes:
    """The events of a stream made of the whole response C{answer} (L{response_events}), as C{observer} relays
    them (it keeps the response from their end, as from a stream's own).

    @raise ValueError: C{answer} is no response.
    """
    return observer.feed(response_events(answer))


def _first_response(events: bytes):
    """The response object of the first of C{events} (whole SSE events) that carries one, or None."""
    for event in SSEFramer().feed(events):
        response = (event_object(event) or {}).get("response")
        if response.__class__ is dict and response.get("id").__class__ is str:
            return response
    return None

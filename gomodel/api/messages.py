"""Anthropic's Messages API: C{POST /v1/messages} and C{/v1/messages/count_tokens}.

Routed by model like every inference route (provider-qualified, virtual or
bare unique ids). A provider that serves Messages itself (vLLM) gets the
request natively: the body as the client sent it but its C{model}, the answer
relayed byte for byte, a stream through L{MessagesStreamObserver} (which only
notes usage and the end), but the thinking text of a request that asks to omit
it (C{thinking.display} C{"omitted"}: vLLM sends it all the same). Any other
provider, and a vLLM whose server answers
that it has no Messages API, gets it translated to chat completions and back
(L{gomodel.anthropic.translate}); the gateway then remembers, per provider
and model, not to ask natively for L{NO_NATIVE_TTL} seconds. A request with
stop sequences, a document, a prefill or a system message's tool changes goes
to a vLLM translated too (L{translates}). Fallbacks are tried among the targets
reached the same way as the first, then among the others
(L{MessagesRoutes._other_way}).

The client's credentials never go upstream: the exchange sends only the
provider's own key (C{Authorization: Bearer}), as on every route; vLLM
refuses C{x-api-key}. C{anthropic-version} and C{anthropic-beta} are passed on
to a native upstream (vLLM ignores them; a server that honours betas gets
them) and dropped when translating.

Managed keys apply as on the chat route: a key's model allowlist (403
C{permission_error}), its tenant's C{cache_salt} for vLLM (natively too:
vLLM's Messages take it); a priority (the key's, or C{X-Request-Priority})
reaches vLLM only through the translation, vLLM's Messages API has no
C{priority} field: a request with one goes translated to a vLLM that
schedules by priority.

C{count_tokens} is exact or refused, never guessed: vLLM's own
C{/v1/messages/count_tokens}, else vLLM's C{/tokenize} with the chat
messages the request becomes; a provider without a tokenizer the gateway can
ask answers 501 (C{x-should-retry: false}).

Errors on these paths are in Anthropic's shape (the front renders the
gateway's own with L{gomodel.http.render.ANTHROPIC}); an upstream's own error
is relayed as it came when it is Anthropic's already, type included, else
converted (an OpenAI envelope, vLLM's with its exception's name as the type:
Anthropic's type for the status, the message kept, no upstream address).
"""

from datetime import datetime, timezone
from functools import partial

from twisted.logger import Logger

from gomodel import errors, jsonutil
from gomodel._twistedcompat import header_name, plain_headers
from gomodel.accounting.tokens import asked_tokens
from gomodel.anthropic.file_sources import walk_blocks
from gomodel.anthropic.files import wants_anthropic_files
from gomodel.anthropic.translate import (ANTHROPIC_ERROR_TYPES, ChatToMessagesStream,
                                         MessagesStreamObserver, chat_to_events_bytes, chat_to_message_bytes,
                                         check_count, check_create, count_tokens_answer, count_tokens_request,
                                         is_anthropic_error, message_events_bytes,
                                         messages_to_chat, native_body, native_message_bytes,
                                         openai_error_to_anthropic, passed_fields, unsent_stops,
                                         vllm_fields, with_tool_errors, without_vllm_fields)
from gomodel.api.inference import plan_model, rebody, retargeted, target, unsaturated, vet_priority
from gomodel.http import render
from gomodel.http.bodies import json_body, query_arg, query_limit, streams
from gomodel.http.headers import CONTENT_TYPE, EVENT_STREAM, ProtocolHeaders
from gomodel.proxy.exchange import ERROR_BODY_LIMIT, fails_over, upstream_call
from gomodel.routing.affinity import affinity_key
from gomodel.translate.call_ids import SHORT_ID_TYPES, fit_call_ids, fit_tool_names, long_names
from gomodel.translate.openai_body import OPENAI_TYPES
from gomodel.upstream.errors import json_of, upstream_error, with_retry_after, without_address

MESSAGES = b"/v1/messages"
COUNT_TOKENS = b"/v1/messages/count_tokens"
MODELS = b"/v1/models"  # the model list, and each model below it: Anthropic's shape for an Anthropic client
FILES = b"/v1/files"  # the Files API, and each file below it: Anthropic's for an Anthropic client
_BELOW_MESSAGES, _BELOW_MODELS, _BELOW_FILES = MESSAGES + b"/", MODELS + b"/", FILES + b"/"
# Provider types whose servers answer /v1/messages themselves.
NATIVE_TYPES = frozenset(("vllm",))
# Provider types whose chat completions take vLLM's fields (translate.vllm_fields: top_k, prefill; and
# chat_template_kwargs, past thinking: those translate.without_vllm_fields leaves out for the others, but the
# client's own top_k and chat_template_kwargs, translate.passed_fields, as the chat route passes them on).
VLLM_CHAT_TYPES = frozenset(("vllm",))
# Provider types, besides vLLM, whose chat completions take any reasoning_effort and ignore it for a model that does
# not reason: Messages' output_config.effort and thinking disabled ("none") go to them as that (others refuse it).
REASONING_EFFORT_TYPES = frozenset(("openrouter",))
# Provider types whose chat completions bound the reasoning by reasoning.max_tokens (OpenRouter's, which it passes to
# Anthropic's models as their budget): thinking's budget_tokens goes to them as that, and without the effort (one or
# the other, OpenRouter's documentation says).
REASONING_BUDGET_TYPES = frozenset(("openrouter",))
# Provider types, besides vLLM, whose chat completions take past turns' thinking back (an assistant message's
# reasoning_content): DeepSeek's thinking mode refuses a conversation without it ("must be passed back").
REASONING_BACK_TYPES = frozenset(("deepseek",))
# Provider types whose chat completions bound the answer by max_completion_tokens: OpenAI's reasoning models
# (o-series, GPT-5) refuse max_tokens, and every OpenAI chat model takes max_completion_tokens.
MAX_COMPLETION_TYPES = frozenset(("openai",))
# How long a provider's model that answered "no Messages API here" is translated without asking again.
NO_NATIVE_TTL = 600.0
# Client headers passed on to a native Messages upstream (never a credential).
FORWARDED_HEADERS = (header_name("anthropic-version"), header_name("anthropic-beta"))
# What a server without the Messages API answers: no such route, or vLLM's "does not support".
_NO_ROUTE_STATUSES = (404, 405, 501)
_MAYBE_UNSUPPORTED = (400, 404, 405, 501)


def no_messages_api(status, answer):
    """What an answer C{answer} (bytes) with C{status} to a native Messages request says of the server: True,
    it has no Messages API (vLLM's "does not support Messages API"); False, no such route (FastAPI's bare
    404/405, a 501); None, neither (the upstream's own answer). One answered as an event stream is read as its
    first event's data (L{json_of}), as the client's error is."""
    if status not in _MAYBE_UNSUPPORTED:
        return None
    parsed = json_of(answer)[1]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if isinstance(message, str) and "support" in message.lower() and "messages api" in message.lower():
        return True  # (not any 400 about "messages": a chat template's refusal is the client's)
    if status in _NO_ROUTE_STATUSES and not (isinstance(parsed, dict) and parsed.get("type") == "error"):
        return False
    return None


class _NoNative(Exception):
    """The upstream has no Messages API (for this model), or (C{api} False) no such route: for
    C{count_tokens}, which a server with C{/v1/messages} may lack, only that route is missing."""

    def __init__(self, api: bool):
        super().__init__()
        self.api = api


class MessagesRoutes:
    """The two POST handlers C{(request, ctx)}; each returns the body to write, or None once it was written."""

    log = Logger()

    def __init__(self, registry, exchange, clock, salts=None, gate=None, files=None, keepalive=0.0):
        """
        @param salts: the L{gomodel.auth.tenancy.CacheSalts} (a managed key's C{cache_salt} for vLLM), or None.
        @param gate: the L{gomodel.limits.gate.Gate} (a target at its limit is routed around), or None.
        @param files: the L{gomodel.anthropic.file_sources.FileSources} (a block naming an uploaded file gets
            its contents), or None (such a block is refused where it cannot be sent).
        @param keepalive: seconds of upstream silence after which a stream sends its client a C{ping}
            (C{GOMODEL_MESSAGES_KEEPALIVE_SECONDS}); 0: none.
        """
        self._keepalive = keepalive
        self._registry = registry
        self._exchange = exchange
        self._clock = clock
        self._salts = salts
        self._gate = gate
        self._files = files
        self._no_native = {}  # (provider name, upstream model, path) -> time until which we translate

    def routes(self) -> dict:
        """Exact request path -> coroutine function of the request and its context (POST only)."""
        return {MESSAGES: self.create, COUNT_TOKENS: self.count_tokens}

    def dialects(self) -> dict:
        """Exact request path -> the error dialect of its answers (Anthropic's, even for a 401 or 413)."""
        return {path: render.ANTHROPIC for path in self.routes()}

    @staticmethod
    def dialect_below(request):
        """The error dialect of a request to none of L{routes}' paths, or None (OpenAI's).

        Anthropic's for every other path under C{/v1/messages/} (Message Batches, L{gomodel.anthropic.batches};
        a path the gateway does not serve is its 404 C{not_found_error}, a 401 its C{authentication_error});
        and on the model list's and the Files API's paths for an Anthropic client (L{wants_anthropic},
        L{wants_anthropic_files}), as their handlers answer it, so that what
        fails before a handler does (a 401, a path that is no UTF-8 once percent-decoded) has its shape too.
        """
        path = request.path
        if path.startswith(_BELOW_MESSAGES):
            return render.ANTHROPIC
        if (path == MODELS or path.startswith(_BELOW_MODELS)) and wants_anthropic(request):
            return render.ANTHROPIC
        if (path == FILES or path.startswith(_BELOW_FILES)) and wants_anthropic_files(request):
            return render.ANTHROPIC
        return None

    # -- the routes ------------------------------------------------------------------

    async def create(self, request, ctx):
        """A Messages create (streamed or not), relayed natively or through chat completions.

        @return: see L{gomodel.proxy.exchange.Exchange.relay}.
        @raise gomodel.errors.GatewayError: before anything was sent to the client.
        """
        body = json_body(request)
        # (one walk of a long conversation's blocks for all three: walk_blocks)
        files, walked, errored = walk_blocks(body, files=self._files is not None)
        if files:  # (blocks naming an uploaded file get its contents)
            await self._files.resolve(files, ctx.principal)
        stream = ctx.asked_stream = streams(body)
        model = body.get("model")
        routes = self._unsaturated(plan_model(self._registry, body, lambda: affinity_key(request, body),
                                              ctx.principal))
        # (natively too, the model's errors first: Anthropic's words for max_tokens, not vLLM's; vLLM's Messages API
        # takes no messages, samples with what it is sent, drops server tools and metadata unread, refuses a tool
        # choice in its own words; thinking.display "omitted": its blocks without their text, either way)
        omit = check_create(body, walked)
        # A priority (the key's, X-Request-Priority) reaches a vLLM that schedules by it only translated: vLLM's
        # Messages API has no priority field (its own translation to chat drops it).
        prioritised = vet_priority(request, ctx, routes)
        # (whether it must go translated matters only where a target could take it natively: L{native_for})
        translating = translates(body, walked)
        while True:
            first, fallbacks, native = self._targets(routes, prioritised=prioritised, translating=translating)
            upstream = first.provider
            ctx.route(upstream, model, first.upstream_model)
            # The session or prompt prefix matters only where there is a replica to choose by load.
            affinity = affinity_key(request, body) if upstream.keeps_sessions else None
            try:
                if native:
                    observer = MessagesStreamObserver(lambda message: self._without_address(ctx, message),
                                                      omit_thinking=omit, keepalive=self._keepalive) if stream else None
                    whole = message_events_bytes if stream else native_message_bytes
                    # (vLLM drops a tool_result's is_error, said in its text as translated; reads only
                    # output_config.format)
                    sent = native_body(body, errored)
                    return await self._native(request, ctx, upstream, "/messages", sent, fallbacks, affinity,
                                              _forwarded(request), observer,
                                              partial(whole, omit_thinking=True) if omit else whole)
                return await self._translated(request, ctx, upstream, body, fallbacks, affinity, omit)
            except _NoNative:
                self._remember(ctx, MESSAGES)
            except errors.GatewayError as failed:
                routes = self._other_way(ctx, routes, first, fallbacks, native, failed)

    async def count_tokens(self, request, ctx):
        """The input tokens of a Messages request, C{{"input_tokens": N}}, as the provider's tokenizer counts them
        (for a virtual model: the first of its targets in the routing order whose provider has one).

        @raise gomodel.errors.InvalidRequest: a create would be refused for a field they share (L{check_count}), or it
            is no C{count_tokens} request.
        @raise gomodel.errors.NotSupported: no provider of the model has a tokenizer the gateway can ask (and the
            request is one: else its L{gomodel.errors.InvalidRequest}).
        """
        body = json_body(request)
        files, walked, errored = walk_blocks(body, files=self._files is not None)
        if files:  # (blocks naming an uploaded file get its contents)
            await self._files.resolve(files, ctx.principal)
        model = body.get("model")
        planned = plan_model(self._registry, body, principal=ctx.principal)
        # (as a create, in its order: natively, vLLM would count a server side it drops unread, refuse a tool choice
        # in its words; /tokenize reads neither)
        check_count(body, walked)
        # Only vLLM has a tokenizer the gateway can ask.
        routes = self._unsaturated([route for route in planned if route.provider.type in NATIVE_TYPES])
        if not routes:
            ctx.route(planned[0].provider, model, planned[0].upstream_model)
            count_tokens_request(body)  # (a request that is none is told so first, as Anthropic answers it)
            raise errors.NotSupported(
                f"count_tokens is not available for '{model}': its provider '{planned[0].provider.name}' "
                f"({planned[0].provider.type}) has no tokenizer the gateway can ask, and the gateway does not guess.")
        translating = walked  # (stop sequences count the same either way)
        while True:
            first, fallbacks, native = self._targets(routes, counting=True, translating=translating)
            upstream = first.provider
            ctx.route(upstream, model, first.upstream_model)
            try:
                if not native:
                    return await self._tokenize(request, ctx, upstream, body, fallbacks)
                return await self._native(request, ctx, upstream, "/messages/count_tokens",
                                          with_tool_errors(body, errored) if errored else body, fallbacks,
                                          None, _forwarded(request), None)
            except _NoNative as e:
                self._remember(ctx, MESSAGES if e.api else COUNT_TOKENS)
            except errors.GatewayError as failed:
                routes = self._other_way(ctx, routes, first, fallbacks, native, failed)

    # -- the ways upstream -----------------------------------------------------------

    async def _native(self, request, ctx, upstream, path, body, fallbacks, affinity, headers, observer,
                      whole=None):
        """Relay C{body} to the provider's own Messages API (C{path}), only its C{model} rewritten.

        @param whole: what a whole answer is made into: for a stream, its events (an upstream that did not
            stream); else the answer checked (a message without a stop reason is a 502), or None as it came.
        @raise _NoNative: the server answered that it has no Messages API.
        """
        async def vet(response):
            if response.code in _MAYBE_UNSUPPORTED:
                await self._vet(ctx, response)

        body = dict(body, model=ctx.upstream_model)
        # vLLM's Messages take cache_salt (not priority)
        if self._salts is not None and path == "/messages" and self._salts.apply(ctx.principal, upstream, body):
            ctx.transfers_dropped = True
        call = upstream_call(path, jsonutil.dumps(body), observer=observer, transform=whole,
                             vet=vet, model=ctx.upstream_model, affinity=affinity, headers=headers,
                             fallbacks=fallbacks, rebody=rebody(body) if fallbacks else None,
                             limited=path == "/messages", asked=asked_tokens(body, path))  # (a count: no limits)
        try:
            answer = await self._exchange.relay(request, ctx, upstream, call)
        except errors.UpstreamError as e:
            raise anthropic_error(e) from None
        if answer is not None and observer is not None:  # (a stream asked for, made of a whole answer)
            request.responseHeaders.put(CONTENT_TYPE, EVENT_STREAM)
        return answer

    async def _vet(self, ctx, response):
        """Tell "no Messages API here" from the upstream's own 4xx (raised as it came).

        @raise _NoNative: FastAPI's bare 404/405 (no such route), a 501, or vLLM's
            "does not support Messages API".
        @raise gomodel.errors.UpstreamError: any other error answer.
        """
        upstream = self._registry.provider(ctx.provider)  # the one that answered (a fallback, maybe)
        answer = await self._exchange.read(upstream, response, ERROR_BODY_LIMIT)
        missing = no_messages_api(response.code, answer)
        if missing is not None:
            raise _NoNative(missing)
        raise with_retry_after(upstream_error(response.code, answer, upstream.name, upstream.hidden), response)

    async def _translated(self, request, ctx, upstream, body, fallbacks, affinity, omit=False):
        """Send C{body} as a chat completion; the answer (or stream) comes back in Messages' shape (its thinking
        blocks without their text with C{omit}, L{omits_thinking}).

        vLLM's fields (L{vllm_fields}, and those L{without_vllm_fields} leaves out) go to a vLLM upstream
        only; each target gets what its own provider takes (L{chat_for}, L{target}), a fallback's body included.
        """
        chat = messages_to_chat(body)
        extras, passed = vllm_fields(body, chat["messages"]), passed_fields(body)
        names = long_names(chat)  # (an OpenAI target is sent them short: L{chat_for})
        stops = unsent_stops(body)  # (an OpenAI target is sent four: the answer is watched for the others)
        stream = body.get("stream") is True
        if stream:
            chat["stream"] = True
            options = chat.get("stream_options")
            chat["stream_options"] = dict(options if isinstance(options, dict) else {}, include_usage=True)

        def made(provider):
            return chat_for(provider, chat, extras, passed)

        sent = made(upstream)
        sent["model"] = ctx.upstream_model
        target(request, ctx, self._salts, upstream, sent)
        # An upstream that ignores "stream" still gives the client Anthropic's shape: events made from
        # a whole answer to a stream; a stream nobody asked for is gathered into one chat completion
        # (L{gomodel.proxy.gather}), then made a message.
        whole = chat_to_events_bytes if stream else chat_to_message_bytes
        observer = ChatToMessagesStream(lambda: ctx.upstream_model,  # (the target that answers)
                                        hide=lambda message: self._without_address(ctx, message),
                                        omit_thinking=omit, keepalive=self._keepalive,
                                        names=names, stops=stops) if stream else None
        call = upstream_call("/chat/completions", jsonutil.dumps(sent), model=ctx.upstream_model, observer=observer,
                             transform=lambda answer: whole(answer, ctx.upstream_model, omit, names, stops),
                             affinity=affinity,
                             fallbacks=fallbacks,
                             rebody=retargeted(request, ctx, self._salts, made) if fallbacks else None,
                             asked=asked_tokens(sent, "/chat/completions"))
        try:
            answer = await self._exchange.relay(request, ctx, upstream, call)
        except errors.UpstreamError as e:
            raise anthropic_error(e) from None
        if stream and answer is not None:
            request.responseHeaders.put(CONTENT_TYPE, EVENT_STREAM)
        return answer

    def _without_address(self, ctx, message):
        """C{message} without the address of the provider that answered C{ctx}."""
        return without_address(message, self._registry.provider(ctx.provider))

    async def _tokenize(self, request, ctx, upstream, body, fallbacks):
        """Count with vLLM's C{/tokenize} (at its root), given the chat messages the request becomes."""
        tokenize = dict(count_tokens_request(body), model=ctx.upstream_model)

        def answer(raw):
            return jsonutil.dumps(count_tokens_answer(jsonutil.loads(raw)))

        call = upstream_call("tokenize", jsonutil.dumps(tokenize), native=True, model=ctx.upstream_model,
                             transform=answer, fallbacks=fallbacks, rebody=rebody(tokenize) if fallbacks else None,
                             limited=False)
        try:
            return await self._exchange.relay(request, ctx, upstream, call)
        except errors.UpstreamError as e:
            raise anthropic_error(e) from None

    # -- native or not ---------------------------------------------------------------

    def _unsaturated(self, routes):
        """C{routes} with the first whose provider and model are under their limits first."""
        if len(routes) > 1 and self._gate is not None:
            first, others = unsaturated(self._gate, routes[0], routes[1:])
            return [first, *others]
        return routes

    def native_for(self, route, counting=False, prioritised=False, translating=False) -> bool:
        """Whether C{route}'s provider is asked natively for its model now (for C{count_tokens} if C{counting};
        never, with C{prioritised}, where it schedules by priority: see L{create}; never with C{translating}, a
        request with stop sequences, a document, a prefill or tool changes, L{translates}); message batches' lines go
        as this says too (L{gomodel.anthropic.batches.MessagesLines})."""
        if route.provider.type not in NATIVE_TYPES or translating or prioritised and route.provider.priority_scheduling:
            return False
        if not self._no_native:  # (the usual: no provider answered that it has no Messages API)
            return True
        key, now = (route.provider.name, route.upstream_model, MESSAGES), self._clock.seconds()
        if self._no_native.get(key, 0) > now:
            return False
        return not counting or self._no_native.get(key[:2] + (COUNT_TOKENS,), 0) <= now

    def _targets(self, routes, counting=False, prioritised=False, translating=False):
        """C{(first, fallbacks, native)}: the first route, those to fall back on that are
        reached the same way (natively, or translated), and which way that is."""
        first, *others = routes
        native = self.native_for(first, counting, prioritised, translating)
        if not others:  # (the usual: one target)
            return first, others, native
        return first, [route for route in others
                       if self.native_for(route, counting, prioritised, translating) == native], native

    def _other_way(self, ctx, routes, first, fallbacks, native, failed):
        """The routes left to try once C{first} and C{fallbacks}, those reached one way (natively, or
        translated), failed with C{failed} (the last at C{ctx}'s provider): those reached the other way (a
        native vLLM that is down falls back to an OpenAI target of the same virtual model, and back).

        @raise failed: it is no failure another target may answer (L{fails_over}), none is left, or the
            request made its C{ROUTING_MAX_ATTEMPTS} sends (every target's together).
        """
        rest = [route for route in routes if route is not first and route not in fallbacks]
        if not rest or not fails_over(failed) or ctx.attempts >= self._exchange.max_attempts:
            raise failed
        way = "natively" if native else "translated"
        self._exchange.failed_over(self._registry.provider(ctx.provider), "target",
                                   f"{failed.code or f'HTTP {failed.status}'}, asked {way}", None, ctx)
        return rest

    def _remember(self, ctx, path):
        """The provider that answered C{ctx} has no native C{path} (L{MESSAGES}: no Messages API at all)
        for its model: translate (or tokenize) for a while."""
        self._translate_for_a_while(ctx.provider, ctx.upstream_model, path)

    def _translate_for_a_while(self, provider, model, path):
        self._no_native[(provider, model, path)] = self._clock.seconds() + NO_NATIVE_TTL
        self.log.info("provider {provider} has no native {path} for {model}; translating for {ttl:.0f}s",
                      provider=provider, path=path.decode(), model=model, ttl=NO_NATIVE_TTL)

    def answered_without_messages(self, provider, model, status, answer) -> bool:
        """Whether C{answer} (its C{status}), what C{provider} answered a native Messages request for C{model}
        with, says it has no Messages API (no such route, or vLLM's "does not support"); if so, C{model} there
        is translated for a while, as when an online request learns it (a message batch's line)."""
        if no_messages_api(status, answer) is None:
            return False
        self._translate_for_a_while(provider, model, MESSAGES)
        return True


def translates(body, walked=None) -> bool:
    """Whether the Messages request C{body} goes to a vLLM translated, never natively: it has stop sequences (its
    chat completion names the sequence that ended the answer; its Messages API before vllm#45807 says C{end_turn}
    and drops it, and a vLLM's version is not known here), a prefill (its last message the assistant's: vLLM's
    Messages API, 0.32, closes it as a finished turn and answers in a new one; translated, its chat completion
    continues it, C{continue_final_message}), a C{document} or
    C{search_result} block (L{gomodel.anthropic.file_sources.TRANSLATED_BLOCKS}), a system message's tool changes
    (vLLM 0.32 resolves them, one without that support refuses them; the translation resolves them as 0.32 does),
    or what Anthropic refuses and vLLM takes, which the translation refuses with Anthropic's 400 before anything is
    sent (an empty message, blank text, tool calls and results that do not pair, an image type none of Anthropic's:
    L{walk_blocks}; vLLM takes them, or drops empty blocks and generates from the rest).
    vLLM's Messages API has no document nor search result block: it refuses one in a message (a 400 that lists the
    block types it knows) and drops one in a tool result unread; translated, a text or custom-content document
    reaches the model as its text and image parts, a search result as its text, and a document that cannot (a PDF)
    is the gateway's 400 saying so.

    @param walked: whether C{body} has a prefill, such a block, tool change or fault, as L{walk_blocks} found; None:
        walk it here.
    """
    if body.get("stop_sequences"):
        return True
    return walk_blocks(body, files=False)[1] if walked is None else walked


def chat_for(provider, chat: dict, extras: dict, passed: dict) -> dict:
    """The translated chat body C{chat} (L{messages_to_chat}'s) as C{provider} takes it: with vLLM's fields
    (C{extras}, L{vllm_fields}) for a vLLM, else without them (L{without_vllm_fields}; past thinking kept for
    the types of L{REASONING_BACK_TYPES}, the effort for those of L{REASONING_EFFORT_TYPES}, C{thinking}'s budget
    as C{reasoning.max_tokens} for those of L{REASONING_BUDGET_TYPES}) but the client's own
    C{top_k} and C{chat_template_kwargs} (C{passed}, L{passed_fields}), which go to every provider but OpenAI
    (L{OPENAI_TYPES}, which refuses them), as on the chat route; its C{max_tokens} as C{max_completion_tokens} for
    the types of L{MAX_COMPLETION_TYPES}; its tool call ids and tool names short for the types of
    L{SHORT_ID_TYPES} (L{fit_call_ids}, L{fit_tool_names}: the answer's calls are named back, L{long_names}), and
    its first C{provider.max_stops} stop sequences where it refuses more (its configured C{max_stop_sequences},
    else its type's: L{gomodel.routing.pool.ReplicaPool}; the answer is watched for the others: L{unsent_stops})."""
    most = provider.max_stops
    if most is not None and len(chat.get("stop") or ()) > most:
        chat = dict(chat, stop=chat["stop"][:most])
    if provider.type in VLLM_CHAT_TYPES:
        return dict(chat, **extras)
    other = without_vllm_fields(chat, reasoning=provider.type in REASONING_BACK_TYPES,
                                effort=provider.type in REASONING_EFFORT_TYPES)
    if passed and provider.type not in OPENAI_TYPES:
        other.update(passed)
    if "thinking_token_budget" in extras and provider.type in REASONING_BUDGET_TYPES:
        other.pop("reasoning_effort", None)
        other["reasoning"] = {"max_tokens": extras["thinking_token_budget"]}
    if provider.type in MAX_COMPLETION_TYPES:
        other["max_completion_tokens"] = other.pop("max_tokens")
    if provider.type in SHORT_ID_TYPES:  # (a vLLM's call ids, 46 characters, are too long for OpenAI)
        fit_call_ids(other)
        fit_tool_names(other)  # (and MCP tools' names past 64 characters)
    return other


def anthropic_error(error: errors.UpstreamError) -> errors.UpstreamError:
    """C{error} with an Anthropic-shaped body: as it came when it is one of Anthropic's types already, else
    converted (vLLM's names its exceptions, C{BadRequestError}: the type then follows the status)."""
    body = error.body()
    try:
        parsed = jsonutil.loads(body)
    except jsonutil.JSONError:
        parsed = None
    if is_anthropic_error(parsed) and parsed["error"].get("type") in ANTHROPIC_ERROR_TYPES:
        return error
    converted = errors.UpstreamError(error.status, openai_error_to_anthropic(error.status, body), error.message)
    converted.headers = dict(error.headers)
    converted.code = error.code  # (the gateway's own, upstream_auth_failed: the logs' and metrics' code)
    return converted


def _forwarded(request):
    """The client's C{anthropic-*} protocol headers for a native upstream (never its key): a L{ProtocolHeaders},
    or None without any."""
    sent = plain_headers(request.requestHeaders)
    headers = None
    for name in FORWARDED_HEADERS:
        values = sent.get(name)
        if values:
            if headers is None:
                headers = ProtocolHeaders()
            headers[name] = values
    return headers


# -- GET /v1/models for Anthropic's clients ----------------------------------------------


def wants_anthropic(request) -> bool:
    """Whether C{request} comes from an Anthropic client (it sends C{anthropic-version})."""
    return request.getHeader(b"anthropic-version") is not None


def anthropic_model(entry: dict) -> dict:
    """One model of the gateway's list (OpenAI's shape) in Anthropic's C{ModelInfo} shape."""
    created = entry.get("created")
    created = created if isinstance(created, int) and not isinstance(created, bool) and created > 0 else 0
    model = {"type": "model", "id": entry["id"], "display_name": entry["id"],
             "created_at": datetime.fromtimestamp(created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "lifecycle": "active"}
    if isinstance(entry.get("max_model_len"), int):
        model["max_input_tokens"] = entry["max_model_len"]
    return model


def anthropic_models_page(request, models: list) -> dict:
    """Anthropic's model list page (C{limit}, C{after_id}, C{before_id} as Anthropic reads them).

    @raise gomodel.errors.InvalidRequest: a bad C{limit}, or a cursor that names no model.
    """
    entries = [anthropic_model(m) for m in models]
    ids = [m["id"] for m in entries]
    limit = query_limit(request, 20, 1000)
    after, before = query_arg(request, b"after_id"), query_arg(request, b"before_id")
    for cursor, name in ((after, "after_id"), (before, "before_id")):
        if cursor is not None and cursor not in ids:
            raise errors.InvalidRequest(f"No model '{errors.shown(cursor)}' to page from.", param=name)
    if before is not None:
        end = ids.index(before)
        page = entries[max(0, end - limit):end]
        more = end - limit > 0
    else:
        start = ids.index(after) + 1 if after is not None else 0
        page = entries[start:start + limit]
        more = start + limit < len(entries)
    return {"data": page, "has_more": more, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}

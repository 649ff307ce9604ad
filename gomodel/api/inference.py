"""The inference routes: chat, completions, embeddings, Responses, rerank, score, classify, audio.

These are the gateway's hot path, so the front resource dispatches them by
exact path without Klein (whose per-request routing cost about a third of
the gateway's CPU per relayed request in the overhead benchmark). Each one
reads the body, resolves the model, builds an L{UpstreamCall} and hands it
to the exchange.
"""

from functools import partial

from gomodel import jsonutil
from gomodel.accounting.tokens import (asked_tokens, completion_sequences, completion_tokens, sequence_count,
                                      without_max_tokens)
from gomodel.api.uploads import Form
from gomodel.errors import AmbiguousModel, InvalidRequest, ModelAccessDenied, ModelNotFound, NotSupported, shown
from gomodel.http.bodies import json_body, stream_options, streams, whole_number
from gomodel.http.headers import CONTENT_TYPE, EVENT_STREAM, X_REQUEST_PRIORITY, request_header
from gomodel.proxy.exchange import UsageTap, upstream_call
from gomodel.proxy.sse import ChatStreamObserver, ChoicesStreamObserver
from gomodel.routing.affinity import affinity_key
from gomodel.routing.registry import ready_first
from gomodel.routing.selectors import public_id
from gomodel.translate.openai_body import OPENAI_TYPES, for_openai
from gomodel.upstream.errors import without_address

# vLLM's pooling routes at its server root, beside their /v1 forms (a pooling model serves those its task has); its
# Cohere /v2/embed too, routed as they are (L{InferenceRoutes.cohere_embed}).
ROOT_POOLING = ("rerank", "v2/rerank", "score", "classify", "pooling")

PRIORITY_MIN, PRIORITY_MAX = -2**31, 2**31 - 1  # X-Request-Priority's range: a managed key's priority's
DEFAULT_PRIORITY = 0  # vLLM's (lower is sooner): a managed key given no priority runs at it or later


class InferenceRoutes:
    """Model-routed POST handlers C{(request, ctx)}; each returns the body to write, or None once it was written."""

    def __init__(self, registry, exchange, responses, salts=None, gate=None):
        """
        @param salts: the L{gomodel.auth.tenancy.CacheSalts}, or None.
        @param gate: the L{gomodel.limits.gate.Gate} (a target at its limit is routed around), or None.
        """
        self._registry = registry
        self._exchange = exchange
        self._responses = responses  # a ResponsesRoute
        self._salts = salts
        self._gate = gate

    def routes(self) -> dict:
        """Exact request path -> coroutine function of the request and its context (POST only)."""
        return {
            b"/v1/chat/completions": self.chat_completions,
            b"/v1/completions": self.completions,
            b"/v1/embeddings": self.embeddings,
            b"/v1/responses": self.responses,
            b"/v1/responses/input_tokens": self.responses_input_tokens,
            b"/v1/responses/compact": self.responses_compact,
            b"/v1/rerank": self.rerank,
            b"/v1/score": self.score,
            b"/v1/classify": self.classify,
            b"/v1/audio/transcriptions": self.transcriptions,
            b"/v1/audio/translations": self.translations,
            b"/v1/audio/speech": self.speech,
            # vLLM's own pooling paths at its root (the Cohere SDK's /v2/rerank and /v2/embed among them), routed
            # by model as their /v1 forms are
            **{b"/" + path.encode(): partial(self._model_routed, path=path, native=True) for path in ROOT_POOLING},
            b"/v2/embed": self.cohere_embed,
        }

    # (L{_completions}' coroutine itself, not one awaiting it: each time a request's await is resumed, it passes
    # through every coroutine between it and the front)
    def chat_completions(self, request, ctx):
        return self._completions(request, ctx, "/chat/completions")

    def completions(self, request, ctx):
        return self._completions(request, ctx, "/completions", completion_tokens)

    async def _completions(self, request, ctx, path, asked_of=asked_tokens):
        """Chat or legacy completions: streams get usage forced on upstream, stripped if unasked. C{asked_of} reads
        the output its parsed body asks for at most (C{(fields, path)}: a text completion's prompts and default
        count, L{completion_tokens}; a default, so that chat's call passes nothing more)."""
        body = json_body(request)
        ctx.asked_stream = body.get("stream") is True  # (checked by streams() once routed)
        upstream, fallbacks = self.route(ctx, body, partial(affinity_key, request, body))
        # The session or prompt prefix matters only where there is a replica to choose by load.
        affinity = affinity_key(request, body) if upstream.keeps_sessions else None
        observer = None
        if streams(body):
            strip_usage = False
            options = stream_options(body)
            if options.get("include_usage") is not True:
                # We always want usage; the client gets it only if it asked. (vLLM's per-chunk usage holds
                # only with include_usage: without it, the client asked for none.)
                options["include_usage"] = True
                if "continuous_usage_stats" in options:
                    del options["continuous_usage_stats"]
                strip_usage = True
            body["stream_options"] = options
            hide = partial(answerer_hidden, self._registry, ctx)
            if "n" not in body and path != "/completions":  # (one choice: no n, no text completion's prompt list)
                observer = ChatStreamObserver(strip_usage, hide, reasons=True)
            else:
                observer = stream_observer(body, path, strip_usage, hide)
        # (a fallback's body from this one as the request made it, before the first target's own fields)
        again = fallback_bodies(request, ctx, self._salts, body, fallbacks) if fallbacks else None
        self.prioritise(request, ctx, upstream, body)  # (L{target}, inline: every request takes this way)
        if self._salts is not None and self._salts.apply(ctx.principal, upstream, body):
            ctx.transfers_dropped = True
        if upstream.type in OPENAI_TYPES:
            for_openai(body)
        if observer is None:
            call = upstream_call(path, jsonutil.dumps(body), model=ctx.upstream_model, affinity=affinity,
                                 fallbacks=fallbacks, rebody=again, asked=asked_of(body, path))
            return await self._exchange.relay(request, ctx, upstream, call)
        # (an upstream that ignores "stream" answers whole: the client still gets the stream's events)
        call = upstream_call(path, jsonutil.dumps(body), observer=observer, transform=observer.whole,
                             model=ctx.upstream_model, affinity=affinity, fallbacks=fallbacks, rebody=again,
                             asked=asked_of(body, path))
        answer = await self._exchange.relay(request, ctx, upstream, call)
        if answer is not None:
            request.responseHeaders.put(CONTENT_TYPE, EVENT_STREAM)
        return answer

    async def embeddings(self, request, ctx):
        return await self._model_routed(request, ctx, "/embeddings")

    async def rerank(self, request, ctx):
        return await self._model_routed(request, ctx, "/rerank")

    async def score(self, request, ctx):
        return await self._model_routed(request, ctx, "/score")

    async def classify(self, request, ctx):
        # vLLM serves classify only at its root, not under /v1.
        return await self._model_routed(request, ctx, "classify", native=True)

    async def cohere_embed(self, request, ctx):
        # (its max_tokens caps each input's tokens, its truncation: no output for the limits to reserve)
        return await self._model_routed(request, ctx, "v2/embed", native=True, counted_of=without_max_tokens)

    async def _model_routed(self, request, ctx, path, native=False, counted_of=None):
        """A JSON POST routed by its C{model}, relayed as the upstream answers (streams included); each target
        gets what its provider takes of the key and headers (L{target}: vLLM's pooling requests take a
        C{cache_salt} and a C{priority}, as its generation does).

        @param counted_of: C{(body sent)} -> what its tokens are estimated from (L{UpstreamCall}'s C{counted}), or
            None (the body itself); or None.
        """
        body = json_body(request)
        upstream, fallbacks = self.route(ctx, body)
        again = fallback_bodies(request, ctx, self._salts, body, fallbacks) if fallbacks else None
        target(request, ctx, self._salts, upstream, body)
        sent = jsonutil.dumps(body)
        call = upstream_call(path, sent, native=native, model=ctx.upstream_model, fallbacks=fallbacks, rebody=again,
                             counted=None if counted_of is None else counted_of(sent))
        return await self._exchange.relay(request, ctx, upstream, call)

    async def transcriptions(self, request, ctx):
        return await self._audio(request, ctx, "/audio/transcriptions")

    async def translations(self, request, ctx):
        return await self._audio(request, ctx, "/audio/translations")

    async def _audio(self, request, ctx, path):
        """An audio request, a multipart form (its C{file}, its C{model}, ...), routed by its C{model} field, the
        form sent on as it came but for that field (the upstream's id); its answer relayed as the upstream sent it:
        JSON, or text (C{response_format} C{text}, C{srt}, C{vtt}) with its own C{Content-Type}. With C{stream=true}
        an event stream: vLLM's has its usage chunk asked for (C{stream_include_usage}) and kept from the client
        unless it asked for it; another provider's (OpenAI's events) is relayed as it comes: each target's own way (a
        virtual model's fallback may be of another type than its first target). Its tokens, where no
        usage says them (the limits' reservation), are estimated from its C{prompt}, not the file. (vLLM's audio
        requests take no C{cache_salt} nor C{priority}.)"""
        request.content.seek(0)
        form = Form(request.getHeader(b"content-type"), request.content.read())
        body = {"model": form.field("model")}
        ctx.asked_stream = stream = _form_true(form.field("stream"))
        upstream, fallbacks = self.route(ctx, body)
        if not form.has("file"):  # (what every provider refuses: refused before it takes a slot, a limit, a record)
            raise InvalidRequest("The form needs a 'file' (the audio recording).", param="file",
                                 code="missing_required_parameter")
        observe = partial(_audio_observer, form, partial(answerer_hidden, self._registry, ctx)) if stream else None
        again = partial(_reformed, form, stream) if fallbacks else None
        # (its tokens estimated from its text prompt: the audio is no text, bytes / 4 of it nothing like its tokens)
        counted = jsonutil.dumps({"prompt": form.field("prompt") or ""})
        call = upstream_call(path, _reformed(form, stream, body["model"], upstream), content_type=form.content_type,
                             observe=observe, model=ctx.upstream_model, fallbacks=fallbacks, rebody=again,
                             counted=counted)
        return await self._exchange.relay(request, ctx, upstream, call)

    async def speech(self, request, ctx):
        """Text to speech (OpenAI's C{/v1/audio/speech}, vLLM-Omni's): a JSON body routed by its C{model}, the
        answer relayed as the upstream sent it: audio (its own C{Content-Type}), or with C{stream_format: "sse"}
        its events (C{speech.audio.delta}s, C{speech.audio.done} with the usage, no [DONE]) as they come. Its
        tokens, where no usage says them, are estimated from its C{input}. (No C{cache_salt} nor C{priority}: no
        vLLM takes them here.)"""
        body = json_body(request)
        ctx.asked_stream = stream = body.get("stream_format") == "sse"
        upstream, fallbacks = self.route(ctx, body)
        observe = _tapped if stream else None
        call = upstream_call("/audio/speech", jsonutil.dumps(body), observe=observe, model=ctx.upstream_model,
                             fallbacks=fallbacks, rebody=rebody(body) if fallbacks else None)
        return await self._exchange.relay(request, ctx, upstream, call)

    async def responses(self, request, ctx):
        return await self._responses.create(request, ctx, json_body(request))

    async def responses_input_tokens(self, request, ctx):
        return await self._responses.input_tokens(request, ctx, json_body(request))

    async def responses_compact(self, request, ctx):
        """OpenAI's C{POST /v1/responses/compact} (C{client.responses.compact}): not the gateway's to answer (it
        keeps no compacted window, and no chat completion makes one), so never sent to a model's provider.

        @raise gomodel.errors.NotSupported: always, naming the passthrough, where a provider that has it answers.
        """
        raise NotSupported("POST /v1/responses/compact is not supported by the gateway: send it to a provider that "
                           "has it (OpenAI) through /p/{provider}/v1/responses/compact.")

    def route(self, ctx, body, affinity_of=None):
        """The upstream for C{body["model"]} (rewritten to the upstream's id, noted in C{ctx}),
        and the routes to fall back on (a virtual model's other targets, failover candidates).

        @param affinity_of: a function giving the request's session key (for virtual models).
        """
        route, *fallbacks = plan_model(self._registry, body, affinity_of, ctx.principal)
        if fallbacks and self._gate is not None:
            route, fallbacks = unsaturated(self._gate, route, fallbacks)
        ctx.route(route.provider, body["model"], route.upstream_model)
        body["model"] = route.upstream_model
        return route.provider, fallbacks

    @staticmethod
    def prioritise(request, ctx, upstream, body):
        """The key's C{priority}, else C{X-Request-Priority}, else the body's own, becomes vLLM's C{priority}
        where the provider schedules by priority (L{key_priority}: a managed key without one is held at
        L{DEFAULT_PRIORITY} or later).

        vLLM honours C{priority} only when started with C{--scheduling-policy
        priority} (the provider's C{priority_scheduling: true}); elsewhere both
        are ignored and a body's own C{priority} passes untouched. A managed key
        with a priority cannot be given another by its client.

        @raise InvalidRequest: see L{header_priority} and L{key_priority}.
        """
        if not upstream.priority_scheduling:
            return
        principal = ctx.principal
        if principal is None or principal.priority is None:
            priority = header_priority(request)
            if priority is not None:
                body["priority"] = priority
        key_priority(principal, body)


def _reformed(form, stream, model, provider) -> bytes:
    """L{UpstreamCall}'s C{rebody} of an audio request's C{form} (a L{Form}) for C{provider} (a pool): it, with
    C{model} set and, for a vLLM's stream, its usage chunk asked for (as on chat: we always want the usage; the
    client gets it only if it asked, L{_audio_observer})."""
    if stream and provider.type == "vllm" and not _form_true(form.field("stream_include_usage")):
        return form.body({"model": model, "stream_include_usage": "true", "stream_continuous_usage_stats": "false"})
    return form.body({"model": model})


def _audio_observer(form, hidden, provider):
    """L{UpstreamCall}'s C{observe} of an audio request's stream (its C{form}, a L{Form}) that C{provider} (a
    pool) answered: vLLM's is chat's (chunks, its usage chunk, [DONE]; the usage chunk kept from a client that
    did not ask for it); another provider's (OpenAI's typed events, its usage in the last, no [DONE]) relayed
    as it comes. C{hidden}: an in-band error's text without the answering provider's address (L{answerer_hidden})."""
    if provider.type == "vllm":
        return ChatStreamObserver(not _form_true(form.field("stream_include_usage")), hidden)
    return _tapped(provider)


def _tapped(provider):
    """L{UpstreamCall}'s C{observe} of an event stream relayed as C{provider} (a pool) sends it (OpenAI's typed
    events: a speech's, a transcription's), its usage read from its last event, an error event without the
    provider's address."""
    return UsageTap(True, None, provider if provider.hidden_pattern is not None else None)


def _form_true(value) -> bool:
    """Whether a form field's text is true as vLLM reads a boolean field (C{true}, C{1}, C{yes}, C{on})."""
    return value is not None and value.strip().lower() in ("true", "1", "yes", "on")


def header_priority(request):
    """The request's C{X-Request-Priority}, an int, or None without one.

    @raise InvalidRequest: it is not an integer in C{PRIORITY_MIN..PRIORITY_MAX}.
    """
    value = request_header(request, X_REQUEST_PRIORITY)
    if value is None:
        return None
    priority = whole_number(value, PRIORITY_MIN, PRIORITY_MAX)
    if priority is None:
        raise InvalidRequest(f"X-Request-Priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}.",
                             param="X-Request-Priority", code="invalid_priority")
    return priority


def key_priority(principal, body):
    """Set on C{body} (a request's, for a provider that schedules by priority) the C{priority} that
    C{principal} allows: a managed key's own; else, for a managed key, the body's own no sooner than
    L{DEFAULT_PRIORITY} (a key the operator gave no priority may lower its requests', never put them ahead of
    the keys given one); the master key's and an open gateway's as the body has it.

    @raise InvalidRequest: a managed key's body has a C{priority} that is no integer (C{invalid_priority}).
    """
    if principal is None or principal.master:
        return
    if principal.priority is not None:
        body["priority"] = principal.priority
        return
    asked = _asked_priority(principal, body)
    if asked is not None and asked < DEFAULT_PRIORITY:
        body["priority"] = DEFAULT_PRIORITY


def _asked_priority(principal, body):
    """The C{priority} of C{body} that C{principal}, a managed key without one of its own, asks for, or None.

    @raise InvalidRequest: it is no integer (C{invalid_priority}).
    """
    asked = body.get("priority")
    if asked is not None and asked.__class__ is not int:  # (vLLM reads "-5" as -5)
        raise InvalidRequest("'priority' must be an integer.", param="priority", code="invalid_priority")
    return asked


def vet_priority(request, ctx, routes, body=None) -> bool:
    """Refuse now a malformed C{X-Request-Priority}, or a managed key's malformed C{priority} in C{body} (the
    request's, or None), that one of C{routes} (L{gomodel.routing.registry.Route}s, fallbacks among them) would
    take: whether the request is refused must not depend on which target answers (a fallback is reached only
    when those before it fail).

    @return: whether one of C{routes} schedules by priority and the request has one (its key's, or the header's).
    @raise InvalidRequest: see L{header_priority} and L{key_priority}.
    """
    for route in routes:
        if route.provider.priority_scheduling:
            principal = ctx.principal
            if principal is not None and principal.priority is not None:
                return True
            if header_priority(request) is not None:
                return True  # (it wins over the body's: L{InferenceRoutes.prioritise})
            if body is not None and principal is not None and not principal.master:
                _asked_priority(principal, body)
            return False
    return False


def unsaturated(gate, route, fallbacks):
    """The first of C{route} and C{fallbacks} whose provider and model are under their limits (else
    C{route}), and the others in order."""
    for candidate in (route, *fallbacks):
        if not gate.saturated(candidate.provider, candidate.upstream_model):
            if candidate is route:
                break
            return candidate, [r for r in (route, *fallbacks) if r is not candidate]
    return route, fallbacks


def rebody(body):
    """The body for another target: the same but its C{model} (L{UpstreamCall}'s C{rebody})."""
    return lambda model, provider=None: jsonutil.dumps(dict(body, model=model))


def target(request, ctx, salts, upstream, body):
    """Set on C{body} what C{upstream}'s provider takes of the request's key and headers: C{priority} where it
    schedules by it (L{InferenceRoutes.prioritise}), a managed key's C{cache_salt} for vLLM (C{salts}, a
    L{gomodel.auth.tenancy.CacheSalts}, or None); for an OpenAI provider, its conversation's tool call ids as short
    as it takes them and no vLLM-only field (L{for_openai}).

    @raise InvalidRequest: C{X-Request-Priority} is not a priority (looked at only where it is taken).
    """
    InferenceRoutes.prioritise(request, ctx, upstream, body)
    if salts is not None and salts.apply(ctx.principal, upstream, body):
        ctx.transfers_dropped = True  # (its answer goes without them: L{gomodel.proxy.transfers})
    if upstream.type in OPENAI_TYPES:
        for_openai(body)


def copies(body):
    """C{(provider)} -> a new copy of C{body} as it is now (L{retargeted}'s C{made}, for any provider)."""
    made = dict(body)
    return lambda provider: dict(made)


def retargeted(request, ctx, salts, made):
    """L{UpstreamCall}'s C{rebody} for a body whose fields depend on the provider: C{made(provider)}, a fresh
    copy of the body as the client's request made it (before any target's own fields), with the target's
    C{model} and what its provider takes (L{target}); never the first target's C{priority} or C{cache_salt}.

    @param made: C{(provider)} -> a new dict: the body for a target of that provider, its model not yet set.
    """
    def body_for(model, provider):
        body = made(provider)
        body["model"] = model
        target(request, ctx, salts, provider, body)
        return jsonutil.dumps(body)
    return body_for


def fallback_bodies(request, ctx, salts, body, fallbacks):
    """L{UpstreamCall}'s C{rebody} for C{fallbacks} (L{retargeted}), each made from C{body} as it is now (before
    the first target's own fields); a malformed C{X-Request-Priority} (or a managed key's body C{priority}) one
    of them would take is refused now (L{vet_priority}).

    @raise InvalidRequest: see L{vet_priority}.
    """
    vet_priority(request, ctx, fallbacks, body)
    return retargeted(request, ctx, salts, copies(body))


def stream_observer(body, path, strip_usage, hide):
    """The observer of a chat or text completion stream that may have more than one choice (C{body}'s C{n}, each of
    a text completion's prompts): L{ChoicesStreamObserver}, which holds every choice to its C{finish_reason}, where
    it has; else L{ChatStreamObserver}'s of one."""
    choices = completion_sequences(body) if path == "/completions" else sequence_count(body.get("n", 1))
    if choices == 1:
        return ChatStreamObserver(strip_usage, hide, reasons=True)
    return ChoicesStreamObserver(strip_usage, hide, choices)


def answerer_hidden(registry, ctx, text) -> str:
    """C{text}, an upstream's (a stream's in-band error), without the address (and key) of the provider that
    answered C{ctx}'s request: its first target's, or a fallback's."""
    return without_address(text, registry.provider(ctx.provider))


def plan_model(registry, body, affinity_of=None, principal=None):
    """The routes to try for C{body["model"]}, first choice first (see L{gomodel.routing.registry.ModelRegistry.plan}),
    those C{principal} may not use (by the name sent, the qualified id or the id at the provider, as
    C{/v1/models} lists them) left out; a first choice that is passed over put after the others that are not
    (L{gomodel.routing.registry.ready_first}: a failover rule's model out of quota, say).

    @raise InvalidRequest: no model named (or not a string); a C{provider} hint that names no provider
        (L{requested}).
    @raise gomodel.errors.ModelNotFound: nobody serves it.
    @raise AmbiguousModel: several providers the key may use serve the bare id.
    @raise ModelAccessDenied: the key may not use it.
    """
    name = requested(registry, body)
    try:
        routes = registry.plan(name, affinity_of)
    except AmbiguousModel as ambiguous:
        # the one provider the key may use, then the bare id's failover candidates
        first = unambiguous(registry, ambiguous, principal)
        routes = [first]
        for route in registry.failover(name):
            if route != first:
                routes.append(route)
    else:
        if principal is None or principal.models is None:
            return routes if len(routes) == 1 else ready_first(routes)
        if principal.sent_at.get(name) is routes[0].provider or _as_sent(principal, name, routes[0]):
            if len(routes) == 1:
                return routes
            # The name admits its own targets (a virtual model's every one); a failover candidate only where the
            # key may use it: a rule is no way out to a model (a provider) the key may not use.
            own = registry.targets(name)
            kept = []
            for route in routes:  # (a loop: a comprehension would make principal a closure cell on every call)
                if route in own or may_route(principal, route):
                    kept.append(route)
            return kept if len(kept) == 1 else ready_first(kept)
        first = _allowed_target(registry, name, principal)
    allowed = []
    for route in routes:  # (a loop: a comprehension would make principal a closure cell on every call)
        if may_route(principal, route):
            allowed.append(route)
    if first not in allowed:  # (a provider type's model at another instance of that type)
        allowed.insert(0, first)
    return allowed if len(allowed) == 1 else ready_first(allowed)


def resolve_model(registry, body, principal=None):
    """The L{gomodel.routing.registry.Route} for C{body["model"]}.

    @raise InvalidRequest: no model named (or not a string); a C{provider} hint that names no provider
        (L{requested}).
    @raise gomodel.errors.ModelNotFound: nobody serves it.
    @raise AmbiguousModel: several providers the key may use serve the bare id.
    @raise ModelAccessDenied: the key may not use it.
    """
    name = requested(registry, body)
    try:
        route = registry.resolve(name)
    except AmbiguousModel as ambiguous:
        return unambiguous(registry, ambiguous, principal)
    if (principal is None or principal.models is None or may_route(principal, route)
            or _as_sent(principal, name, route)):
        return route
    return _allowed_target(registry, name, principal)


def unambiguous(registry, ambiguous, principal):
    """The route for a bare id several providers serve (C{ambiguous}, the L{AmbiguousModel} raised) when
    C{principal} may use only one of them: a key is never told of providers it may not use.

    @raise AmbiguousModel: C{ambiguous} for the master key; else, naming only those the key may use, when
        that is several.
    @raise ModelAccessDenied: the key may use none of them.
    """
    if principal is None or principal.models is None:
        raise ambiguous
    usable = [route for route in registry.serving(ambiguous.model)
              if may_route(principal, route)]
    if len(usable) == 1:
        return usable[0]
    if usable:
        raise AmbiguousModel(ambiguous.model, [qualified(route) for route in usable]) from None
    raise ModelAccessDenied(ambiguous.model) from None


def admitted(registry, name, principal) -> bool:
    """Whether L{plan_model} would admit C{principal} to C{name}: by the name itself, or to one of the routes
    it names (L{_allowed_target}). What C{/v1/models} lists to a key and shows it (never on a request's way).

    @raise AmbiguousModel: several providers serve the bare id (as L{plan_model} would).
    """
    if principal is None or principal.models is None or principal.names(name):
        return True
    try:
        if any(_as_sent(principal, name, route) for route in registry.targets(name)):
            return True
        _allowed_target(registry, name, principal)
    except (ModelNotFound, ModelAccessDenied):
        return False
    return True


def shown_targets(registry, name, targets, principal):
    """Which of virtual model C{name}'s C{targets} (selectors) C{principal} is shown (C{/v1/models}): those whose
    route it may use (L{plan_model} takes no other for it); None for all of them (the master key, a key
    unrestricted, or one that may use the virtual model by its name: every target is then its way)."""
    if principal is None or principal.models is None or principal.names(name):
        return None
    shown = set()
    for target in targets:
        try:
            route = registry.resolve(target)
        except (ModelNotFound, InvalidRequest):
            continue
        if _as_sent(principal, name, route):
            return None
        if may_route(principal, route):
            shown.add(target)
    return shown


def _as_sent(principal, name, route) -> bool:
    """Whether C{principal}'s selectors admit C{name} as the request sent it, routed to C{route}: by name, or
    by a provider selector where C{name} begins with C{route}'s provider (its instance's or its type's name);
    never by one that matches inside a bare id (C{meta-llama/} is a provider C{meta-llama}, not the
    C{meta-llama/X} that provider C{vllm} serves: see L{gomodel.auth.keys.Principal.names}). Once admitted, kept in
    its L{Principal.sent_at<gomodel.auth.keys.Principal>} (a key's every request names the same model)."""
    provider = route.provider
    if not (principal.allows(name) if name.startswith(provider.named_by) else principal.names(name)):
        return False
    if len(principal.sent_at) > 1000:
        principal.sent_at.clear()
    principal.sent_at[name] = provider
    return True


def held(registry, route, previous, principal):
    """C{route} at the provider instance that made C{previous} (a stored response's record: vLLM keeps a
    response in the memory of the process that made it), when that is of C{route}'s provider's type and
    C{principal} (None: an open path's) may use it there; else C{route} itself."""
    instance = registry.provider(previous["provider"])
    if instance is None or instance is route.provider or instance.type != route.provider.type:
        return route
    there = route._replace(provider=instance)
    if principal is None or principal.models is None or may_route(principal, there):
        return there
    return route


def may_route(principal, route) -> bool:
    """Whether C{principal}'s selectors admit C{route}: by its qualified id, or by its model's id at its
    provider; a model listed by a path, by its public id (as C{/v1/models} lists it: L{public_id}) too."""
    model = route.upstream_model
    if principal.allows(f"{route.provider.name}/{model}") or principal.names(model):
        return True
    public = public_id(model)
    return public != model and (principal.allows(f"{route.provider.name}/{public}") or principal.names(public))


def _allowed_target(registry, name, principal):
    """A route C{name} itself names that C{principal} may use: a virtual model's draw may have picked a
    target the key may not use while others remain; a failover candidate is no way in.

    @raise ModelAccessDenied: there is none.
    """
    for route in registry.targets(name):
        if may_route(principal, route):
            return route
    raise ModelAccessDenied(name)


def qualified(route) -> str:
    """C{provider/model} of a route, its model by its public id (L{public_id})."""
    return f"{route.provider.name}/{public_id(route.upstream_model)}"


_EXAMPLE_MODEL = "'vllm/meta-llama/Llama-3.1-8B-Instruct'"
# JSON's name for what a 'model' that is not a string is
_JSON_TYPES = ((bool, "a boolean"), ((int, float), "a number"), (list, "an array"), (dict, "an object"))


def requested(registry, body) -> str:
    """The selector C{body} asks for: its C{model}; with a C{provider} (GoModel's routing hint: an instance's
    name or a provider type; taken off C{body}, never sent upstream) the model at that provider, C{provider/model}
    (a C{model} already qualified with it kept as it is; one qualified with another provider is an id at this
    one: the hint wins), which becomes C{body["model"]} (the name the request is recorded under). A C{null} or
    blank C{provider} is no hint.

    @raise InvalidRequest: no model named (or not a string); a C{provider} that is not a string
        (C{invalid_type}) or names no configured provider (C{invalid_value}).
    """
    name = _model_of(body)
    if "provider" not in body:
        return name
    hint = body.pop("provider")
    if hint is None:
        return name
    if not isinstance(hint, str):
        raise InvalidRequest("'provider' must be a string: a configured provider's name or type.",
                             param="provider", code="invalid_type")
    hint = hint.strip()
    if not hint:
        return name
    if registry.provider(hint) is None:
        raise InvalidRequest(f"The provider '{shown(hint)}' is not configured: 'provider' must name a configured "
                             "provider (its name or type). GET /v1/models lists the models of each.",
                             param="provider", code="invalid_value")
    selector = body["model"] = hinted(name, hint)
    return selector


def hinted(model, hint) -> str:
    """C{model} at provider C{hint} (a stripped, non-blank C{provider}): C{hint/model}, unless C{model} already
    begins so (L{requested})."""
    return model if model.startswith(hint + "/") else f"{hint}/{model}"


def _model_of(body) -> str:
    model = body.get("model")
    if isinstance(model, str) and model.strip():
        return model
    if model is not None and not isinstance(model, str):
        shown = next(name for kind, name in _JSON_TYPES if isinstance(model, kind))
        raise InvalidRequest(f"'model' must be a string (e.g. {_EXAMPLE_MODEL}), not {shown}.",
                             param="model", code="invalid_type")
    raise InvalidRequest(f"The request needs a 'model' (e.g. {_EXAMPLE_MODEL}).",
                         param="model", code="missing_required_parameter")

"""C{/p/{provider}/{endpoint}}: provider-native requests relayed raw, to the named instance.

The provider segment is an instance name (C{/p/vllm-test/tokenize} reaches
vllm-test) or a type (C{/p/vllm/...}: the first instance of that type). Bodies,
queries, statuses and headers pass as they are (minus hop-by-hop headers and
client credentials; the provider's own key is applied), streamed with
backpressure. vLLM's operational routes are refused unless allowed in config.
A managed key's JSON body to a vLLM's model-routed route gets what it gets on
C{/v1}: its tenant's C{cache_salt} and its C{priority}.
"""

import re
from functools import partial
from urllib.parse import quote, unquote, unquote_to_bytes, urljoin, urlsplit, urlunsplit

from gomodel import errors, jsonutil
from gomodel._twistedcompat import header_name, plain_headers
from gomodel.accounting.tokens import without_max_tokens
from gomodel.api.inference import key_priority
from gomodel.api.uploads import Form
from gomodel.auth.keys import presented_key
from gomodel.auth.tenancy import SALTED_PROVIDER_TYPES, visible
from gomodel.http import render
from gomodel.http.bodies import not_json, whole_number
from gomodel.http.context import PASSTHROUGH
from gomodel.http.headers import HOP_BY_HOP, REQUEST_ID, X_REQUEST_ID, X_UPSTREAM_REQUEST_ID, connection_tokens
from gomodel.ids import held_nowhere
from gomodel.proxy.exchange import DONE_END, MESSAGES_END, RESPONSES_END, answer_shown, response_shown, upstream_call
from gomodel.responses_history import continued, no_chosen_id, unknown_previous, unknown_response

PASSTHROUGH_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

# vLLM routes that change or stop the server for everyone: not for API clients of a shared gateway (vLLM 0.32's
# development, sleep, RL weight-update, fault-tolerance and elastic routes; C{abort_requests} without ids aborts every
# request in flight, every tenant's).
ADMIN_ROUTES = frozenset((
    "scale_elastic_ep", "is_scaling_elastic_ep", "collective_rpc", "sleep", "wake_up", "is_sleeping",
    "release_kv_cache_memory", "reset_prefix_cache", "reset_mm_cache", "reset_encoder_cache", "start_profile",
    "stop_profile", "load_lora_adapter", "unload_lora_adapter", "pause", "resume", "is_paused", "update_weights",
    "init_weight_update_communicator", "init_weight_transfer_engine", "shutdown_weight_transfer_engine",
    "start_weight_update", "start_draft_weight_update", "finish_weight_update", "update_weight_version",
    "weight_checker", "abort_requests", "inference/v1/abort_requests", "fault_tolerance/apply",
))

# vLLM routes about the whole server (every tenant's load, in its metrics and its load count; its engine's layout,
# health and KV event publishers' addresses): the master key's alone.
OPERATOR_ROUTES = frozenset(("metrics", "load", "server_info", "weight_info", "get_world_size", "fault_tolerance",
                             "kv_event_sources"))

# An OpenAI-compatible provider's routes to what its account stores (the gateway's account: every tenant's who went
# through it), and Anthropic's message batches: the master key's alone (the gateway cannot tell whose each is). Its
# stored chat completions too: C{chat/completions} but for creating one (and vLLM's C{CHAT_ROUTES}), its fine-tuned
# models (C{models} but for reading them: OpenAI's C{DELETE} deletes one); and what mints a
# key to the account (C{realtime/client_secrets}, C{realtime/sessions}, ...: C{realtime/} and below; vLLM's own
# C{realtime} is a WebSocket, which the passthrough does not carry). OpenRouter's account too: its C{credits}, its key's
# spend and limits (C{key}), every generation's cost and model (C{generation}), C{activity}, C{keys}.
ACCOUNT_ROUTES = frozenset(("files", "batches", "uploads", "vector_stores", "conversations", "fine_tuning",
                            "assistants", "threads", "containers", "evals", "organization", "chatkit", "skills",
                            "videos", "credits", "key", "keys", "generation", "activity"))
CHAT_ROUTES = frozenset(("render", "derender", "batch"))
# C{responses/...} routes that name no response: vLLM's C{render}, OpenAI's C{input_tokens} and C{compact}.
RESPONSES_ROUTES = frozenset(("render", "input_tokens", "compact"))

# The other routes of vLLM 0.32 (C{v1/} taken off): its clients' own, neither operational nor the whole server's, and
# not taking a C{cache_salt} (a test reads a real vLLM's routes and finds each in one of these sets); a managed key
# reaches C{responses/{response_id}} only for a response the gateway holds for its tenant (L{Passthrough._owned}).
CLIENT_ROUTES = frozenset((
    "health", "ping", "version", "models", "tokenize", "detokenize", "tokenizer_info", "messages/count_tokens",
    "responses/{response_id}", "responses/{response_id}/cancel", "chat/completions/render", "completions/render",
    "messages/render", "responses/render", "chat/completions/derender", "completions/derender",
    "audio/transcriptions", "audio/translations", "realtime",
))

# The field of a Responses body continuing a stored response (looked for before a body is read as JSON).
_B_PREVIOUS = b'"previous_response_id"'
# The field of a Responses create naming the id of the response it makes (L{no_chosen_id}; looked for so too).
_B_REQUEST_ID = b'"request_id"'
# A JSON escape (C{\u0072equest_id} is C{request_id} to any JSON parser): a body holding one is read whole.
_B_ESCAPE = b"\\u"

# Request headers that never go upstream: credentials, framing, proxy bookkeeping.
# (the gateway's own headers stay here; OpenAI-Organization and OpenAI-Project pick within the provider key's
# account: the gateway's, not a client's; the gateway asks vLLM for its load report itself, and keeps it; a
# browser's Origin would have vLLM answer its own CORS policy, allow-origin * by default, which no other route has)
# (a client's key in any header is its own: api-key is Azure OpenAI's, x-goog-api-key Google's; the provider's
# key is the gateway's to send; a client's Expect is the gateway's to answer: it holds the body, sent at once)
# (a client's claim of its own address, in any proxy's header (X-Forwarded-*, below, too), which a provider's proxy
# would trust from the gateway)
_NOT_UPSTREAM = HOP_BY_HOP | {b"authorization", b"x-api-key", b"api-key", b"x-goog-api-key", b"cookie", b"host",
                              b"content-length", b"expect", b"x-request-id", b"forwarded", b"x-real-ip",
                              b"true-client-ip", b"accept-encoding",
                              b"x-gomodel-replica", b"x-gomodel-user-path", b"openai-organization",
                              b"openai-project", b"endpoint-load-metrics-format", b"origin"}
# A gateway key at least this long is looked for in every header and query parameter relayed (see _presented).
_SCANNED_KEY = 8
_SAFE_PATH = "/:@!$&'()*+,;=-._~"
# vLLM routes (after C{v1/}) that take a C{cache_salt} and a C{priority}, as their C{/v1} routes send them
# (vLLM's Messages take no priority; C{invocations}, SageMaker's, serves a chat body as chat completions), and
# vLLM 0.32's other model-routed ones that take both: C{chat/completions/batch} (several conversations),
# C{generative_scoring}, C{systemone} (structured decisions), Cohere's C{v2/embed} and, with --enable-scale-out,
# C{inference/v1/generate} (token ids in and out).
KEYED_ROUTES = frozenset(("chat/completions", "completions", "responses", "messages", "embeddings", "pooling",
                          "score", "rerank", "v2/rerank", "classify", "invocations", "chat/completions/batch",
                          "generative_scoring", "systemone", "v2/embed", "inference/v1/generate"))
# vLLM routes that take a C{priority} but no C{cache_salt}: its Cohere chat (VLLM_ENABLE_COHERE_API).
PRIORITY_ROUTES = frozenset(("cohere/v2/chat",))
# Routes that count tokens and generate nothing: they pass no rate limit nor budget, as on C{/v1} (a slot of the
# key's caps on requests in flight only: L{gomodel.limits.gate.Gate.admit}).
COUNTING_ROUTES = frozenset(("tokenize", "detokenize", "messages/count_tokens", "responses/input_tokens"))

# The routes (after C{v1/}) whose event streams have an end of their own, which a stream cut short lacks (one
# whose body ends with its connection is otherwise whole to the client); a Responses stream is also read again
# as C{responses/{id}?stream=true}, and SageMaker's C{invocations} streams a chat or text completion (its other
# answers are JSON). Others' streams end with their body.
STREAM_ENDS = {"chat/completions": DONE_END, "completions": DONE_END, "invocations": DONE_END,
               "messages": MESSAGES_END, "responses": RESPONSES_END}


class Passthrough:
    """Relays C{/p/{provider}/{endpoint}} requests."""

    def __init__(self, settings, registry, exchange, salts=None, responses=None):
        """
        @param settings: the L{gomodel.config.PassthroughConfig}.
        @param salts: the L{gomodel.auth.tenancy.CacheSalts}, or None.
        @param responses: the store's L{gomodel.store.interfaces.IResponseStore} (whose stored response is
            whose), or None.
        """
        self._settings = settings
        self._registry = registry
        self._exchange = exchange
        self._salts = salts
        self._responses = responses

    async def relay(self, request, ctx, provider_name):
        """Relay C{request} to the provider; return None once the answer was relayed."""
        if not self._settings.enabled:
            raise errors.NotFound("Provider passthrough routes are disabled (ENABLE_PASSTHROUGH_ROUTES).")
        # (ctx.dialect is the endpoint's API's already, from the front: L{dialect_below})
        ctx.endpoint = PASSTHROUGH
        provider = self._registry.provider(provider_name)
        if provider is None:
            raise errors.NotFound(f"No provider or provider type named '{errors.shown(provider_name)}'.",
                                  code="provider_not_found")
        if provider.type not in self._settings.types:
            raise errors.Forbidden(f"Passthrough is not enabled for provider type '{provider.type}' "
                                   "(ENABLED_PASSTHROUGH_PROVIDERS).")
        if not may_pass(ctx.principal, provider, provider_name):
            raise errors.Forbidden(f"This API key may not use the provider '{provider.name}'.",
                                   code="model_access_denied")
        target = endpoint_of(request)
        self._check(target)
        endpoint, route = target.path, target.route
        principal = ctx.principal
        if (principal is not None and not principal.master
                and route.split("/", 1)[0] in OPERATOR_ROUTES):
            raise errors.Forbidden(f"'/{_bare(endpoint)}' describes the whole provider, every tenant's load: only "
                                   "the master key reaches it.")
        ctx.provider, ctx.provider_type = provider.name, provider.type
        request.content.seek(0)
        body = request.content.read() or None
        if principal is not None and not principal.master:
            await self._owned(principal, request.method, target.bare, body)
            if body is not None and provider.type in SALTED_PROVIDER_TYPES:
                body = self._keyed(body, principal, provider, route)
            # (its answer goes without transfer fields where its requests do (L{gomodel.proxy.transfers}): one its
            # body went without, and what it reads again, a stored response of its tenant's, as on /v1)
            ctx.transfers_dropped = self._salts is not None and self._salts.strips(principal, provider)
        elif body is not None and self._responses is not None and (
                _B_PREVIOUS in body or _B_REQUEST_ID in body or _B_ESCAPE in body):
            await self._continues_kept(principal, route, body)
        model, ctx.asked_stream = served_model(body, provider)
        if model is not None:
            ctx.route(provider, model, model)
        secret = _presented(request)
        query = _upstream_query(request.uri.partition(b"#")[0].partition(b"?")[2], secret)
        call = upstream_call(endpoint, body, method=request.method, native=True, query=query,
                             headers=_upstream_headers(request, secret),
                             content_type=None, raw=True, ends=_stream_end(route), model=model,
                             pin=_pinned_replica(request), counted=_counted(request, body, route),
                             vet=partial(_vet, request, ctx, provider, request.path.split(b"/", 3)[2], endpoint, query),
                             limited=route not in COUNTING_ROUTES)
        call.shown = response_shown if call.ends is RESPONSES_END else _SHOWN.get(route, answer_shown)
        return await self._exchange.relay(request, ctx, provider, call)

    async def _owned(self, principal, method, endpoint, body):
        """Refuse a managed key's request for what another tenant may own upstream (C{endpoint}: the path without
        its C{v1/}): a stored response the gateway does not hold for its tenant, as on C{/v1/responses/{id}}, or
        continued (C{previous_response_id}), as on C{/v1/responses}; the provider account's objects
        (L{ACCOUNT_ROUTES}, stored chat completions), which the gateway cannot tell apart.

        @raise NotFound: C{responses/{id}} (any method, below it too) the gateway holds for no tenant of the key.
        @raise InvalidRequest: a body continuing such a response (C{previous_response_not_found}) on C{responses} or
            a route below it that names none (L{RESPONSES_ROUTES}: vLLM's C{render}, OpenAI's C{compact}),
            or no JSON the gateway reads (C{invalid_json}); a create naming its response's id (L{no_chosen_id}).
        @raise Forbidden: an account's route (C{provider_account_route}).
        """
        parts, route = endpoint.split("/"), endpoint.lower().split("/")
        first = route[0]
        if (first in ACCOUNT_ROUTES or route[:2] == ["messages", "batches"] or (first == "realtime" and len(route) > 1)
                or (first == "models" and method not in (b"GET", b"HEAD"))  # (OpenAI's DELETE of a fine-tuned model)
                or (route[:2] == ["chat", "completions"] and (method != b"POST" or len(route) > 2
                                                              and route[2] not in CHAT_ROUTES))):
            raise errors.Forbidden(f"'/{endpoint}' reaches what the provider's account stores, every tenant's: only "
                                   "the master key reaches it.", code="provider_account_route")
        if first != "responses":
            return
        if len(parts) > 1 and route[1] not in RESPONSES_ROUTES:
            record = await self._responses.get(parts[1]) if self._responses is not None else None
            if record is None or not visible(principal, record):
                raise unknown_response(parts[1])
        elif body is not None and (self._responses is not None or len(parts) == 1):
            # (a create, which may name its id, or what reads one's history too)
            try:
                fields = jsonutil.loads(body)
            except jsonutil.JSONError as e:  # (which an upstream's parser may read: a BOM before it, a NaN, UTF-16)
                raise not_json(body, e) from None
            if fields.__class__ is not dict:
                return
            if len(parts) == 1 and "request_id" in fields:
                await no_chosen_id(self._responses, fields, principal)
            await self._follows_kept(principal, fields)

    async def _continues_kept(self, principal, route, body):
        """Refuse the master key's (an open gateway's) C{body} to C{route} continuing a response deleted through
        the gateway, or one following such a response (L{_follows_kept}), on C{responses} and the routes below
        it that name no response, or a create naming a tenant's response's id (L{no_chosen_id}); a body that is
        no JSON object goes as it came."""
        parts = route.split("/")
        if parts[0] != "responses" or len(parts) > 1 and parts[1] not in RESPONSES_ROUTES:
            return
        try:
            fields = jsonutil.loads(body)
        except jsonutil.JSONError:
            return
        if fields.__class__ is dict:
            if len(parts) == 1 and "request_id" in fields:
                await no_chosen_id(self._responses, fields, principal)
            await self._follows_kept(principal, fields)

    async def _follows_kept(self, principal, fields):
        """Refuse C{fields} (a Responses body) continuing what the gateway does not hold for C{principal}
        (L{continued}), or a conversation one of whose turns was deleted through the gateway: its instance
        still holds that turn (vLLM keeps responses in memory), and a raw body cannot be sent the conversation
        without it (C{/v1/responses} does that).

        @raise InvalidRequest: C{previous_response_not_found} (at once, for any key, where it names no response
            anywhere: L{held_nowhere}).
        """
        previous = fields.get("previous_response_id")
        if not previous or self._responses is None:
            return
        previous = str(previous)
        if held_nowhere(previous):
            raise unknown_previous(previous)
        if principal is not None and not principal.master:
            await continued(self._responses, previous, principal)
        elif await self._responses.deleted(previous):  # (the master key's: an id the gateway does not hold goes
            raise unknown_previous(previous)  # on at once, never looked for again as one being written)
        if await self._responses.follows_deleted(previous):
            raise errors.InvalidRequest(
                f"Previous response with id '{errors.shown(previous)}' follows a response deleted through the "
                "gateway, which its instance still holds: /v1/responses continues it without that turn.",
                param="previous_response_id", code="previous_response_not_found")

    def _keyed(self, body, principal, provider, route):
        """C{body} (raw) with a managed key's C{cache_salt} and C{priority} set as on C{/v1}
        (L{gomodel.api.inference.target}; a key without a priority, the body's no sooner than the default:
        L{key_priority}), where C{route} takes them (on L{PRIORITY_ROUTES}, its priority alone) and C{body} is a
        JSON object; else as it is.

        @raise InvalidRequest: C{route} takes them and C{body} is no JSON the gateway reads (vLLM's parser reads
            more: a BOM before it, a NaN, UTF-16), which would reach vLLM without them; or a C{priority} in it
            that is no integer (L{key_priority}).
        """
        salted = route in KEYED_ROUTES
        if not salted and route not in PRIORITY_ROUTES:
            return body
        try:
            fields = jsonutil.loads(body)
        except jsonutil.JSONError as e:
            raise not_json(body, e) from None
        if fields.__class__ is not dict:
            return body
        if provider.priority_scheduling and route != "messages":
            key_priority(principal, fields)
        if salted and self._salts is not None:
            self._salts.apply(principal, provider, fields)
        return jsonutil.dumps(fields)

    def _check(self, target):
        """Refuse C{target} (an L{Endpoint}) where it is no endpoint, or an admin route not allowed."""
        if target.refused is not None:
            raise target.refused
        bare, route = _bare(target.path), target.route
        allowed = self._settings.admin_allowed
        first = route.split("/", 1)[0]
        if (first in ADMIN_ROUTES and first not in allowed) or (route in ADMIN_ROUTES and route not in allowed):
            raise errors.Forbidden(f"'/{bare}' is an operational route of the provider and is not reachable "
                                   "through the gateway (PASSTHROUGH_ALLOWED_ADMIN_ROUTES can allow it).")


class Endpoint:
    """The endpoint of a C{/p/{provider}/{endpoint}} request, read once from its path (L{endpoint_of}).

    @ivar path: the canonical endpoint path sent upstream (percent-encoded; empty segments left out).
    @ivar bare: the endpoint decoded, without C{v1/} (L{_bare}), its case kept (a response id's).
    @ivar route: what vLLM routes it as (C{chat/completions}, C{metrics}): L{bare} in lower case.
    @ivar refused: the L{gomodel.errors.InvalidRequest} that refuses it (a C{.} or C{..} segment, a NUL, no
        endpoint), or None.
    """

    __slots__ = ("path", "bare", "route", "refused")

    def __init__(self, raw: bytes):
        """
        @param raw: the request path after C{/p/{provider}/}, as it came.
        """
        decoded = unquote(raw.decode("latin-1"))
        segments = decoded.split("/")
        endpoint = "/".join(s for s in segments if s)
        self.path = quote(endpoint, safe=_SAFE_PATH)
        self.bare = _bare(endpoint)
        self.route = self.bare.lower()
        self.refused = None
        if any(s in (".", "..") for s in segments) or "\x00" in decoded:
            self.refused = errors.InvalidRequest("The passthrough endpoint must not contain '.' or '..' segments.",
                                                 code="invalid_endpoint")
        elif not endpoint:
            self.refused = errors.InvalidRequest("A provider passthrough needs an endpoint: /p/{provider}/{endpoint}.",
                                                 code="missing_endpoint")


def endpoint_of(request) -> Endpoint:
    """The L{Endpoint} of C{request} (a C{/p/{provider}/...} one), read from its path on the first call and kept on
    it (C{request.passthrough}): the front's L{dialect_below} and the relay read it once between them. A raw C{#}
    (which no HTTP client sends) begins a fragment, its query's too, which never goes upstream nor names the route,
    as the provider's own server reads it; an encoded one (C{%23}) is the path's."""
    found = request.passthrough
    if found is None:
        path = request.path.partition(b"#")[0]
        found = request.passthrough = Endpoint(path.split(b"/", 3)[3] if path.count(b"/") >= 3 else b"")
    return found


def dialect_below(request):
    """The error dialect of a C{/p/{provider}/{endpoint}} request whose endpoint is an API with errors of its
    own, or None (OpenAI's): Anthropic's on C{messages} (a client of C{/p/{provider}/v1/messages} is an Anthropic
    client, as on C{/v1/messages}: its 401, its 403s, a stream cut in the middle), the Responses API's on
    C{responses}; C{v1/} or not, as L{Passthrough.relay} routes them."""
    path = request.path
    if not path.startswith(b"/p/") or path.count(b"/") < 3:
        return None
    route = endpoint_of(request).route
    if route.startswith("messages"):
        return render.ANTHROPIC
    if route.startswith("responses"):
        return render.RESPONSES
    return None


LOCATION = header_name("location")
CONTENT_LOCATION = header_name("content-location")
LINK = header_name("link")
# One link-value of a C{Link} header (RFC 8288): its target, then its parameters (a quoted string may hold a comma).
_LINK_VALUE = re.compile(rb'\s*<([^>]*)>((?:[^",]|"(?:[^"\\]|\\.)*")*),?')


async def _vet(request, ctx, provider, name, endpoint, query, response):
    """A passthrough's vet (L{UpstreamCall.vet}): the upstream's own C{request-id} (Anthropic's, which the
    anthropic SDKs read) given to C{request}'s answer in place of the gateway's (whose C{X-Request-Id} stays
    its own), its own C{X-Request-Id} (OpenAI's) as C{X-Upstream-Request-Id} where it is not the gateway's
    echoed back (vLLM's), and its places rewritten (L{_relocate}). Each replica's answer sets both afresh: one
    whose answer broke off before it went out leaves its ids to none that answered after it."""
    headers, answer = plain_headers(response.headers), request.responseHeaders
    upstream_id = headers.get(REQUEST_ID)
    if upstream_id is not None:
        answer.put(REQUEST_ID, upstream_id[-1])
    elif ctx.dialect is render.ANTHROPIC:
        answer.put(REQUEST_ID, ctx.request_id)  # (the gateway's, as L{gomodel.http.front} gave it)
    else:
        plain_headers(answer).pop(REQUEST_ID, None)
    upstream_id = headers.get(X_REQUEST_ID)
    if upstream_id is not None and upstream_id[-1] != ctx.request_id:
        answer.put(X_UPSTREAM_REQUEST_ID, upstream_id[-1])
    else:
        plain_headers(answer).pop(X_UPSTREAM_REQUEST_ID, None)
    _relocate(ctx, provider, name, endpoint, query, response)


def _relocate(ctx, provider, name, endpoint, query, response):
    """The C{Location} and C{Content-Location} of the upstream's C{response} (a redirect's, a 201's) and each
    C{Link} target rewritten where it names a place on the upstream (relative, or absolute to it) to that place under
    C{/p/{name}/} (C{name}: the provider as the client named it), so its client lands there; left out (a link: that
    link) where no passthrough path reaches that place; one elsewhere as it is."""
    headers = plain_headers(response.headers)
    if LOCATION not in headers and CONTENT_LOCATION not in headers and LINK not in headers:
        return
    server = provider.replicas[ctx.replica].server
    here = server.url(endpoint, True) + ("?" + query.decode("latin-1") if query else "")
    prefix = b"/p/" + name + b"/"
    for header in (LOCATION, CONTENT_LOCATION, LINK):
        values = headers.get(header)
        if values is None:
            continue
        moved = _links_relocated if header == LINK else _relocated
        kept = [shown for shown in (moved(server, here, prefix, value) for value in values) if shown]
        if kept:
            headers[header] = kept
        else:
            del headers[header]


def _links_relocated(server, here, prefix, value):
    """A C{Link} header's C{value} with each link's target as L{_relocated} gives it, a link it gives none left out
    (its parameters kept); None where none is left, or it holds no link."""
    links, at = [], 0
    while at < len(value):
        found = _LINK_VALUE.match(value, at)
        if found is None or found.end() == at:
            return b", ".join(links) or None  # (what follows is no link: left out)
        target = _relocated(server, here, prefix, found.group(1))
        if target is not None:
            links.append(b"<" + target + b">" + found.group(2).rstrip())
        at = found.end()
    return b", ".join(links) or None


def _relocated(server, here, prefix, location):
    """C{location} (bytes) of an answer to C{here} (the upstream URL asked) from C{server}, as its client gets it: the
    same place under C{prefix} (C{/p/{provider}/}) where it is on C{server} and a passthrough path reaches it (its
    C{url} of that path is that place), C{location} itself where it is elsewhere, else None."""
    try:
        target = urlsplit(urljoin(here, location.decode("latin-1")))
        root = urlsplit(server.root_url)
    except ValueError:  # (a bracket unbalanced in a host: no place)
        return None
    if (target.scheme.lower(), target.netloc.lower()) != (root.scheme.lower(), root.netloc.lower()):
        return location
    place = urlunsplit((target.scheme, target.netloc, target.path, "", ""))
    for start in (server.root_url, server.base_url):
        if place.startswith(start + "/"):
            path = place[len(start) + 1:]
            if server.url(path, True) == place:
                return prefix + urlunsplit(("", "", path, target.query, target.fragment)).encode("latin-1")
    return None


def _json_shown(body: bytes, upstream, cut) -> bytes:
    """C{body}, a JSON answer, as C{cut} leaves its value (C{cut(value)}: whether it took something out of it, in
    place), then as L{answer_shown}; one that is no JSON, or that C{cut} left whole, as it came."""
    try:
        value = jsonutil.loads(body)
    except jsonutil.JSONError:
        return answer_shown(body, upstream)
    return answer_shown(jsonutil.dumps(value) if cut(value) else body, upstream)


def _rooted(listing) -> bool:
    """A provider's model list (C{models}) with each model's C{root} (vLLM's: where its weights or a LoRA adapter
    lie on its host) its C{id}, as on C{/v1/models}; whether it had any."""
    models = listing.get("data") if listing.__class__ is dict else None
    rooted = [m for m in models if m.__class__ is dict and "root" in m] if models.__class__ is list else ()
    for model in rooted:
        model["root"] = model.get("id")
    return bool(rooted)


def _without_files(info) -> bool:
    """vLLM's C{tokenizer_info} (its tokenizer's C{init_kwargs}) without what names the tokenizer's files on its
    host: C{name_or_path} (where it was loaded from, the weights' directory) and each C{..._file}
    (C{tokenizer_file}, C{special_tokens_map_file}, ...); whether it had any."""
    if info.__class__ is not dict:
        return False
    files = [name for name in info if name == "name_or_path" or name.endswith("_file")]
    for name in files:
        del info[name]
    return bool(files)


# A route's own L{UpstreamCall.shown} (what names the upstream's files), the others' L{answer_shown}.
_SHOWN = {"models": partial(_json_shown, cut=_rooted), "tokenizer_info": partial(_json_shown, cut=_without_files)}


def _stream_end(route):
    """The L{gomodel.proxy.exchange.StreamEnd} of an event stream answered on C{route}, or None."""
    ends = STREAM_ENDS.get(route)
    if ends is None and route.startswith("responses/") and route.count("/") == 1:
        return RESPONSES_END
    return ends


def _bare(endpoint) -> str:
    """C{endpoint} without its C{v1/} (C{/p/{provider}/v1/...} is C{/p/{provider}/...}), every one it begins with:
    C{v1/v1/chat/completions} reaches vLLM's C{/v1/chat/completions} (one C{v1/} goes, the other is vLLM's own),
    and is classed as that route."""
    while endpoint[:3].lower() == "v1/":
        endpoint = endpoint[3:]
    return endpoint


def may_pass(principal, provider, sent) -> bool:
    """Whether C{principal} may reach C{provider} (a pool), named C{sent} (its instance's or its type's name),
    through the passthrough, which checks no model: a key with C{models} only where it may use one of that
    provider's models (by a provider selector, a model qualified there, or a bare id the provider lists)."""
    if principal is None or principal.models is None or principal.allows_provider(sent) \
            or principal.allows_provider(provider.name):
        return True
    models = provider.models()
    return models is not None and any(principal.names(model) for model in models)


def served_model(body, provider):
    """C{(model, stream)} of a raw JSON request C{body}: the C{model} it names where C{provider} (a pool) lists
    it, else None: what its usage is priced, limited and recorded by, as on C{/v1} (a model it does not list
    names nothing, so the metrics' labels stay bounded); and whether it asks to stream (C{"stream": true})."""
    if not body or (b'"model"' not in body and b'"stream"' not in body):
        return None, False
    try:
        fields = jsonutil.loads(body)
    except jsonutil.JSONError:
        return None, False
    if fields.__class__ is not dict:
        return None, False
    model, models = fields.get("model"), provider.models()
    return (model if model.__class__ is str and models is not None and model in models else None,
            fields.get("stream") is True)


def _counted(request, body, route):
    """What a raw request's tokens are estimated from where it is not its C{body} (L{UpstreamCall}'s C{counted}):
    a multipart form's C{prompt} field (an audio request's; its file is no text, as on C{/v1/audio/...}), Cohere's
    C{v2/embed} without its C{max_tokens} (each input's truncation, no output: L{without_max_tokens}), else None
    (its body)."""
    if route == "v2/embed":
        return without_max_tokens(body)
    kind = request.getHeader(b"content-type")
    if body is None or kind is None or not kind.lower().lstrip().startswith(b"multipart/form-data"):
        return None
    try:
        prompt = Form(kind, body).field("prompt")
    except errors.InvalidRequest:  # (relayed anyway: the upstream answers it)
        prompt = None
    return jsonutil.dumps({"prompt": prompt or ""})


def _pinned_replica(request):
    """The replica index of an C{X-Gomodel-Replica: N} header (diagnostics), or None."""
    value = request.getHeader(b"x-gomodel-replica")
    if value is None:
        return None
    index = whole_number(value, 0, 2**31 - 1)  # (an index past the pool: unknown_replica)
    if index is None:
        raise errors.InvalidRequest("X-Gomodel-Replica must be a replica index (0, 1, ...).", param="X-Gomodel-Replica",
                                    code="invalid_replica")
    return index


def _presented(request):
    """The gateway key C{request} was sent with (bytes), where it is long enough to look for elsewhere in the
    request (L{_SCANNED_KEY}), else None."""
    try:
        secret = presented_key(request, required=False)
    except errors.GatewayError:  # (an open gateway's client may send what is no key of ours)
        return None
    return secret if len(secret) >= _SCANNED_KEY else None


def _upstream_headers(request, secret=None) -> dict:
    """The request headers relayed: none of L{_NOT_UPSTREAM}, nor one holding C{secret}, the client's gateway key
    (sent again under another name, a cookie's, ...: the key never goes upstream)."""
    named = connection_tokens(request.requestHeaders)
    headers = {}
    for name, values in request.requestHeaders.getAllRawHeaders():
        lower = name.lower()
        if lower in _NOT_UPSTREAM or lower in named or lower.startswith(b"x-forwarded-"):
            continue
        if secret is not None and b"\n".join(values).find(secret) >= 0:  # (a key holds no line break)
            continue
        headers[name] = values
    return headers


def _upstream_query(query: bytes, secret) -> bytes:
    """The raw C{query} relayed: as it came, but for a parameter holding C{secret}, the client's gateway key
    (C{?key=...}, C{?api_key=...}), which is left out: percent-decoded, as a form decodes it (C{+} a space) or
    not (a key's own C{+} written as it is)."""
    if secret is None or not query or not _holds(query, secret):
        return query
    return b"&".join(part for part in query.split(b"&") if not _holds(part, secret))


def _holds(raw: bytes, secret: bytes) -> bool:
    """Whether the query text C{raw} holds C{secret}, however a server reading it would decode it."""
    return secret in unquote_to_bytes(raw) or secret in unquote_to_bytes(raw.replace(b"+", b" "))

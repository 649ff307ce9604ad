"""The inference routes: chat, completions, embeddings, Responses, rerank, score, classify.

These are the gateway's hot path, so the front resource dispatches them by
exact path without Klein (whose per-request routing cost about a third of
the gateway's CPU per relayed request in the overhead benchmark); every other
route stays on Klein.
"""

from gomodel import jsonutil
from gomodel.http.bodies import json_body
from gomodel.errors import InvalidRequest
from gomodel.proxy.sse import ChatStreamObserver


class InferenceRoutes:
    """Model-routed POST handlers; each returns the body to write, or None once it relayed a stream."""

    def __init__(self, registry, forwarder, responses):
        self._registry = registry
        self._forwarder = forwarder
        self._responses = responses  # a ResponsesRoute

    def routes(self) -> dict:
        """Exact request path -> coroutine function of the request (POST only)."""
        return {
            b"/v1/chat/completions": self.chat_completions,
            b"/v1/completions": self.completions,
            b"/v1/embeddings": self.embeddings,
            b"/v1/responses": self.responses,
            b"/v1/rerank": self.rerank,
            b"/v1/score": self.score,
            b"/v1/classify": self.classify,
        }

    async def chat_completions(self, request):
        return await self._completions(request, "/chat/completions")

    async def completions(self, request):
        return await self._completions(request, "/completions")

    async def _completions(self, request, path):
        """Chat or legacy completions: streams get usage forced on upstream, stripped if unasked."""
        body = json_body(request)
        route = self._route(request, body)
        observer = None
        if body.get("stream") is True:
            strip_usage = False
            options = body.get("stream_options")
            if options is None or isinstance(options, dict):
                options = dict(options or {})
                if options.get("include_usage") is not True:
                    # We always want usage; the client gets it only if it asked.
                    options["include_usage"] = True
                    strip_usage = True
                body["stream_options"] = options
            observer = ChatStreamObserver(strip_usage)
        return await self._forwarder.forward(request, route.provider, path, jsonutil.dumps(body), observer)

    async def embeddings(self, request):
        return await self._model_routed(request, "/embeddings")

    async def rerank(self, request):
        return await self._model_routed(request, "/rerank")

    async def score(self, request):
        return await self._model_routed(request, "/score")

    async def classify(self, request):
        # vLLM serves classify only at its root, not under /v1.
        return await self._model_routed(request, "classify", native=True)

    async def _model_routed(self, request, path, native=False):
        """A JSON POST routed by its C{model}, relayed as the upstream answers (streams included)."""
        body = json_body(request)
        route = self._route(request, body)
        payload = jsonutil.dumps(body)
        if native:
            upstream = await route.provider.send_url("POST", route.provider.passthrough_url(path), payload,
                                                     request.request_id)
            return await self._forwarder.answer(request, route.provider, upstream)
        return await self._forwarder.forward(request, route.provider, path, payload)

    async def responses(self, request):
        return await self._responses.create(request, json_body(request), self._route)

    def _route(self, request, body):
        """Resolve C{body["model"]} and rewrite it to the upstream's id."""
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise InvalidRequest("The request needs a 'model' (e.g. 'vllm/meta-llama/Llama-3.1-8B-Instruct').",
                                 param="model", code="missing_required_parameter")
        route = self._registry.resolve(model)
        request.provider_name = route.provider.name
        request.model = model
        body["model"] = route.upstream_model
        return route

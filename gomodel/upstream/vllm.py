"""vLLM: an OpenAI-compatible upstream whose native routes live at the server root."""

from twisted.internet.defer import Deferred

from gomodel.upstream.errors import upstream_error
from gomodel.upstream.openai_compatible import OpenAICompatibleProvider, _strip_v1

HEALTH_TIMEOUT = 5.0
HEALTH_BODY_LIMIT = 64 * 1024
METRICS_LIMIT = 16 * 1024 * 1024

# Everything else (tokenize, detokenize, pooling, score, rerank, classify,
# health, version, load, metrics, ...) is served at the root, not under /v1.
# (vLLM 0.32's structured decisions, systemone, are under /v1 alone.)
_V1_ROUTES = ("models", "chat/completions", "completions", "embeddings", "responses",
              "messages", "audio", "files", "batches", "systemone")


class VLLMProvider(OpenAICompatibleProvider):
    """A vLLM server; keyless unless it was started with C{--api-key}.

    Every request asks for vLLM's load report (C{endpoint-load-metrics-format:
    json}); vLLM 0.32 answers non-streamed chat and completions with an
    C{endpoint-load-metrics} header holding its queue and KV-cache use.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._own_lines += b"Endpoint-Load-Metrics-Format: json\r\n"

    def url(self, path: str, native=False) -> str:
        if not native:
            return self.base_url + path
        path = _strip_v1(path)
        for r in _V1_ROUTES:  # (a loop: a generator would make path a closure cell on every call)
            if path == r or path.startswith(r + "/") or path.startswith(r + "?"):
                return self.base_url + "/" + path
        return self.root_url + "/" + path

    def health(self) -> Deferred:
        """vLLM's C{GET /health}: 200 while the engine is alive (it does not notice a hung engine)."""
        return Deferred.fromCoroutine(self._health())

    async def _health(self):
        await self._root_get("/health", HEALTH_BODY_LIMIT)

    def scrape(self) -> Deferred:
        """vLLM's C{GET /metrics} page (bytes; read in full, parsed by the caller)."""
        return Deferred.fromCoroutine(self._scrape())

    async def _scrape(self):
        return await self._root_get("/metrics", METRICS_LIMIT)

    async def _root_get(self, path, limit):
        """The body of C{GET path} at the server root; an error status raises its L{UpstreamError}."""
        response, body = await self._get(self.root_url + path, limit, f"answer {path}", timeout=HEALTH_TIMEOUT)
        if response.code >= 400:
            raise upstream_error(response.code, body, self.name, self.hidden)
        return body

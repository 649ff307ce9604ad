"""vLLM: an OpenAI-compatible upstream whose native routes live at the server root."""

from gomodel.upstream.openai_compatible import OpenAICompatibleProvider, _strip_v1

# Everything else (tokenize, detokenize, pooling, score, rerank, classify,
# health, version, load, metrics, ...) is served at the root, not under /v1.
_V1_ROUTES = ("models", "chat/completions", "completions", "embeddings", "responses",
              "messages", "audio", "files", "batches")


class VLLMProvider(OpenAICompatibleProvider):
    """A vLLM server; keyless unless it was started with C{--api-key}."""

    def url(self, path: str, native=False) -> str:
        if not native:
            return self.config.base_url + path
        path = _strip_v1(path)
        if any(path == r or path.startswith(r + "/") or path.startswith(r + "?") for r in _V1_ROUTES):
            return self.config.base_url + "/" + path
        return self.config.root_url + "/" + path

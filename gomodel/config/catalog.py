"""What the gateway knows about kinds of upstream, and the models modes: constants only."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ProviderType:
    """What the gateway knows about one kind of OpenAI-compatible upstream."""

    name: str
    default_base_url: str
    keyless: bool  # may be registered without an API key
    max_stops: int | None = None  # the most chat stop sequences it takes (a 400 past them); None: no known bound
    # (a provider's default: its max_stop_sequences may say more, gomodel.config.providers)


PROVIDER_TYPES = {
    t.name: t
    for t in (
        # vLLM 0.32: ChatCompletionRequest.stop holds at most VLLM_MAX_STOP_STRINGS, 4 unless the server's
        # environment says more (vllm/envs.py, vllm/entrypoints/generate/base/protocol.py's StopParam).
        ProviderType("vllm", "http://localhost:8000/v1", True, max_stops=4),
        # OpenAI's API reference, chat completions' stop: "Up to 4 sequences".
        ProviderType("openai", "https://api.openai.com/v1", False, max_stops=4),
        # Ollama's OpenAI-compatible API states no bound on stop.
        ProviderType("ollama", "http://localhost:11434/v1", True),
        # Groq's API reference (console.groq.com/docs/api-reference), stop: "Up to 4 sequences".
        ProviderType("groq", "https://api.groq.com/openai/v1", False, max_stops=4),
        # OpenRouter passes stop on to the model's provider and states no bound of its own.
        ProviderType("openrouter", "https://openrouter.ai/api/v1", False),
        # xAI's API reference (docs.x.ai, chat completions), stop: "Up to 4 sequences".
        ProviderType("xai", "https://api.x.ai/v1", False, max_stops=4),
        # DeepSeek's API reference (api-docs.deepseek.com, create chat completion), stop: "Up to 16 sequences".
        ProviderType("deepseek", "https://api.deepseek.com/v1", False, max_stops=16),
    )
}

# The fewest stop sequences any provider type takes: a translated answer is watched for those past them
# (gomodel.anthropic.translate.unsent_stops), whichever target gives it.
FEWEST_STOPS = min(t.max_stops for t in PROVIDER_TYPES.values() if t.max_stops is not None)

# Server types whose API lives under /v1 of the server root whatever the user wrote.
ROOT_SERVERS = frozenset({"vllm", "ollama"})

MODELS_MODES = ("fallback", "allowlist")

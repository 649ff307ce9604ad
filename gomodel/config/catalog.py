"""What the gateway knows about kinds of upstream, and the models modes: constants only."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ProviderType:
    """What the gateway knows about one kind of OpenAI-compatible upstream."""

    name: str
    default_base_url: str
    keyless: bool  # may be registered without an API key


PROVIDER_TYPES = {
    t.name: t
    for t in (
        ProviderType("vllm", "http://localhost:8000/v1", True),
        ProviderType("openai", "https://api.openai.com/v1", False),
        ProviderType("ollama", "http://localhost:11434/v1", True),
        ProviderType("groq", "https://api.groq.com/openai/v1", False),
        ProviderType("openrouter", "https://openrouter.ai/api/v1", False),
        ProviderType("xai", "https://api.x.ai/v1", False),
        ProviderType("deepseek", "https://api.deepseek.com/v1", False),
    )
}

# Server types whose API lives under /v1 of the server root whatever the user wrote.
ROOT_SERVERS = frozenset({"vllm", "ollama"})

MODELS_MODES = ("fallback", "allowlist")

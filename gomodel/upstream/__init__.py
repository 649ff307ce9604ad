"""Upstream providers: one module per provider type."""

from gomodel.interfaces import IProvider
from gomodel.upstream.openai_compatible import OpenAICompatibleProvider
from gomodel.upstream.vllm import VLLMProvider

_BY_TYPE = {"vllm": VLLMProvider}


def build_provider(config, relay, http, clock, timeouts) -> IProvider:
    """The provider object for one L{gomodel.config.ProviderConfig}."""
    return _BY_TYPE.get(config.type, OpenAICompatibleProvider)(config, relay, http, clock, timeouts)


__all__ = ["IProvider", "OpenAICompatibleProvider", "VLLMProvider", "build_provider"]

"""Upstream providers: one module per provider type."""

from gomodel.providers.base import IProvider
from gomodel.providers.openai_compatible import OpenAICompatibleProvider
from gomodel.providers.vllm import VLLMProvider

_BY_TYPE = {"vllm": VLLMProvider}


def build_provider(config, relay, http, clock, timeouts) -> IProvider:
    """The provider object for one L{gomodel.config.ProviderConfig}."""
    return _BY_TYPE.get(config.type, OpenAICompatibleProvider)(config, relay, http, clock, timeouts)


__all__ = ["IProvider", "OpenAICompatibleProvider", "VLLMProvider", "build_provider"]

"""Upstreams: the HTTP client, one module per provider type, and upstream error envelopes."""

from gomodel.interfaces import IUpstream
from gomodel.upstream.openai_compatible import OpenAICompatibleProvider
from gomodel.upstream.vllm import VLLMProvider

_BY_TYPE = {"vllm": VLLMProvider}


def build_provider(config, relay, http, clock, timeouts) -> IUpstream:
    """The provider object for one L{gomodel.config.ProviderConfig}."""
    return _BY_TYPE.get(config.type, OpenAICompatibleProvider)(config, relay, http, clock, timeouts)


__all__ = ["IUpstream", "OpenAICompatibleProvider", "VLLMProvider", "build_provider"]

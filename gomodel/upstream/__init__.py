"""Upstreams: the HTTP client, one module per provider type, and upstream error envelopes."""

from gomodel.interfaces import IUpstream
from gomodel.upstream.openai_compatible import OpenAICompatibleProvider
from gomodel.upstream.vllm import VLLMProvider

_BY_TYPE = {"vllm": VLLMProvider}


def build_server(config, replica, relay, clock, timeouts) -> IUpstream:
    """The client of one server (C{replica}, a L{gomodel.config.ReplicaConfig}) of a provider (C{config})."""
    return _BY_TYPE.get(config.type, OpenAICompatibleProvider)(config, replica, relay, clock, timeouts)


__all__ = ["IUpstream", "OpenAICompatibleProvider", "VLLMProvider", "build_server"]

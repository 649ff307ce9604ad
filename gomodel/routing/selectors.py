"""Model selectors: C{provider/upstream-model}, split on the first slash only."""

from typing import NamedTuple, Optional


class Selector(NamedTuple):
    raw: str
    prefix: Optional[str]  # the text before the first slash, if any
    rest: str  # the text after it (the whole selector when there is no slash)


def parse_selector(raw: str) -> Selector:
    """Split C{raw} on its first slash: C{vllm-test/meta-llama/X} -> (C{vllm-test}, C{meta-llama/X})."""
    prefix, slash, rest = raw.partition("/")
    if not slash or not prefix or not rest:
        return Selector(raw, None, raw)
    return Selector(raw, prefix, rest)


def qualified(provider_name: str, upstream_model: str) -> str:
    """The public id of C{upstream_model} served by C{provider_name}."""
    return f"{provider_name}/{upstream_model}"

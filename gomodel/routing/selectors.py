"""Model selectors: C{provider/upstream-model}, split on the first slash only."""

import re
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


def public_id(upstream_id: str) -> str:
    """The id a client knows C{upstream_id} by: a model a vLLM lists by the path it was loaded from (started with
    C{--model /srv/models/Llama-3.1-8B} and no C{--served-model-name}; one that begins with C{/}, C{./}, C{../} or
    C{~}, or holds a backslash, as no hub id or served name does: C{a/b/c} may be either, and is left as it is) by
    the path's last component (a hub cache's
    C{models--org--name/snapshots/<hash>} by C{org/name}); any other as it is."""
    if _PATH_LIKE.search(upstream_id) is None:
        return upstream_id
    parts = [part for part in upstream_id.replace("\\", "/").split("/") if part not in ("", ".", "..", "~")]
    for part in reversed(parts):
        if part.startswith("models--"):  # (Hugging Face's cache: models--{org}--{name}/snapshots/{revision})
            return part[len("models--"):].replace("--", "/", 1)
    return parts[-1] if parts else upstream_id


# What a path names, as a model id: where it starts, or a Windows separator
_PATH_LIKE = re.compile(r"^[/~]|^\.\.?/|\\")

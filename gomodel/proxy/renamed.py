"""Answers of a model a provider lists by a path (L{gomodel.routing.selectors.public_id}), naming it by the id
clients know it by: vLLM echoes the id it was sent (the path) in each answer's, chunk's and event's C{model}."""

import re
from functools import partial

from gomodel import jsonutil


class ModelNamed:
    """C{(upstream id, public id)}'s way of writing what names the first (C{"model": "/srv/models/X"}) with the
    second: the C{model} members of a JSON answer or of whole events (a string naming it elsewhere, the model's
    words, is its escaped quotes' and never matches)."""

    def __init__(self, upstream_id: str, public: str):
        self._pattern = re.compile(rb'("model"\s*:\s*)' + re.escape(jsonutil.dumps(upstream_id)))
        self._public = rb"\g<1>" + jsonutil.dumps(public).replace(b"\\", b"\\\\")

    def __call__(self, data: bytes) -> bytes:
        return self._pattern.sub(self._public, data) if data else data


def model_named(upstream, upstream_id):
    """The L{ModelNamed} for C{upstream_id} at C{upstream} (a pool: its own, made once as it learned the name,
    L{gomodel.routing.pool.ReplicaPool.rename}), or None where it lists the model by its id."""
    return upstream.named.get(upstream_id)


def model_renamed(upstream, response) -> bool:
    """Write C{response}'s C{model} (a parsed answer, a Responses object: one the gateway keeps) with the public id
    where C{upstream} (a pool) lists it by a path; whether it did (C{response} is changed in place)."""
    if not upstream.renamed or response.__class__ is not dict:
        return False
    public = upstream.renamed.get(response.get("model"))
    if public is None:
        return False
    response["model"] = public
    return True


def rewriting(first, then):
    """One rewrite (bytes -> bytes) that writes with C{first}, then with C{then} (either None: none)."""
    if first is None or then is None:
        return then if first is None else first
    return partial(_rewritten, first, then)


def _rewritten(first, then, data: bytes) -> bytes:
    return then(first(data))

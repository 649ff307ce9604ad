"""Token counts by type, read from a usage object in any of the namings the gateway relays, and the
output a request body asks for."""

import re

_MAX_TOKENS = re.compile(rb'"max_(?:completion_|output_)?tokens"\s*:\s*(\d{1,18})')

TOKEN_TYPES = ("input", "output", "cached", "reasoning")


def tokens_by_type(usage: dict) -> tuple:
    """The counts of L{TOKEN_TYPES} in a usage object (chat's, the Responses API's or Anthropic's
    naming); 0 where unknown.

    Anthropic's C{input_tokens} leaves out the prompt tokens read from or written to its
    cache (C{cache_read_input_tokens}, C{cache_creation_input_tokens}): they are added to
    the input, and the cache reads are the cached tokens, as in the other namings.
    """
    details_in = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    details_out = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
    cache_read = _count(usage.get("cache_read_input_tokens"))
    cache_written = _count(usage.get("cache_creation_input_tokens"))
    cached = _count(details_in.get("cached_tokens")) if isinstance(details_in, dict) else 0
    return (_count(usage.get("prompt_tokens", usage.get("input_tokens"))) + cache_read + cache_written,
            _count(usage.get("completion_tokens", usage.get("output_tokens"))),
            cached or cache_read,
            _count(details_out.get("reasoning_tokens")) if isinstance(details_out, dict) else 0)


def _count(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def total_tokens(usage: dict, tokens: tuple = None) -> int:
    """A usage object's C{total_tokens}, else the input and output of its L{tokens_by_type} C{tokens}
    (worked out here when not given)."""
    total = usage.get("total_tokens")
    if isinstance(total, int):
        return total
    if tokens is None:
        tokens = tokens_by_type(usage)
    return tokens[0] + tokens[1]


class Pricing:
    """The pricing table: qualified model (C{provider/model}) -> C{{input_per_mtok, output_per_mtok,
    cached_input_per_mtok}}, in the table's currency per million tokens. False when empty."""

    def __init__(self, table=None):
        self._table = dict(table or {})

    def __bool__(self):
        return bool(self._table)

    def costs(self, model, tokens) -> tuple:
        """C{(input_cost, output_cost, total_cost)} of L{tokens_by_type} C{tokens} on C{model}, or Nones
        where the model has no price or the tokens are unknown (C{tokens[0]} None)."""
        price = self._table.get(model)
        if price is None or tokens[0] is None:
            return None, None, None
        uncached = price.get("input_per_mtok", 0)
        input_cost = ((tokens[0] - tokens[2]) * uncached + tokens[2] * price.get("cached_input_per_mtok", uncached)) / 1e6
        output_cost = tokens[1] * price.get("output_per_mtok", 0) / 1e6
        return input_cost, output_cost, input_cost + output_cost


def requested_tokens(body):
    """The output tokens a JSON request C{body} (bytes) asks for at most: the first C{max_tokens},
    C{max_completion_tokens} or C{max_output_tokens} in it, or None when it sends none. Read
    without parsing the body."""
    start = body.find(b'"max_') if body else -1  # most bodies send none: one scan in C, not the regex's
    if start < 0:
        return None
    found = _MAX_TOKENS.search(body, start)
    return int(found[1]) if found is not None else None

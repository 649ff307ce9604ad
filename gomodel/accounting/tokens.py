"""Token counts by type, read from a usage object in any of the namings the gateway relays."""

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

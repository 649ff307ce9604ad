"""A body made for vLLM, as an OpenAI provider takes it: its tool call ids no longer than OpenAI takes them
(L{gomodel.translate.call_ids})."""

from gomodel.translate.call_ids import SHORT_ID_TYPES, fit_call_ids

# The provider types a body goes to as L{for_openai} makes it.
OPENAI_TYPES = SHORT_ID_TYPES


def for_openai(body: dict) -> None:
    """Make C{body} (a chat, completions or Responses request's) one an C{openai} provider takes, in place: its
    tool call ids short (L{fit_call_ids})."""
    fit_call_ids(body)

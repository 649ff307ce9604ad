"""A body made for vLLM, as an OpenAI provider takes it.

OpenAI refuses (400) a parameter it does not know, and tool call ids longer
than it takes (L{gomodel.translate.call_ids}); vLLM's own sampling and
decoding extras, which its clients send, are such parameters. A request
routed (or failing over) to an C{openai} provider goes without them: the
fields of L{VLLM_ONLY}, and C{stream_options.continuous_usage_stats}.
"""

from gomodel.translate.call_ids import SHORT_ID_TYPES, fit_call_ids

# The provider types a body goes to as L{for_openai} makes it.
OPENAI_TYPES = SHORT_ID_TYPES

# vLLM's extra request fields (chat, completions, responses) that OpenAI has no parameter of that name for.
VLLM_ONLY = frozenset((
    "top_k", "min_p", "repetition_penalty", "length_penalty", "use_beam_search", "min_tokens", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "prompt_logprobs", "allowed_token_ids", "bad_words", "logits_processors",
    "return_tokens_as_token_ids", "return_token_ids", "add_generation_prompt", "continue_final_message",
    "add_special_tokens", "documents", "chat_template", "chat_template_kwargs", "mm_processor_kwargs",
    "media_io_kwargs", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "guided_whitespace_pattern", "structural_tag", "structured_outputs", "priority", "request_id", "cache_salt",
    "kv_transfer_params", "ec_transfer_params", "vllm_xargs", "thinking_token_budget", "prompt_embeds",
))


def for_openai(body: dict) -> None:
    """Make C{body} (a chat, completions or Responses request's) one an C{openai} provider takes, in place: its
    tool call ids short (L{fit_call_ids}), without the fields of L{VLLM_ONLY} nor C{stream_options}'
    C{continuous_usage_stats} (a new dict where one goes: those C{body} shares with other targets' bodies are
    not changed)."""
    fit_call_ids(body)
    for name in [name for name in body if name in VLLM_ONLY]:
        del body[name]
    options = body.get("stream_options")
    if options.__class__ is dict and "continuous_usage_stats" in options:
        body["stream_options"] = {name: value for name, value in options.items() if name != "continuous_usage_stats"}

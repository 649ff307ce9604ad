"""Anthropic's Messages API (C{/v1/messages}): translation to and from chat completions, and stream observers."""

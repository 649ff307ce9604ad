"""How the lines of a message batch (L{gomodel.anthropic.batches}) go upstream: natively or translated."""

from functools import partial

from gomodel.anthropic.file_sources import walk_blocks
from gomodel.anthropic.translate import (chat_to_message_bytes, check_create, messages_to_chat, native_body,
                                         native_message_bytes, passed_fields, unsent_stops, vllm_fields)
from gomodel.api.messages import chat_for, translates
from gomodel.translate.call_ids import long_names


def native_answer(body: bytes, model, omit_thinking: bool = False) -> bytes:
    """A line's native answer as it came (L{native_message_bytes}: one that is no message, or without a stop
    reason, is the line's error), its thinking blocks without their text with C{omit_thinking}.

    @raise gomodel.errors.BadUpstreamResponse: it is no message, or a message without a stop reason (an aborted
        generation).
    """
    return native_message_bytes(body, omit_thinking)


class MessagesLines:
    """How the lines of a message batch go upstream, as an online Messages request would (L{plan})."""

    def __init__(self, messages):
        """@param messages: the L{gomodel.api.messages.MessagesRoutes}, which knows which providers take
        Messages natively now (a vLLM that answered it has no Messages API is translated for a while)."""
        self._messages = messages

    def plan(self, payload, route, fallbacks, principal, body_for):
        """C{(path, body, fallbacks, rebody, answer)} for a line whose body is C{payload} going to C{route}.

        Natively (C{/messages}, a vLLM: its Messages take C{cache_salt}), or translated to C{/chat/completions}
        (any other provider, a vLLM that schedules by priority where the line has one: vLLM's Messages have
        no C{priority}, and a vLLM where it has stop sequences, a document, a prefill or tool changes:
        L{translates}); the fallbacks are those reached the
        same way.

        @param body_for: C{body_for(payload, model, provider)} -> the body for C{model} at C{provider}, with
            what that provider takes of C{principal} and of the batch (the batch runner's: its tenant's salt).
        @return: C{answer(body, model)} -> a successful answer as a message (natively, L{native_answer}).
        @raise gomodel.errors.InvalidRequest: C{payload} cannot be translated, or fails an online create's checks
            in their order (L{gomodel.anthropic.translate.check_create}: no message, sampling out of bounds,
            Anthropic's server side, a tool choice naming no tool or a user id no string), natively too: the
            line's error.
        """
        _, walked, errored = walk_blocks(payload, files=False)
        # (natively too, in an online create's order: of several faults, the same named; thinking.display
        # "omitted": its thinking blocks without their text)
        omit = check_create(payload, walked)
        prioritised = principal is not None and principal.priority is not None
        translating = translates(payload, walked)
        native = self._messages.native_for(route, prioritised=prioritised, translating=translating)
        fallbacks = [r for r in fallbacks
                     if self._messages.native_for(r, prioritised=prioritised, translating=translating) == native]
        if native:
            sent = native_body(payload, errored)  # (as online)

            def rebody(model, provider):
                return body_for(sent, model, provider)

            answer = partial(native_answer, omit_thinking=True) if omit else native_answer
            return "/messages", rebody(route.upstream_model, route.provider), fallbacks, rebody, answer
        chat = messages_to_chat(payload)
        extras, passed = vllm_fields(payload, chat["messages"]), passed_fields(payload)

        def rebody(model, provider):
            return body_for(chat_for(provider, chat, extras, passed), model, provider)

        # (a tool whose name an OpenAI target is sent short, chat_for: its calls named as the line declared it)
        # (and cut at a stop sequence past the four an OpenAI target is sent: chat_for, unsent_stops)
        answer = partial(chat_to_message_bytes, omit_thinking=omit, names=long_names(chat), stops=unsent_stops(payload))
        return "/chat/completions", rebody(route.upstream_model, route.provider), fallbacks, rebody, answer

    def no_native(self, provider, model, status, body) -> bool:
        """Whether a line's native answer (C{status}, C{body}) says C{provider} has no Messages API for C{model}:
        then it is translated for a while (L{plan} says so), as online, and the line is sent again so."""
        return self._messages.answered_without_messages(provider.name, model, status, body)

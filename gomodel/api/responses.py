"""POST /v1/responses: native where the provider has it, translated over chat completions where not."""

from twisted.logger import Logger

from gomodel import jsonutil
from gomodel.httpclient import read_body
from gomodel.streaming.sse import ResponsesStreamObserver
from gomodel.upstream_errors import upstream_error
from gomodel.translate.responses_chat import ChatToResponsesStream, chat_to_response, request_to_chat

# How long we remember that a provider has no /responses route before asking again.
NO_NATIVE_TTL = 600.0


class ResponsesRoute:
    """Creates responses: C{/responses} upstream, or chat completions translated both ways."""

    log = Logger()

    def __init__(self, forwarder, clock):
        self._forwarder = forwarder
        self._clock = clock
        self._no_native = {}  # provider name -> time until which we translate without asking

    async def create(self, request, body, route_of):
        """Answer a Responses API create request; see L{Forwarder.answer} for what this returns."""
        route = route_of(request, body)
        provider = route.provider
        stream = body.get("stream") is True
        if self._no_native.get(provider.name, 0) <= self._clock.seconds():
            upstream = await provider.send("POST", "/responses", jsonutil.dumps(body), request.request_id)
            if not await self._lacks_route(provider, upstream):
                observer = ResponsesStreamObserver() if stream else None
                return await self._forwarder.answer(request, provider, upstream, observer)
            self._no_native[provider.name] = self._clock.seconds() + NO_NATIVE_TTL
            self.log.info("provider {provider} has no native Responses API; translating to chat completions",
                          provider=provider.name)
        chat = jsonutil.dumps(request_to_chat(body))
        if stream:
            return await self._forwarder.forward(request, provider, "/chat/completions", chat,
                                                 ChatToResponsesStream(body, self._clock))
        return await self._forwarder.forward(request, provider, "/chat/completions", chat,
                                             transform=lambda answer: chat_to_response(answer, body))

    async def _lacks_route(self, provider, upstream) -> bool:
        """Whether C{upstream} says "no such route" (404 that is not an API error, 405, 501).

        An OpenAI-shaped 404 (an unknown model) is the provider's real answer:
        it is raised as such.
        """
        if upstream.code in (405, 501):
            _drain(upstream)
            return True
        if upstream.code != 404:
            return False
        body = await read_body(upstream, 64 * 1024)
        try:
            error = jsonutil.loads(body).get("error")
        except (jsonutil.JSONError, AttributeError):
            error = None
        if isinstance(error, dict):
            raise upstream_error(404, body, provider.name, provider.hidden)
        return True


def _drain(upstream):
    read_body(upstream, 64 * 1024).addErrback(lambda _: None)

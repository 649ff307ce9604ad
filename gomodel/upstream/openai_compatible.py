"""Any OpenAI-compatible upstream: vLLM, OpenAI, Ollama, Groq, OpenRouter, xAI, DeepSeek."""

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout
from twisted.logger import Logger
from twisted.web.client import RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from zope.interface import implementer

from gomodel import jsonutil
from gomodel.errors import BadUpstreamResponse, UpstreamTimeout, UpstreamUnreachable
from gomodel.interfaces import IUpstream
from gomodel.upstream.client import BodyTooLarge, deadline, read_body, was_cancelled
from gomodel.upstream.errors import upstream_error

# A failure of these kinds means no response byte came back: on a pooled
# connection the upstream had most likely just closed it, so one retry is safe.
_STALE_CONNECTION = (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)
_TIMEOUTS = (DeferredTimeout, net_error.TimeoutError)
MODELS_LIST_TIMEOUT = 30.0
MODELS_LIST_LIMIT = 16 * 1024 * 1024


@implementer(IUpstream)
class OpenAICompatibleProvider:
    """One OpenAI-compatible upstream instance, with its own key and base URL."""

    log = Logger()

    def __init__(self, config, relay, http, clock, timeouts):
        self.config = config
        self.name = config.name
        self.type = config.type
        self.configured_models = tuple(config.models)
        self._relay = relay  # relayed requests (a RelayClient)
        self._http = http  # our own calls (model discovery)
        self._clock = clock
        self._timeouts = timeouts
        self.hidden = tuple(h for h in (config.base_url, config.root_url, config.host) if h)
        self._authorization = (b"Bearer " + config.api_key.encode("latin-1")) if config.api_key else None
        self._key_line = b"Authorization: " + self._authorization + b"\r\n" if self._authorization else b""

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"

    def headers(self, request_id: bytes) -> Headers:
        """The headers of the gateway's own calls: our request id, and the provider's key when configured."""
        headers = Headers({b"x-request-id": [request_id]})
        if self._authorization is not None:
            headers.setRawHeaders(b"authorization", [self._authorization])
        return headers

    def _header_lines(self, request_id: bytes, extra, content_type) -> bytes:
        """L{headers} as request head lines (C{extra}, name -> values, goes through L{Headers}, which sanitises)."""
        if b"\r" in request_id or b"\n" in request_id:
            raise ValueError("a request id must not hold CR or LF")
        lines = []
        if extra:
            for name, values in Headers(extra).getAllRawHeaders():
                lower = name.lower()
                if lower in (b"x-request-id", b"authorization") or (
                        lower == b"content-type" and content_type is not None):
                    continue
                lines.extend(name + b": " + v + b"\r\n" for v in values)
        if content_type is not None:
            lines.append(b"Content-Type: " + content_type + b"\r\n")
        lines.append(b"X-Request-Id: " + request_id + b"\r\n")
        lines.append(self._key_line)
        return b"".join(lines)

    def url(self, path: str, native=False) -> str:
        """See L{IUpstream.url}."""
        if native:
            return self.config.base_url + "/" + _strip_v1(path)
        return self.config.base_url + path

    async def send(self, method, url, body, request_id, headers=None, content_type=b"application/json"):
        """See L{IUpstream.send}."""
        url = url.encode("ascii") if isinstance(url, str) else url
        method = method.encode("ascii") if isinstance(method, str) else method
        lines = self._header_lines(request_id, headers, content_type)
        for attempt in (1, 2):
            try:
                d = self._relay.request(method, url, lines, body)
                return await deadline(d, self._timeouts.response_header, self._clock)
            except _TIMEOUTS:
                raise UpstreamTimeout(f"The upstream provider '{self.name}' did not answer in time.") from None
            except _STALE_CONNECTION as e:
                if was_cancelled(e):
                    raise CancelledError() from None
                if attempt == 1:
                    self.log.debug("retrying {provider} once after {error!r}", provider=self.name, error=e)
                    continue
                raise self._unreachable() from None
            except CancelledError:
                raise
            except Exception:
                raise self._unreachable() from None

    def _unreachable(self):
        return UpstreamUnreachable(f"The upstream provider '{self.name}' is unreachable.")

    def list_models(self) -> Deferred:
        """See L{IUpstream.list_models}."""
        return Deferred.fromCoroutine(self._list_models())

    async def _list_models(self):
        d = self._http.request("GET", self.config.base_url + "/models", headers=self.headers(b"models-discovery"),
                               unbuffered=True, allow_redirects=False)
        timeout = min(MODELS_LIST_TIMEOUT, self._timeouts.response_header)
        try:
            response = await deadline(d, timeout, self._clock)
            body = await deadline(read_body(response, MODELS_LIST_LIMIT), timeout, self._clock)
        except CancelledError:
            raise
        except _STALE_CONNECTION as e:
            if was_cancelled(e):
                raise CancelledError() from None
            raise self._unreachable() from None
        except _TIMEOUTS:
            raise UpstreamTimeout(f"The upstream provider '{self.name}' did not list its models in time.") from None
        except BodyTooLarge:
            raise BadUpstreamResponse(f"The model list of '{self.name}' is too large.") from None
        except Exception:
            raise self._unreachable() from None
        if response.code >= 400:
            raise upstream_error(response.code, body, self.name, self.hidden)
        try:
            data = jsonutil.loads(body)["data"]
            if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
                raise TypeError
        except (jsonutil.JSONError, KeyError, TypeError):
            raise BadUpstreamResponse(f"The model list of '{self.name}' is not an OpenAI model list.") from None
        return data


def _strip_v1(path: str) -> str:
    path = path.lstrip("/")
    if path == "v1":
        return ""
    if path.startswith("v1/"):
        return path[3:]
    return path

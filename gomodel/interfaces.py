"""The seam between the gateway and an upstream."""

from zope.interface import Attribute, Interface


class IProvider(Interface):
    """One upstream instance (a vLLM server, an OpenAI-compatible API)."""

    name = Attribute("The instance name used in selectors, e.g. 'vllm-test'.")
    type = Attribute("The provider type, e.g. 'vllm'.")
    hidden = Attribute("Strings (host, URLs) that must never reach a client.")

    def send(method, path, body, request_id, headers=None):
        """Send one request to the API base (C{path} like C{"/chat/completions"}).

        A coroutine (await it, or wrap it in C{Deferred.fromCoroutine}).
        @return: the unbuffered
            L{twisted.web.iweb.IResponse} (any status).
        @raise gomodel.errors.UpstreamUnreachable: or UpstreamTimeout.
        """

    def list_models():
        """GET the upstream's model list.

        @return: Deferred firing with a list of model objects (dicts with an
            C{id}), or failing with a L{gomodel.errors.GatewayError}.
        """

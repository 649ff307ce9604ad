"""twistd integration: C{twistd -n gomodel [--listen ...] [--config ...]}."""

import os

from twisted.python import usage

from gomodel.config import ConfigError, load_config


class Options(usage.Options):
    synopsis = "[--listen STRPORT ...] [--config gomodel.yaml]"
    longdesc = ("OpenAI-compatible AI gateway. Providers come from the environment "
                "(VLLM_BASE_URL, VLLM_<NAME>_BASE_URL, ...) and the YAML file; the environment wins.")
    optParameters = [
        ["config", "c", None, "YAML config file (default: $GOMODEL_CONFIG)."],
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description):
        """Listen on a strports description, e.g. tcp:8080:interface=0.0.0.0 (repeatable; default tcp:$PORT)."""
        self["listen"].append(description)

    def postOptions(self):
        try:
            self.gateway_config = load_config(os.environ, self["config"], self["listen"])
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}") from None


def makeService(options):
    """Build the gateway service for twistd."""
    from twisted.internet import reactor

    from gomodel.service import GatewayService

    return GatewayService(options.gateway_config, reactor)

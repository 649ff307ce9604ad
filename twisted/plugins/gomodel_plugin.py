# No project imports at module level: twistd imports every plugin before it
# installs the reactor, and gomodel's modules import Twisted's web server, which
# installs one. gomodel.cli, imported when gomodel is the service asked for,
# imports nothing of Twisted's.
from twisted.application.service import ServiceMaker


class GatewayMaker(ServiceMaker):
    """gomodel's twistd service. Under twistd's own script, the process becomes the C{gomodel}
    runner first (L{gomodel.cli.leave_plugin_scan}): what the script and a plugin scan imported is gone."""

    @property
    def options(self):
        import gc

        from gomodel.cli import leave_plugin_scan

        leave_plugin_scan()
        # No collections while gomodel is imported and built: gomodel.tap's makeService and
        # _freeze_startup_objects say why, and the latter turns them back on.
        gc.disable()
        return super().options


gomodel = GatewayMaker(
    "gomodel",
    "gomodel.tap",
    "OpenAI-compatible AI gateway in front of vLLM and other providers",
    "gomodel",
)

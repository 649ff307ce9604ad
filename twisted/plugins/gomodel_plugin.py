# No project imports here: twistd imports every plugin before it installs the
# reactor, and gomodel's modules import Klein, which installs one.
from twisted.application.service import ServiceMaker

gomodel = ServiceMaker(
    "gomodel",
    "gomodel.tap",
    "OpenAI-compatible AI gateway in front of vLLM and other providers",
    "gomodel",
)

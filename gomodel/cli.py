"""The C{gomodel} console script: C{twistd -n --pidfile= gomodel} with the given options."""

import sys


def main(argv=None):
    from twisted.scripts.twistd import run

    argv = sys.argv[1:] if argv is None else argv
    sys.argv = ["twistd", "-n", "--pidfile=", "gomodel", *argv]
    run()

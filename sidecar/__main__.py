"""``python -m sidecar --config FILE`` runs the sidecar (same as ``pathwatch sidecar``)."""

import sys

from sidecar.cli import main

if __name__ == "__main__":
    arguments = sys.argv[1:]
    if not arguments or arguments[0] not in ("sidecar", "report", "discover", "-h", "--help"):
        arguments = ["sidecar", *arguments]
    sys.exit(main(arguments))

"""``python -m dvcray_cli.service``: the runner service (a Ray Job's entrypoint)."""

import sys

from dvcray_cli.service.server import main

if __name__ == "__main__":
    sys.exit(main())

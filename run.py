"""Run aioproxy locally: ``python run.py [--config FILE] [--host H] [--port P] [--log-level L]``."""

import sys

from aioproxy.cli import main

if __name__ == "__main__":
    sys.exit(main())

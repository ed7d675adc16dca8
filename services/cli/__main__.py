"""`python -m services.cli` (or `bin/mailrail`): the operator's command line."""

import sys

from services.cli.app import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m sync_service ...`: the coordinator's commands without the rest of the `comigs` CLI."""

import sys

from sync_service.cli import main

sys.exit(main())

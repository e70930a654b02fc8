"""`python -m dulearn ...`: the `dulearn` command (dulearn/cli.py)."""

import sys

from dulearn.cli import main

sys.exit(main())

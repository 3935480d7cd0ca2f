"""``python -m fastloss.selftest``: the acceptance run (flags: ``--help``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

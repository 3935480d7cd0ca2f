"""``python -m fastloss.bench``: runs fastloss-bench and exits with its code."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

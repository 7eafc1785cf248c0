"""``python -m kvmmmu``: the command line (:mod:`kvmmmu.cli`)."""
import sys

from kvmmmu.cli import main

if __name__ == "__main__":
    sys.exit(main())

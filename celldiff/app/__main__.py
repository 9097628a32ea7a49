"""``python -m celldiff.app ...``: the same as ``celldiff app ...``."""

import sys

from celldiff.app import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

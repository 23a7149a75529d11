"""``python -m daemon --config FILE``: the same as ``tiered daemon --config FILE``."""

from __future__ import annotations

import sys

from tiered.cli import main

if __name__ == "__main__":
    sys.exit(main(["daemon", *sys.argv[1:]]))

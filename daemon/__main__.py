"""``python -m daemon ARGS``: exactly ``tiered daemon ARGS`` (the same parser, ``-v`` and
``--debug-logger`` included), for images that run the sidecar by module name."""

from __future__ import annotations

import sys

from tiered.cli import main

if __name__ == "__main__":
    sys.exit(main(["daemon", *sys.argv[1:]]))

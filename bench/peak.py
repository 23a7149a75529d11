"""``python -m bench.peak OUT MODULE ARGS...``: run a module as ``python -m MODULE ARGS...`` and
write its peak resident memory (``VmHWM``, in MB) to OUT when it exits, however it exits.

Measured inside the process: ``VmHWM`` starts afresh at ``exec``, unlike a parent's
``ru_maxrss`` for its children, which Linux carries across ``exec`` from the forked parent.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    out, module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        Path(out).write_text(f"{peak_mb():.1f}\n")


if __name__ == "__main__":
    main()

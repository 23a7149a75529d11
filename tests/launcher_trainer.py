"""A tiny trainer for the launcher's tests: real processes, no jax.

    python tests/launcher_trainer.py WORK [--ignore-term] [--exit N] [--grandchild] [--step N]

It records its pid, process group and session in WORK/trainer.json, then waits. On SIGTERM it
saves step N (a committed step directory in WORK/local, written under a tmp name and renamed,
as orbax does) and exits with status N of --exit (default 0). A SIGINT that reaches it is
recorded in WORK/sigint, as a trainer's KeyboardInterrupt would lose the step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--exit", type=int, default=0)
    parser.add_argument("--grandchild", action="store_true")
    parser.add_argument("--step", type=int, default=37)
    args = parser.parse_args()
    local = args.work / "local"
    stop = []

    def on_term(signum: int, frame: object) -> None:
        (args.work / "sigterm").write_text(str(time.time()))
        if not args.ignore_term:
            stop.append(signum)

    def on_int(signum: int, frame: object) -> None:
        (args.work / "sigint").write_text(str(time.time()))

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_int)
    child = None
    if args.grandchild:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    info = {"pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0)}
    if child is not None:
        info["grandchild"] = child.pid
    tmp = args.work / "trainer.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.rename(args.work / "trainer.json")
    while not stop:
        time.sleep(0.05)
    step = local / f"{args.step}.orbax-checkpoint-tmp-1"
    step.mkdir(parents=True)
    (step / "state").write_bytes(os.urandom(4096))
    (step / "commit_success.txt").write_text("ok")
    step.rename(local / str(args.step))
    return args.exit


if __name__ == "__main__":
    sys.exit(main())

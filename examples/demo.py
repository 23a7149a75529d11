"""`make demo`: a small JAX training run with the daemon as sidecar, an interruption, a resume,
and `tiered status`.

1. start the daemon (`python -m daemon --config ...`) beside the trainer;
2. train, saving locally every 20 steps; the daemon promotes every fifth checkpoint (100 steps);
3. send SIGINT mid-run: the trainer writes a preemption checkpoint and exits cleanly;
4. resume: training continues from exactly that step, so no completed step is lost;
5. finish (a final checkpoint), let the daemon promote it, and print `tiered status`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "demo-run"
CONFIG = ROOT / "configs" / "demo.yml"
STEPS = 400


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def main() -> int:
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "JAX_PLATFORMS": "cpu",
    }
    py = sys.executable
    say("starting the tiered daemon as a sidecar")
    daemon_log = open(RUN / "daemon.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen(
        [py, "-m", "daemon", "--config", str(CONFIG)],
        cwd=ROOT,
        env=env,
        stdout=daemon_log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen("http://127.0.0.1:8477/healthz", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        train = [
            py,
            str(ROOT / "examples" / "train.py"),
            "--config",
            str(CONFIG),
            "--steps",
            str(STEPS),
            "--step-time",
            "0.02",
        ]
        say(f"training {STEPS} steps; interrupting with SIGINT (Ctrl+C) mid-run")
        proc = subprocess.Popen(train, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        stopped_at = None
        for line in proc.stdout:
            print("  trainer:", line.rstrip(), flush=True)
            if line.startswith("SAVED step=160"):
                time.sleep(0.3)
                proc.send_signal(signal.SIGINT)
            if line.startswith("STOPPED"):
                stopped_at = int(line.split("=")[1].split()[0])
        proc.wait()
        if stopped_at is None:
            print("the trainer did not stop on SIGINT", file=sys.stderr)
            return 1
        say(f"interrupted at step {stopped_at}: a preemption checkpoint is on the local tier")
        say("resuming")
        resumed = subprocess.run(train, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for line in resumed.stdout.splitlines():
            print("  trainer:", line, flush=True)
        if f"RESUMED step={stopped_at}" not in resumed.stdout or resumed.returncode != 0:
            print("the resume did not continue from the preemption step", file=sys.stderr)
            return 1
        say(f"resumed at step {stopped_at}: no completed step was lost")
        final = STEPS - 1
        for _ in range(100):
            durable = RUN / "durable" / "demo" / "checkpoints" / str(final) / "commit_success.txt"
            if durable.exists():
                break
            time.sleep(0.1)
        say("tiered status")
        status = subprocess.run(
            [py, "-m", "tiered.cli", "status", "--config", str(CONFIG)], cwd=ROOT, env=env
        )
        return status.returncode
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        daemon_log.close()
        say(f"daemon log: {RUN / 'daemon.log'}")
        print((RUN / "daemon.log").read_text()[-3000:])


if __name__ == "__main__":
    sys.exit(main())

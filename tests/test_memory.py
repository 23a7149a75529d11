"""Memory bounded by design: promoting, verifying and restoring a step never holds a whole file.

Each command runs as users run it (``tiered promote``, ``verify``, ``restore``) and reports its
own peak resident memory (``bench/peak.py``: ``VmHWM``, measured inside the process). The step
is one file of 200 MB: a command that read it whole would peak above 200 MB plus the
interpreter and the storage clients (about 50 to 90 MB), and the bar is 200 MB. ``make bench``
reports the same at 2 GiB, beside a plain fsspec copy (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, subprocess_env, write_config

SIZE_MB = 200
BAR_MB = 200.0


def peak_of(tmp_path: Path, *args: str) -> float:
    out = tmp_path / "peak.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.peak", str(out), "tiered.cli", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(out.read_text())


def test_promote_verify_restore_stay_under_200_mb(store: tuple[str, dict], tmp_path: Path) -> None:
    url, options = store
    config_path, cfg = write_config(tmp_path, url, tiered={"storage_options": options})
    step = cfg.local_dir / "50"
    step.mkdir(parents=True)
    with open(step / "weights.bin", "wb") as f:
        for _ in range(SIZE_MB):
            f.write(os.urandom(1 << 20))
    (step / "commit_success.txt").write_text("ok")
    c = str(config_path)
    peaks = {"promote": peak_of(tmp_path, "promote", "50", "--config", c)}
    peaks["verify"] = peak_of(tmp_path, "verify", "50", "--config", c)
    shutil.move(step, tmp_path / "original")  # a fresh node
    peaks["restore"] = peak_of(tmp_path, "restore", "--step", "50", "--config", c)
    restored = (step / "weights.bin").read_bytes()
    assert restored == (tmp_path / "original" / "weights.bin").read_bytes()
    assert all(peak < BAR_MB for peak in peaks.values()), peaks

"""Scenario 6, the physical limit: a local save of the state against ``dd`` with direct I/O on the
same disk.

Other work shares this machine's cores and disk, so the three writers run in interleaved rounds
(the order rotating each round: dd, tiered's local save, the same save with orbax's default data
file size), each figure is a median over the rounds, and the load average is recorded before and
after. Each save is timed to the end of a ``sync`` after it (orbax's writer fsyncs every file it
writes; the ``sync`` catches anything left), and its ``save()`` return is timed on its own: the
part of a save the training loop waits for.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import median, random_state, save_state_locally, state_bytes

WRITERS = ("dd", "tiered", "orbax_default")


def _cpu_s() -> float:
    """CPU seconds of this process and its waited-for children, user and system."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _dd(src: Path, target: Path, count: int) -> None:
    subprocess.run(
        [
            "dd",
            f"if={src}",
            f"of={target}",
            "bs=64M",
            f"count={count}",
            "oflag=direct",
            "conv=fsync",
            "status=none",
        ],
        check=True,
    )
    target.unlink()


def physical_limit(*, size_mb: int, reps: int, work: Path) -> dict[str, Any]:
    state = random_state(size_mb)
    nbytes = state_bytes(state)
    count = max(1, size_mb // 64)
    src, target = work / "dd.src", work / "dd.bin"
    subprocess.run(
        ["dd", "if=/dev/urandom", f"of={src}", "bs=64M", f"count={count}", "status=none"],
        check=True,
    )
    # One save first, not timed: the first one pays for imports and tracing.
    shutil.rmtree(save_state_locally(work / "phys-warm", 1, state).parent)
    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {w: [] for w in WRITERS}
    cpu: dict[str, list[float]] = {w: [] for w in WRITERS}
    save_return: dict[str, list[float]] = {w: [] for w in WRITERS[1:]}
    for rep in range(reps):
        k = rep % len(WRITERS)
        for writer in WRITERS[k:] + WRITERS[:k]:
            c0, t0 = _cpu_s(), time.perf_counter()
            if writer == "dd":
                _dd(src, target, count)
                written = count * 64 * 2**20
            else:
                timings: dict[str, float] = {}
                local = work / f"phys-{writer}-{rep}"
                save_state_locally(
                    local, 1, state, orbax_file_size=writer == "orbax_default", timings=timings
                )
                subprocess.run(["sync"], check=True)
                save_return[writer].append(timings["save_return_s"])
                written = nbytes
            rates[writer].append(written / 1e6 / (time.perf_counter() - t0))
            cpu[writer].append(_cpu_s() - c0)
            if writer != "dd":
                shutil.rmtree(local)
    src.unlink(missing_ok=True)
    dd = median(rates["dd"])
    return {
        "params": {"size_mb": size_mb, "reps": reps},
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "dd_direct_write_mb_s": rates["dd"],
        "orbax_local_save_mb_s": rates["tiered"],
        "orbax_default_files_mb_s": rates["orbax_default"],
        "cpu_s": cpu,
        "save_return_s": save_return,
        "median": {
            "dd_direct_write_mb_s": dd,
            "orbax_local_save_mb_s": median(rates["tiered"]),
            "orbax_default_files_mb_s": median(rates["orbax_default"]),
            "cpu_s": {w: median(v) for w, v in cpu.items()},
            "save_return_s": {w: median(v) for w, v in save_return.items()},
        },
        "ratios": {
            # tiered's local save, as configured by default
            "local_save_fraction_of_disk": median(rates["tiered"]) / dd,
            "orbax_default_files_fraction_of_disk": median(rates["orbax_default"]) / dd,
        },
    }

"""The cost of the manifest's second checksum: promotion with crc32c and xxh3 (tiered today)
beside promotion with crc32c alone (tiered before the xxh3), in one process, interleaved.

"crc32c alone" is the same code with ``Digest.update`` feeding the crc32c only, so nothing
else differs between the two: the same reads, copies, syncs and (on ``gs://``) the same
read-back of the few small OCDBT files whose crc32c tells nothing.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import median, new_bucket, random_state, save_state_locally, settle


@contextlib.contextmanager
def crc32c_only() -> Iterator[None]:
    """tiered's hashing as it was before the xxh3: every ``Digest`` feeds its crc32c alone."""
    from tiered.manifest import Digest

    update = Digest.update

    def crc_only(self: Digest, data: bytes) -> None:
        self._crc32c.update(data)
        self.size += len(data)

    Digest.update = crc_only  # type: ignore[method-assign]
    try:
        yield
    finally:
        Digest.update = update  # type: ignore[method-assign]


def digest_rates(*, mb: int = 256) -> dict[str, float]:
    """GB/s of each checksum alone over bytes in memory (one thread)."""
    import google_crc32c
    import xxhash

    block = os.urandom(8 * 1024 * 1024)
    rounds = max(1, mb * 1024 * 1024 // len(block))
    out = {}
    for name, make in (("crc32c", google_crc32c.Checksum), ("xxh3_128", xxhash.xxh3_128)):
        h = make()
        t0 = time.perf_counter()
        for _ in range(rounds):
            h.update(block)
        out[name] = rounds * len(block) / 1e9 / (time.perf_counter() - t0)
    return out


def hashing(*, size_mb: int, reps: int, work: Path) -> dict[str, Any]:
    from tiered import DurableTier

    step_dir = save_state_locally(work / "hashing-local", 100, random_state(size_mb))
    total = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
    out: dict[str, Any] = {
        "params": {"size_mb": size_mb, "bytes": total, "reps": reps},
        "load_average": {"before": os.getloadavg()[0]},
        "digest_gb_s": digest_rates(),
    }
    for backend in ("file", "gs"):
        rates: dict[str, list[float]] = {"crc32c_only": [], "crc32c_xxh3": []}
        cpu: dict[str, list[float]] = {"crc32c_only": [], "crc32c_xxh3": []}
        for rep in range(reps):
            # Alternate which goes first, so neither always finds a warmer page cache.
            order = ["crc32c_only", "crc32c_xxh3"][:: 1 if rep % 2 == 0 else -1]
            for mode in order:
                root = (
                    f"file://{work}/hashing-durable-{rep}-{mode}"
                    if backend == "file"
                    else f"gs://{new_bucket()}"
                )
                opts = {"token": "anon"} if backend == "gs" else {}
                tier = DurableTier(root, storage_options=opts)
                settle()
                hashing_mode = crc32c_only() if mode == "crc32c_only" else contextlib.nullcontext()
                with hashing_mode:
                    t0, c0 = time.perf_counter(), time.process_time()
                    tier.upload_step(step_dir, step=100)  # manifest, upload, verify, commit
                    if backend == "file":
                        settle()  # the bytes on disk, as the promote scenario times them
                    rates[mode].append(total / 1e6 / (time.perf_counter() - t0))
                    cpu[mode].append(time.process_time() - c0)
        out[backend] = {
            "mb_s": rates,
            "median_mb_s": {k: median(v) for k, v in rates.items()},
            "ratio_new_vs_old": median(rates["crc32c_xxh3"]) / median(rates["crc32c_only"]),
            # This process's CPU seconds per promotion (every thread; the emulator is another
            # process): what the second checksum costs, less exposed to a busy machine.
            "cpu_s": cpu,
            "median_cpu_s": {k: median(v) for k, v in cpu.items()},
        }
    out["load_average"]["after"] = os.getloadavg()[0]
    out["bars"] = {"promotion with the xxh3 at least 0.95x of crc32c alone": 0.95}
    return out

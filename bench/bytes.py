"""``python -m bench bytes``: what a durable step stores, what each node uploads and what a job
of another size reads, tiered against plain orbax's global save of the same state.

For a job of N real JAX processes (``bench/bytes_job.py``; ``jax.distributed`` on the CPU, each
with its own local directory and daemon), each holding a replicated array and its shard of a
sharded one, against the GCS emulator: the array bytes of the durable step under tiered (every
file under the step, counted on the store) and of orbax's ``StandardCheckpointer`` save of the
same state to the same bucket; each daemon's upload (its ``/status`` last promotion); then a job
of the other size restores both, each with its own sharding, and the bytes the emulator served
for each (split by object name) are set against what the restoring processes hold.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    config_mapping,
    daemon,
    drop_bucket,
    free_port,
    gcs_emulator,
    new_bucket,
    write_config,
)

MIB = 24  # each array: the replicated one on every process, the sharded one in all
STEP = 50
RESTORE_SIZE = {2: 4, 4: 2}  # the job of the other size that restores N's step


def _job(mode: str, config: Path, env_for: Any, n: int, orbax_dir: str, mib: int) -> list[dict]:
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.bytes_job",
                mode,
                str(config),
                str(r),
                str(n),
                str(port),
                orbax_dir,
                str(STEP),
                str(mib),
            ],
            cwd=ROOT,
            env={**os.environ, "JAX_PLATFORMS": "cpu", **env_for(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(n)
    ]
    results = []
    for r, p in enumerate(procs):
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"{mode}: process {r} of {n} failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _served(log: Path, bucket: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError), open(log) as f:
        for line in f:
            b, name, size = line.rstrip("\n").split("\t")
            if b == bucket:
                out[name] = out.get(name, 0) + int(size)
    return out


def _sizes(bucket: str, prefix: str) -> dict[str, int]:
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon")
    fs.invalidate_cache()
    found = fs.find(f"{bucket}/{prefix}", detail=True)
    return {name.split("/", 1)[1]: int(info["size"]) for name, info in found.items()}


def _step_bytes(sizes: dict[str, int], step_prefix: str) -> dict[str, int]:
    """Every file of a step, and its array data: the OCDBT data files (``d/``)."""
    files = {k: v for k, v in sizes.items() if k.startswith(step_prefix)}
    data = sum(v for k, v in files.items() if "/d/" in k)
    return {"all_bytes": sum(files.values()), "array_bytes": data, "files": len(files)}


def _nodes(base: Path, url: str, n: int, tag: str) -> tuple[Any, list[str], dict[str, Any]]:
    locals_ = [base / f"{tag}-node{r}" for r in range(n)]
    status = [f"127.0.0.1:{free_port()}" for _ in range(n)]
    mapping = config_mapping(
        base / "unused",
        url,
        checkpoint_period=STEP,
        local_checkpoint_period=STEP,
        tiered={"rescan_seconds": 1, "local_max_to_keep": 2},
    )
    for d in locals_:
        d.mkdir(parents=True)

    def env_for(r: int) -> dict[str, str]:
        return {
            "TIERED_NODE_RANK": str(r),
            "TIERED_NUM_NODES": str(n),
            "TIERED_LOCAL_CHECKPOINT_DIRECTORY": str(locals_[r]),
            "TIERED_STATUS_ADDRESS": status[r],
        }

    return env_for, status, mapping


def _wait_committed(url: str, n: int) -> None:
    from tiered import DurableTier

    durable = DurableTier(url, storage_options={"token": "anon"})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        durable.fs.invalidate_cache()
        if STEP in durable.committed_steps():
            return
        time.sleep(0.1)
    raise RuntimeError(f"step {STEP} never committed with {n} nodes")


def _one(n: int, work: Path, log: Path, mib: int) -> dict[str, Any]:
    bucket = new_bucket()
    url = f"gs://{bucket}/tiered"
    orbax_dir = f"gs://{bucket}/orbax"
    base = work / f"bytes-{n}"
    base.mkdir(parents=True)
    unique = 2 * mib * 2**20
    row: dict[str, Any] = {"processes": n, "unique_state_bytes": unique}

    env_for, status, mapping = _nodes(base, url, n, "save")
    config = write_config(base / "save.yml", mapping)
    with contextlib.ExitStack() as stack:
        for r in range(n):
            cfg = write_config(base / f"save{r}.yml", mapping)
            stack.enter_context(daemon(cfg, env=env_for(r)))
        _job("save", config, env_for, n, orbax_dir, mib)
        _wait_committed(url, n)
        uploads = []
        for r in range(n):
            with urllib.request.urlopen(f"http://{status[r]}/status", timeout=5) as resp:
                last = json.loads(resp.read())["daemon"]["last_promotion"] or {}
            uploads.append(int(last.get("bytes") or 0))

    sizes = _sizes(bucket, "")
    tiered_step = _step_bytes(sizes, f"tiered/bench/{STEP}/")
    if not tiered_step["files"]:  # the run-name level is the layout's; find the step's folder
        tiered_step = _step_bytes(sizes, f"tiered/{STEP}/")
    orbax_step = _step_bytes(sizes, f"orbax/{STEP}/")
    row["tiered_step"] = tiered_step
    row["orbax_step"] = orbax_step
    row["upload_bytes"] = uploads
    mean = sum(uploads) / n
    row["upload_max_bytes"] = max(uploads)
    row["upload_mean_bytes"] = mean
    row["upload_max_over_mean"] = max(uploads) / mean if mean else None

    # A job of the other size restores both: fresh local directories, its own daemons.
    m = RESTORE_SIZE[n]
    env_for, status, mapping = _nodes(base, url, m, "restore")
    config = write_config(base / "restore.yml", mapping)
    before = _served(log, bucket)
    with contextlib.ExitStack() as stack:
        for r in range(m):
            stack.enter_context(
                daemon(write_config(base / f"restore{r}.yml", mapping), env=env_for(r))
            )
        restored = _job("restore", config, env_for, m, orbax_dir, mib)
    after = _served(log, bucket)
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    held = sum(x["held_bytes"] for x in restored)
    t_read = sum(v for k, v in delta.items() if k.startswith("tiered/"))
    o_read = sum(v for k, v in delta.items() if k.startswith("orbax/"))
    row["restore"] = {
        "processes": m,
        "held_bytes_per_process": [x["held_bytes"] for x in restored],
        "held_bytes": held,
        "tiered_served_bytes": t_read,
        "orbax_served_bytes": o_read,
        "tiered_served_per_process_mean": t_read / m,
        "orbax_served_per_process_mean": o_read / m,
        "tiered_over_held": t_read / held,
        "orbax_over_held": o_read / held,
        "tiered_exact": all(x["tiered_exact"] for x in restored),
        "orbax_exact": all(x["orbax_exact"] for x in restored),
        "tiered_step": restored[0]["tiered_step"],
        "tiered_s": max(x["tiered_s"] for x in restored),
        "orbax_s": max(x["orbax_s"] for x in restored),
    }
    row["ratios"] = {
        "tiered_over_orbax_step_array_bytes": (
            tiered_step["array_bytes"] / orbax_step["array_bytes"]
        ),
        "tiered_over_unique": tiered_step["array_bytes"] / unique,
        "orbax_over_unique": orbax_step["array_bytes"] / unique,
        "tiered_over_orbax_restore_bytes": t_read / o_read if o_read else None,
    }
    drop_bucket(bucket)
    import shutil

    shutil.rmtree(base, ignore_errors=True)
    return row


def bytes_scenario(
    *, work: Path, counts: tuple[int, ...] = (2, 4), mib: int = MIB
) -> dict[str, Any]:
    log = work / "gcs-served.log"
    rows = []
    # An emulator of its own, which logs every download: the bytes each restore reads.
    with gcs_emulator(served_log=log):
        for n in counts:
            row = _one(n, work, log, mib)
            print(f"   {n} processes: {json.dumps(row)}", flush=True)
            rows.append(row)
    return {
        "params": {
            "mib_per_array": mib,
            "arrays": "rep: replicated on every process; shard: sharded by rows",
            "step": STEP,
            "restore_sizes": {str(k): v for k, v in RESTORE_SIZE.items() if k in counts},
            "orbax": "ocp.StandardCheckpointer, a global save straight to the bucket",
        },
        "rows": rows,
    }


def render(r: dict[str, Any]) -> list[str]:
    """The docs/benchmarks.md section (``bench/report.py``)."""

    def mib(b: float) -> str:
        return f"{b / 2**20:.1f}"

    mb = r["params"]["mib_per_array"]
    out = [
        f"A job of N real JAX processes (`bench/bytes_job.py`, `jax.distributed` on the CPU, each "
        f"with its own local directory and daemon), each holding a {mb} MiB float32 array "
        f"replicated on every process and its shard of a {mb} MiB array sharded by rows, saves "
        "one step with `tiered.CheckpointManager` and the same state with plain orbax's global "
        "save (`ocp.StandardCheckpointer` straight to the bucket) to the GCS emulator. Step "
        "bytes are the OCDBT data files under each step, listed on the store; uploads are each "
        "daemon's last promotion. Then a fresh job of the other size (fresh local directories, "
        "its own daemons) restores both with its own sharding, and the emulator counts what it "
        "served for each (every download logged with its object name). The emulator cannot "
        "tell the processes apart, so the per-process figure is the job's total over its "
        "processes. Both restores were checked bit for bit against the saved values.",
        "",
        "| processes | unique state (MiB) | durable step, tiered (MiB) | orbax global save (MiB) "
        "| tiered / orbax | tiered / unique | upload per node, max / mean (MiB) | restored by | "
        "held by the restoring job (MiB) | served for tiered's restore (MiB) | served for "
        "orbax's (MiB) | tiered / orbax | per process, tiered / orbax (MiB) | bit-exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        x, q = row["restore"], row["ratios"]
        out.append(
            f"| {row['processes']} | {mib(row['unique_state_bytes'])} | "
            f"{mib(row['tiered_step']['array_bytes'])} | {mib(row['orbax_step']['array_bytes'])} | "
            f"{q['tiered_over_orbax_step_array_bytes']:.2f}x | {q['tiered_over_unique']:.2f}x | "
            f"{mib(row['upload_max_bytes'])} / {mib(row['upload_mean_bytes'])} | "
            f"{x['processes']} processes | {mib(x['held_bytes'])} | "
            f"{mib(x['tiered_served_bytes'])} | {mib(x['orbax_served_bytes'])} | "
            f"{q['tiered_over_orbax_restore_bytes']:.2f}x | "
            f"{mib(x['tiered_served_per_process_mean'])} / "
            f"{mib(x['orbax_served_per_process_mean'])} | "
            f"{'yes' if x['tiered_exact'] and x['orbax_exact'] else '**no**'} |"
        )
    out += [
        "",
        "Every process saves the replicas it holds (right for the local tier: each node "
        "restores alone) and every node uploads its own database, so the durable step holds "
        "the replicated array once per node; the upload is even (max / mean at most "
        f"{max(row['upload_max_over_mean'] for row in r['rows']):.2f}) because every node "
        "holds the same amount. A job of another size downloads the whole step "
        "onto every node before orbax reads it locally, where plain orbax reads each "
        "process's chunks in place (the replicated array whole on every process, plus its "
        "shard). orbax's default save compresses with zstd (about 8% on random normal "
        "float32); tiered's local saves are uncompressed unless `tiered.local_compression` "
        "is on, which accounts for part of the step ratio. The fix is designed, not built: "
        'docs/multinode.md, "Each byte once: the planned dedup".',
    ]
    return out

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
import shutil
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
DATA_FILE = "4Mi"
"""``tiered.local_data_file_size``: chunks are at most this size, so the one replicated array
of this state is six keys, as a model's many arrays are many keys (the default, 256Mi, would
make the 24 MiB array one key, owned by one node)."""


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
        tiered={"rescan_seconds": 1, "local_max_to_keep": 2, "local_data_file_size": DATA_FILE},
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

    options = {"token": "anon"} if url.startswith("gs://") else {}
    durable = DurableTier(url, storage_options=options)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        durable.fs.invalidate_cache()
        if STEP in durable.committed_steps():
            return
        time.sleep(0.1)
    raise RuntimeError(f"step {STEP} never committed with {n} nodes")


def _walk(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _one(n: int, work: Path, log: Path, mib: int, backend: str) -> dict[str, Any]:
    """One job of ``n`` processes on one backend: the step's bytes, the uploads, and the
    restore by a job of the other size."""
    base = work / f"bytes-{backend}-{n}"
    base.mkdir(parents=True)
    if backend == "gs":
        bucket = new_bucket()
        url, orbax_dir = f"gs://{bucket}/tiered", f"gs://{bucket}/orbax"
    else:
        store = base / "store"
        url, orbax_dir = f"file://{store}/tiered", str(store / "orbax")
    unique = 2 * mib * 2**20
    row: dict[str, Any] = {}

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

    sizes = _sizes(bucket, "") if backend == "gs" else _walk(store)
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
    before = _served(log, bucket) if backend == "gs" else {}
    with contextlib.ExitStack() as stack:
        for r in range(m):
            cfg = write_config(base / f"restore{r}.yml", mapping)
            stack.enter_context(daemon(cfg, env=env_for(r)))
        restored = _job("restore", config, env_for, m, orbax_dir, mib)
    held = sum(x["held_bytes"] for x in restored)
    out: dict[str, Any] = {
        "processes": m,
        "held_bytes_per_process": [x["held_bytes"] for x in restored],
        "held_bytes": held,
        "tiered_exact": all(x["tiered_exact"] for x in restored),
        "orbax_exact": all(x["orbax_exact"] for x in restored),
        "tiered_step": restored[0]["tiered_step"],
        "tiered_s": max(x["tiered_s"] for x in restored),
        "orbax_s": max(x["orbax_s"] for x in restored),
    }
    if backend == "gs":
        # What the store served, split by object name (the two restores may overlap).
        after = _served(log, bucket)
        delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        t_read = sum(v for k, v in delta.items() if k.startswith("tiered/"))
        o_read = sum(v for k, v in delta.items() if k.startswith("orbax/"))
        out["tiered_per_process"] = out["orbax_per_process"] = None
    else:
        # Each process's own reads (rchar), the local tier's included: on ``file://`` tiered
        # copies the step into the local tier, verifies it, and orbax then loads it from there.
        out["tiered_per_process"] = [x["tiered_read_bytes"] for x in restored]
        out["orbax_per_process"] = [x["orbax_read_bytes"] for x in restored]
        t_read, o_read = sum(out["tiered_per_process"]), sum(out["orbax_per_process"])
        out["tiered_max_process_over_held"] = max(
            t / x["held_bytes"] for t, x in zip(out["tiered_per_process"], restored, strict=True)
        )
        out["orbax_max_process_over_held"] = max(
            o / x["held_bytes"] for o, x in zip(out["orbax_per_process"], restored, strict=True)
        )
    out.update(
        tiered_read_bytes=t_read,
        orbax_read_bytes=o_read,
        tiered_read_per_process_mean=t_read / m,
        orbax_read_per_process_mean=o_read / m,
        tiered_over_held=t_read / held,
        orbax_over_held=o_read / held,
    )
    row["restore"] = out
    row["ratios"] = {
        "tiered_over_orbax_step_array_bytes": (
            tiered_step["array_bytes"] / orbax_step["array_bytes"]
        ),
        "tiered_over_unique": tiered_step["array_bytes"] / unique,
        "orbax_over_unique": orbax_step["array_bytes"] / unique,
        "tiered_over_orbax_restore_bytes": t_read / o_read if o_read else None,
    }
    if backend == "gs":
        drop_bucket(bucket)
    shutil.rmtree(base, ignore_errors=True)
    return row


BACKENDS = ("gs", "file")


def bytes_scenario(
    *, work: Path, counts: tuple[int, ...] = (2, 4), mib: int = MIB
) -> dict[str, Any]:
    log = work / "gcs-served.log"
    rows = []
    # An emulator of its own, which logs every download: the bytes each restore reads.
    with gcs_emulator(served_log=log):
        for n in counts:
            row: dict[str, Any] = {"processes": n, "unique_state_bytes": 2 * mib * 2**20}
            for backend in BACKENDS:
                row[backend] = _one(n, work, log, mib, backend)
                print(f"   {n} processes, {backend}: {json.dumps(row[backend])}", flush=True)
            rows.append(row)
    return {
        "params": {
            "mib_per_array": mib,
            "arrays": "rep: replicated on every process; shard: sharded by rows",
            "step": STEP,
            "local_data_file_size": DATA_FILE,
            "restore_sizes": {str(k): v for k, v in RESTORE_SIZE.items() if k in counts},
            "orbax": "ocp.StandardCheckpointer, a global save straight to the store",
            "restore_bytes": {
                "gs": "served by the emulator, split by object name",
                "file": "each process's rchar (/proc/self/io) around each restore",
            },
        },
        "rows": rows,
    }


def render(r: dict[str, Any]) -> list[str]:
    """The docs/benchmarks.md section (``bench/report.py``)."""

    def mib(b: float) -> str:
        return f"{b / 2**20:.1f}"

    mb = r["params"]["mib_per_array"]
    rows = r["rows"]
    out = [
        f"A job of N real JAX processes (`bench/bytes_job.py`, `jax.distributed` on the CPU, each "
        f"with its own local directory and daemon), each holding a {mb} MiB float32 array "
        f"replicated on every process and its shard of a {mb} MiB array sharded by rows, saves "
        "one step with `tiered.CheckpointManager` and the same state with plain orbax's global "
        "save (`ocp.StandardCheckpointer` straight to the store). Step bytes are the OCDBT data "
        "files under each step, listed on the store; uploads are each daemon's last promotion. "
        "Then a fresh job of the other size (fresh local directories, its own daemons) restores "
        "both with its own sharding, checked bit for bit against the saved values. Restore "
        "bytes: on the GCS emulator, what it served for each (every download logged with its "
        "object name; it cannot tell the processes apart, so the per-process figure is the "
        "job's total over its processes); on `file://`, each process's own reads around each "
        "restore (`/proc/self/io` rchar), the local tier's included.",
        "",
    ]
    for backend, name in (("gs", "GCS emulator"), ("file", "`file://`")):
        if not all(backend in row for row in rows):
            continue
        per = "mean" if backend == "gs" else "max"
        out += [
            f"**{name}**",
            "",
            "| processes | unique state (MiB) | durable step, tiered (MiB) | orbax global save "
            "(MiB) | tiered / orbax | tiered / unique | upload per node, max / mean (MiB) | "
            "restored by | held per restoring process (MiB) | restore read, tiered (MiB) | "
            f"restore read, orbax (MiB) | tiered / orbax | per process ({per}), tiered / orbax "
            "(MiB) | read / held, tiered / orbax | bit-exact |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            b = row[backend]
            x, q = b["restore"], b["ratios"]
            if backend == "gs":
                t_per, o_per = x["tiered_read_per_process_mean"], x["orbax_read_per_process_mean"]
                t_held, o_held = x["tiered_over_held"], x["orbax_over_held"]
            else:
                t_per, o_per = max(x["tiered_per_process"]), max(x["orbax_per_process"])
                t_held = x["tiered_max_process_over_held"]
                o_held = x["orbax_max_process_over_held"]
            out.append(
                f"| {row['processes']} | {mib(row['unique_state_bytes'])} | "
                f"{mib(b['tiered_step']['array_bytes'])} | "
                f"{mib(b['orbax_step']['array_bytes'])} | "
                f"{q['tiered_over_orbax_step_array_bytes']:.2f}x | {q['tiered_over_unique']:.2f}x"
                f" | {mib(b['upload_max_bytes'])} / {mib(b['upload_mean_bytes'])} | "
                f"{x['processes']} processes | {mib(max(x['held_bytes_per_process']))} | "
                f"{mib(x['tiered_read_bytes'])} | {mib(x['orbax_read_bytes'])} | "
                f"{q['tiered_over_orbax_restore_bytes']:.2f}x | {mib(t_per)} / {mib(o_per)} | "
                f"{t_held:.2f}x / {o_held:.2f}x | "
                f"{'yes' if x['tiered_exact'] and x['orbax_exact'] else '**no**'} |"
            )
        out.append("")
    worst = max(row[b]["upload_max_over_mean"] for row in rows for b in BACKENDS if b in row)
    out += [
        "Every process saves the replicas it holds (right for the local tier: each node "
        "restores alone), but each OCDBT key of the durable step is uploaded by one of the "
        'nodes that hold it (docs/multinode.md, "Each byte once"), so the step holds the '
        f"replicated array once and the upload is even (max / mean at most {worst:.2f}). "
        "Local saves here use `tiered.local_data_file_size: "
        f"{r['params'].get('local_data_file_size', '256Mi')}`, so the replicated array is "
        "several chunks, as a model's state is many arrays. A job of another size reads only "
        'what it needs (docs/multinode.md, "What a topology change costs"): each process '
        "takes from the merged step the OCDBT keys of the chunks its shards cover, each value "
        "checked against the step's key index as it is read, into a staged copy that orbax "
        "then loads; plain orbax reads the same chunks in place. Read / held is the restore's "
        "reads over what the process holds: on the GCS emulator what the store served (tiered "
        "reads each needed chunk once), on `file://` the process's own reads, where tiered "
        "reads each chunk twice (from the store, checking it, then from the staged copy) and "
        "plain orbax once, unchecked. orbax's default save compresses with zstd (about 8% on "
        "random normal float32); tiered's local saves are uncompressed unless "
        "`tiered.local_compression` is on, which accounts for part of the step ratio and for "
        "plain orbax reading less than a process holds.",
    ]
    return out

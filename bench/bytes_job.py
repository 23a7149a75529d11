"""One process of the bytes benchmark's multi-process JAX job.

    python -m bench.bytes_job MODE CONFIG RANK NPROCS PORT ORBAX_DIR STEP MIB

The state: ``rep``, MIB MiB of float32 replicated on every process, and ``shard``, MIB MiB in
all, sharded by rows. Both are the same numbers at every job size (seeded), so a job of another
size can check what it restored bit for bit. MODE ``save``: saves STEP with
``tiered.CheckpointManager`` (waits for the local commit) and with plain orbax
(``ocp.StandardCheckpointer``) straight to ORBAX_DIR/STEP. MODE ``restore``: restores the tiered
step through ``tiered.CheckpointManager``, then plain orbax's from ORBAX_DIR/STEP, both with this
job's sharding. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

from absl import flags

flags.FLAGS(sys.argv[:1])

import jax  # noqa: E402
import numpy as np  # noqa: E402

COLS = 1024


def read_chars() -> int:
    """Bytes this process has read through read calls so far (``/proc/self/io`` rchar): on
    ``file://`` every byte a restore reads from the store and from the local tier."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def global_values(mib: int) -> dict[str, np.ndarray]:
    rows = mib * 2**20 // 4 // COLS
    return {
        "rep": np.random.default_rng(1).standard_normal((rows, COLS), dtype=np.float32),
        "shard": np.random.default_rng(2).standard_normal((rows, COLS), dtype=np.float32),
    }


def main() -> int:
    mode, config, rank, nprocs, port, orbax_dir, step, mib = sys.argv[1:9]
    rank_i, n, step_i = int(rank), int(nprocs), int(step)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=n, process_id=rank_i, initialization_timeout=300
    )
    import orbax.checkpoint as ocp

    import tiered

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    P = jax.sharding.PartitionSpec
    shardings = {
        "rep": jax.sharding.NamedSharding(mesh, P()),
        "shard": jax.sharding.NamedSharding(mesh, P("data")),
    }
    values = global_values(int(mib))
    abstract = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in values.items()
    }
    out: dict = {"rank": rank_i, "mode": mode}
    if mode == "save":
        state = {
            k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
            for k, v in values.items()
        }
        with tiered.CheckpointManager(config, install_signal_handlers=False) as mgr:
            mgr.save(step_i, state, force=True)
            mgr.wait_until_finished()
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(f"{orbax_dir}/{step_i}", state)
        ckptr.wait_until_finished()
        ckptr.close()
    else:
        held = 0
        for k in values:
            for s in abstract[k].sharding.addressable_devices_indices_map(values[k].shape).values():
                held += values[k][s].nbytes
        out["held_bytes"] = held

        def exact(restored: dict) -> bool:
            return all(
                np.array_equal(np.asarray(sh.data), values[k][sh.index])
                for k in values
                for sh in restored[k].addressable_shards
            )

        with tiered.CheckpointManager(config, install_signal_handlers=False) as mgr:
            t0, r0 = time.perf_counter(), read_chars()
            got = mgr.restore(abstract)
            out["tiered_s"] = time.perf_counter() - t0
            out["tiered_read_bytes"] = read_chars() - r0
            out["tiered_step"] = got.step if got else None
            out["tiered_exact"] = bool(got) and exact(got.state)
            mgr.wait_until_finished()
        print("TIERED_DONE", flush=True)
        # The parent splits the store's served bytes by object name, so the phases can overlap.
        ckptr = ocp.StandardCheckpointer()
        t0, r0 = time.perf_counter(), read_chars()
        restored = ckptr.restore(f"{orbax_dir}/{step_i}", abstract)
        out["orbax_s"] = time.perf_counter() - t0
        out["orbax_read_bytes"] = read_chars() - r0
        out["orbax_exact"] = exact(restored)
        ckptr.close()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

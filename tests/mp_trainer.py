"""One process of a multi-process JAX job using ``tiered.CheckpointManager``.

    python tests/mp_trainer.py CONFIG RANK NPROCS COORDINATOR_PORT STEPS

The node's rank, node count and local directory come from ``TIERED_NODE_RANK``,
``TIERED_NUM_NODES`` and ``TIERED_LOCAL_CHECKPOINT_DIRECTORY``, as on a cluster. The state is a
(64, 8) float32 matrix sharded by rows over the processes (the same shape on every topology,
so a step restores into a job of another size), plus a replicated vector;
at step s every value is a known function of s, so a restore is checked exactly.

Prints ``RESTORED step=N source=TIER rows=LO:HI ok=True`` or ``FRESH``, then ``DONE step=N``.
With ``MP_HOLD_FILE``, it keeps running after its last save until that file exists.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from absl import flags

flags.FLAGS(sys.argv[:1])

import jax  # noqa: E402
import numpy as np  # noqa: E402

CONFIG, RANK, NPROCS, PORT, STEPS = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    sys.argv[4],
    int(sys.argv[5]),
)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    f"127.0.0.1:{PORT}", num_processes=NPROCS, process_id=RANK, initialization_timeout=120
)

import tiered  # noqa: E402

logging.basicConfig()  # warnings, as before; and what a restore in part read (the tests check it)
logging.getLogger("tiered.storage.partial").setLevel(logging.INFO)


def values(step: int) -> dict[str, np.ndarray]:
    w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8) * 0.25 + step
    return {"w": w, "b": np.full((4,), step, dtype=np.float32)}


def main() -> int:
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    # MP_SHARD=columns: another mesh layout for the same processes (w split by columns)
    spec = ("data",) if os.environ.get("MP_SHARD", "rows") == "rows" else (None, "data")
    shardings = {
        "w": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)),
        "b": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    }

    def state_at(step: int) -> dict[str, jax.Array]:
        full = values(step)
        return {
            k: jax.make_array_from_callback(full[k].shape, shardings[k], lambda i, k=k: full[k][i])
            for k in full
        }

    with tiered.CheckpointManager(CONFIG) as mgr:
        restored = mgr.restore(state_at(0))
        start = 0
        if restored is None:
            print("FRESH", flush=True)
        else:
            want = values(restored.step)
            ok = True
            rows = ""
            for name, arr in restored.state.items():
                for shard in arr.addressable_shards:
                    ok &= bool(np.array_equal(np.asarray(shard.data), want[name][shard.index]))
                    if name == "w":
                        axis = 0 if os.environ.get("MP_SHARD", "rows") == "rows" else 1
                        lo, hi, _ = shard.index[axis].indices(arr.shape[axis])
                        rows = f"{lo}:{hi}"
            print(
                f"RESTORED step={restored.step} source={restored.source} rows={rows} ok={ok}",
                flush=True,
            )
            start = restored.step + 1
        step = start - 1
        for step in range(start, STEPS):
            mgr.save(step, state_at(step))
        mgr.wait_until_finished()
        hold = os.environ.get("MP_HOLD_FILE")
        if hold:  # still running (the lock held) until the test lets go: a node dies meanwhile
            open(f"{hold}.ready-{RANK}", "w").close()
            deadline = time.monotonic() + 180
            while not os.path.exists(hold) and time.monotonic() < deadline:
                time.sleep(0.1)
    print(f"DONE step={step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

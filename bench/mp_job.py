"""One process of the scaling benchmark's multi-process JAX job.

    python -m bench.mp_job CONFIG RANK NPROCS PORT PER_NODE_MB STEP

Restores what the nodes agree on (timed), then saves ``STEP`` with ``tiered.CheckpointManager``
(a state of PER_NODE_MB of random float32 per process, sharded by rows) and waits for the local
commit. Prints one JSON line: rank, restore seconds and source, save seconds.
"""

from __future__ import annotations

import json
import sys
import time

from absl import flags

flags.FLAGS(sys.argv[:1])

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main() -> int:
    config, rank, nprocs, port, per_node_mb, step = sys.argv[1:7]
    rank_i, n = int(rank), int(nprocs)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=n, process_id=rank_i, initialization_timeout=300
    )
    import tiered

    rows_per_node = int(per_node_mb) * 2**20 // 4 // 1024
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    shape = (rows_per_node * n, 1024)
    rng = np.random.default_rng(rank_i)
    local = rng.standard_normal((rows_per_node, 1024), dtype=np.float32)
    state = {
        "w": jax.make_array_from_callback(
            shape, sharding, lambda idx: local[: (idx[0].stop or shape[0]) - (idx[0].start or 0)]
        )
    }
    out: dict = {"rank": rank_i}
    with tiered.CheckpointManager(config, install_signal_handlers=False) as mgr:
        t0 = time.perf_counter()
        restored = mgr.restore(state)
        out["restore_s"] = time.perf_counter() - t0
        out["restored"] = restored.step if restored else None
        out["source"] = restored.source if restored else None
        t0 = time.perf_counter()
        mgr.save(int(step), state, force=True)
        mgr.wait_until_finished()
        out["save_s"] = time.perf_counter() - t0
        out["saved_at"] = time.time()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

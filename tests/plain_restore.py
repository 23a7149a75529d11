"""Plain orbax, no tiered code: restore a step that ``tests/mp_trainer.py`` saved (on any number
of processes) in a job of NPROCS processes, each with DEVICES host devices, and check every
value it holds.

    python tests/plain_restore.py DIRECTORY STEP NPROCS RANK PORT DEVICES

Prints ``PLAIN step=N rows=LO:HI ok=True``.
"""

from __future__ import annotations

import os
import sys

DIRECTORY, STEP, NPROCS, RANK, PORT, DEVICES = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    int(sys.argv[4]),
    sys.argv[5],
    int(sys.argv[6]),
)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"

from absl import flags  # noqa: E402

flags.FLAGS(sys.argv[:1])

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

if NPROCS > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{PORT}", num_processes=NPROCS, process_id=RANK, initialization_timeout=120
    )

mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
P = jax.sharding.PartitionSpec
w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8) * 0.25 + STEP
b = np.full((4,), STEP, dtype=np.float32)
target = {
    "w": jax.ShapeDtypeStruct(
        w.shape, w.dtype, sharding=jax.sharding.NamedSharding(mesh, P("data"))
    ),
    "b": jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=jax.sharding.NamedSharding(mesh, P())),
}
with ocp.CheckpointManager(DIRECTORY, options=ocp.CheckpointManagerOptions(create=False)) as mgr:
    restored = mgr.restore(STEP, args=ocp.args.StandardRestore(target))
ok = True
rows = []
for name, want in (("w", w), ("b", b)):
    for shard in restored[name].addressable_shards:
        ok &= bool(np.array_equal(np.asarray(shard.data), want[shard.index]))
        if name == "w":
            rows.append(f"{shard.index[0].start}:{shard.index[0].stop}")
print(f"PLAIN step={STEP} rows={','.join(rows)} ok={ok}", flush=True)

"""A MaxText-style training process using orbax's multi-tier checkpointing, unmodified.

    eval "$(tiered jax-env ...)"; python tests/mtc_client.py LOCAL_DIR STEPS [NPROCS]

It calls ``initialize_multi_tier_checkpointing`` (which waits for the daemon's
``jax-init-info.txt``, writes ``replicator.yaml`` and takes the ``.restore`` entry), then trains
with ``ReplicatorCheckpointManager``, saving locally every 10 steps with a backup every 50. The
state is one float32 vector of 64 values, sharded over the NPROCS processes (default 1).
``jax.distributed`` is not patched: the process count comes from the environment that
``tiered jax-env`` prints, as it would for MaxText on a plain VM. The only concession to running
on CPUs of one machine is the gloo CPU collectives.

Prints ``RESTORED step=N w=[...]`` (this process's shard) or ``FRESH``, then ``DONE step=N``.
With ``MP_HOLD_FILE``, it keeps running after its last save until that file exists.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags

flags.FLAGS(sys.argv[:1])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from etils import epath  # noqa: E402
from orbax.checkpoint.experimental.emergency.multi_tier_checkpointing import (  # noqa: E402
    initialization,
)
from orbax.checkpoint.experimental.emergency.multi_tier_checkpointing import (  # noqa: E402
    replicator_checkpoint_manager as rcm,
)

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def state_at(step: int) -> np.ndarray:
    return np.arange(64, dtype=np.float32) * 0.5 + step


def main() -> int:
    local = epath.Path(sys.argv[1])
    steps = int(sys.argv[2])
    initialization.initialize_multi_tier_checkpointing(
        local,
        backup_interval_steps=50,
        run_name="mtc-job",
        use_mtc_process_ids=True,
        jax_initialization_timeout_seconds=60,
    )
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    mgr = rcm.ReplicatorCheckpointManager(
        local,
        options=rcm.ReplicatorCheckpointManagerOptions(save_interval_steps=10),
        global_mesh=mesh,
    )
    start = 0
    latest = mgr.latest_step()
    if latest is not None:
        abstract = {"w": jax.ShapeDtypeStruct((64,), jnp.float32, sharding=sharding)}
        restored = mgr.restore(
            latest, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(abstract))
        )
        w = restored["w"] if "w" in restored else restored["state"]["w"]
        (shard,) = w.addressable_shards
        lo = shard.index[0].start or 0
        print(f"SHARD {lo}", flush=True)
        print(f"RESTORED step={latest} w={json.dumps(np.asarray(shard.data).tolist())}", flush=True)
        start = latest + 1
    else:
        print("FRESH", flush=True)
    step = start - 1
    for step in range(start, steps):
        full = state_at(step)
        w = jax.make_array_from_callback(full.shape, sharding, lambda i, full=full: full[i])
        state = {"w": w}
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
    mgr.wait_until_finished()
    hold = os.environ.get("MP_HOLD_FILE")
    if hold:  # still running (the coordinator up) until the test lets go: a node dies meanwhile
        open(f"{hold}.ready-{jax.process_index()}", "w").close()
        deadline = time.monotonic() + 180
        while not os.path.exists(hold) and time.monotonic() < deadline:
            time.sleep(0.1)
    mgr.close()
    print(f"DONE step={step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

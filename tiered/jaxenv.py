"""The environment a trainer needs for ``jax.distributed`` to start off GKE.

orbax's multi-tier initialization (``_initialize_jax_from_mtc``) calls
``jax.distributed.initialize`` with only the process id and the coordinator address from
``jax-init-info.txt``. JAX then needs the number of processes, and takes it from the first
cluster environment it detects (``jax._src.clusters``): Slurm, Open MPI, a Kubernetes indexed
Job (with the ``kubernetes`` package and permission to read its pod), or Cloud TPU metadata.
Nothing else is read: JAX has no variable for the process count alone, and orbax reads only two
lines of ``jax-init-info.txt``.

On a TPU VM or a GKE TPU slice, JAX detects its cluster and nothing is needed. Elsewhere (plain
VMs, GPU hosts, a laptop, a Kubernetes JobSet without pod introspection), ``tiered jax-env``
prints the smallest environment JAX's Slurm detection accepts, built from the same node rank
and count the daemon uses. The variables describe this job, not a Slurm cluster: JAX takes the
process count and id from them, and the coordinator address comes from ``jax-init-info.txt``
(or ``JAX_COORDINATOR_ADDRESS``) as before. Slurm's detection also narrows each process to one
local device (``SLURM_LOCALID``); on a host with several accelerators and one process, pass
``local_devices`` so that ``JAX_LOCAL_DEVICE_IDS`` keeps them all visible.

A preemption save needs JAX's preemption service: ``jax.distributed.initialize`` starts it
(``jax_enable_preemption_service``, on by default, set here so that an image cannot have turned
it off), and its notifier listens to SIGTERM only, on CPU, GPU and TPU hosts alike (off Google's
own schedulers). SIGINT never reaches it: Ctrl+C becomes SIGTERM under ``tiered run``. The sync
point it sets is the step after the last one the trainer reported: a SIGTERM caught before a
resumed run's first reported step (during restore or compilation) sets it at step 1, and that
run never reaches it (the launcher's grace period is the answer).
"""

from __future__ import annotations

import shlex
import zlib
from collections.abc import Sequence

from tiered.errors import ConfigError


def jax_env(
    *,
    rank: int,
    nodes: int,
    coordinator: str | None,
    job: str,
    local_devices: Sequence[int] = (),
) -> dict[str, str]:
    """The variables, in the order they are printed."""
    if nodes < 1 or not 0 <= rank < nodes:
        raise ConfigError(f"node rank {rank} must be in 0..{nodes - 1}")
    host = coordinator.rpartition(":")[0].strip("[]") if coordinator else "localhost"
    env = {
        # any number: Slurm's detection derives a default coordinator port from it
        "SLURM_JOB_ID": str(zlib.crc32(job.encode()) % 10**6 + 1),
        "SLURM_NTASKS": str(nodes),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": "0",
        "SLURM_STEP_NODELIST": host or "localhost",
        # SIGTERM -> MaxText's enable_autocheckpoint save (multihost_utils'
        # reached_preemption_sync_point)
        "JAX_ENABLE_PREEMPTION_SERVICE": "true",
    }
    if coordinator:
        env["JAX_COORDINATOR_ADDRESS"] = coordinator
    if local_devices:
        env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(d) for d in local_devices)
    return env


def render(env: dict[str, str], *, fmt: str = "sh") -> str:
    """``sh``: ``export K=V`` lines for ``eval``; ``env``: ``K=V`` lines (Docker ``--env-file``,
    systemd ``EnvironmentFile``, a Kubernetes ``envFrom`` ConfigMap)."""
    if fmt == "sh":
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    return "".join(f"{k}={v}\n" for k, v in env.items())

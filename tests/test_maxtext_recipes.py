"""What docs/maxtext.md promises, without MaxText itself (``make test-maxtext`` runs the real
one): reading a durable step the way MaxText's ``load_full_state_path`` does, ``tiered
jax-env``, and the status and pruning fixes found with MaxText."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiered import DurableTier, LocalTier, promote_step
from tiered.jaxenv import jax_env

from conftest import DaemonProc, run_module, subprocess_env, wait_for, write_config
from helpers import Trainer, example_state


def tiered(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_module("tiered.cli", *args, env=env)


def mtc_style_save(local_dir: Path, step: int, state: dict) -> None:
    """A step laid out as orbax's multi-tier manager (and so MaxText) lays it out: the pytree
    is the item named ``state``."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(
        str(local_dir), options=ocp.CheckpointManagerOptions(create=True)
    ) as mgr:
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
        mgr.wait_until_finished()


def test_export_item_reads_the_way_load_full_state_path_does(tmp_path: Path) -> None:
    from orbax.checkpoint import v1 as ocp_v1

    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    state = {"w": np.arange(1000, dtype=np.float32) * 0.25, "b": np.ones(3, np.int32)}
    mtc_style_save(cfg.local_dir, 50, state)
    local, durable = LocalTier(cfg.local_dir), DurableTier(cfg.durable_url)
    promote_step(local, durable, 50)
    local.delete_step(50)  # a fresh node: the step is on the durable tier only
    # MaxText's own call (orbax v1 load) refuses the item inside the durable step ...
    with pytest.raises(Exception, match="valid Orbax checkpoint"):
        ocp_v1.load(tmp_path / "durable" / "50" / "state", state)
    # ... and reads what `tiered export --item state` writes.
    out = tiered(
        "export", "50", str(tmp_path / "exported"), "--item", "state", "--config", str(config_path)
    )
    assert out.returncode == 0, out.stderr
    restored = ocp_v1.load(tmp_path / "exported", state)
    for key in state:
        np.testing.assert_array_equal(np.asarray(restored[key]), state[key])
    # a second export to the same place is refused; an unknown item names the ones there are
    again = tiered(
        "export", "50", str(tmp_path / "exported"), "--item", "state", "--config", str(config_path)
    )
    assert again.returncode == 2 and "not an empty directory" in again.stderr
    bad = tiered(
        "export", "50", str(tmp_path / "x"), "--item", "items", "--config", str(config_path)
    )
    assert bad.returncode == 2 and "has no item 'items' (it has state)" in bad.stderr


def test_jax_env_is_what_jax_distributed_takes(tmp_path: Path) -> None:
    """The printed environment starts jax.distributed with the process count JAX was missing,
    with only the id and coordinator passed, as orbax's multi-tier start does."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    code = (
        "import jax\n"
        "jax.distributed.initialize(process_id=0, coordinator_address=" + repr(coordinator) + ")\n"
        "print('PROCS', jax.process_count(), jax.process_index())\n"
        "jax.distributed.shutdown()\n"
    )
    env = {**subprocess_env(), **jax_env(rank=0, nodes=1, coordinator=coordinator, job="t")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert "PROCS 1 0" in out.stdout, out.stderr[-2000:]
    bare = {k: v for k, v in subprocess_env().items() if not k.startswith("SLURM_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=bare, timeout=120
    )
    assert out.returncode != 0 and "Number of processes must be defined" in out.stderr
    config_path, _ = write_config(tmp_path, f"file://{tmp_path}/durable")
    printed = tiered(
        "jax-env",
        "--config",
        str(config_path),
        "--nodes",
        "4",
        "--rank",
        "3",
        "--local-devices",
        "0,1",
    )
    assert (
        "export SLURM_NTASKS=4\n" in printed.stdout and "export SLURM_PROCID=3\n" in printed.stdout
    )
    assert "export JAX_LOCAL_DEVICE_IDS=0,1\n" in printed.stdout
    assert tiered("jax-env", "--config", str(config_path), "--rank", "5").returncode == 2


def test_jax_env_keeps_the_preemption_service_that_turns_sigterm_into_a_save() -> None:
    """MaxText's enable_autocheckpoint saves when JAX's preemption notifier saw SIGTERM: in the
    printed environment it does, even where the image had turned the service off."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    code = (
        "import os, signal, time, jax\n"
        "from jax.experimental import multihost_utils as mu\n"
        "jax.distributed.initialize(process_id=0, coordinator_address=" + repr(coordinator) + ")\n"
        "for step in range(10, 400):\n"
        "    if step == 12: os.kill(os.getpid(), signal.SIGTERM)\n"
        "    if mu.reached_preemption_sync_point(step): print('SYNC', step); break\n"
        "    time.sleep(0.02)\n"
    )
    base = {**subprocess_env(), "JAX_ENABLE_PREEMPTION_SERVICE": "false"}
    env = {**base, **jax_env(rank=0, nodes=1, coordinator=coordinator, job="t")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert "SYNC" in out.stdout, out.stderr[-2000:]
    assert int(out.stdout.split()[1]) > 12  # the step after the last one reported


def test_status_finds_a_daemon_started_with_another_address(tmp_path: Path) -> None:
    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        # the user's shell has another status_address than the daemon's
        out = tiered(
            "status",
            "--json",
            "--config",
            str(config_path),
            env={"TIERED_STATUS_ADDRESS": "127.0.0.1:9"},
        )
        status = json.loads(out.stdout)
        assert status["daemon"]["running"] is True and status["daemon"]["pid"] == daemon.proc.pid
    finally:
        daemon.terminate()


def test_local_retention_does_not_wait_for_a_timer(tmp_path: Path) -> None:
    config_path, cfg = write_config(
        tmp_path,
        f"file://{tmp_path}/durable",
        checkpoint_period=1000,
        tiered={"local_max_to_keep": 3, "prune_interval_seconds": 3600, "rescan_seconds": 3600},
    )
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        trainer = Trainer(cfg.local_dir)
        for step in (10, 20, 30, 40, 50):
            trainer.save(step, example_state())
        trainer.close()
        wait_for(
            lambda: LocalTier(cfg.local_dir).committed_steps() == [30, 40, 50],
            timeout=15,
            what=daemon.log(),
        )
    finally:
        daemon.terminate()
    assert os.path.isdir(cfg.local_dir)

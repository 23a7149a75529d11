"""orbax's multi-tier protocol against the real daemon.

The first test runs an unmodified orbax client end to end (``tests/mtc_client.py``:
``initialize_multi_tier_checkpointing`` plus ``ReplicatorCheckpointManager`` in one JAX CPU
process). The others drive single protocol steps with orbax's own client functions.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from orbax.checkpoint.experimental.emergency.multi_tier_checkpointing import (
    initialization as mtc,
)

from tiered import DurableTier, LocalTier
from tiered.jaxenv import jax_env

from conftest import ROOT, DaemonProc, free_port, subprocess_env, wait_for, write_config
from helpers import Trainer, assert_trees_equal, example_state, orbax_restore


def write_replicator_yaml(local: Path, *, steps: int = 50) -> None:
    """What orbax's client writes once jax.distributed is up: a one-node job's replicator.yaml."""
    mtc._create_replicator_file(
        local,
        run_name="job",
        num_nodes=1,
        data_parallelism=1,
        node_rank=0,
        peer_ranks=[],
        backup_interval_minutes=None,
        backup_interval_steps=steps,
    )


def client_handshake(local: Path, *, steps: int = 50) -> None:
    write_replicator_yaml(local, steps=steps)
    mtc._wait_for_replicator_file_to_disappear(local, timeout_seconds=30)
    assert mtc._block_and_process_restore_dir(local, timeout_seconds=60)


def mtc_config(tmp_path: Path, durable_url: str):
    return write_config(
        tmp_path, durable_url, enable_multi_tier_checkpointing=True, checkpoint_period=1000
    )


def expected_w(step: int) -> list[float]:
    """What tests/mtc_client.py saves at ``step``."""
    return (np.arange(64, dtype=np.float32) * 0.5 + step).tolist()


def run_client(local: Path, steps: int, *, coordinator: str) -> str:
    """The unmodified client, in the environment `tiered jax-env` prints for a one-node job."""
    env = {**subprocess_env(), **jax_env(rank=0, nodes=1, coordinator=coordinator, job="mtc")}
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "mtc_client.py"), str(local), str(steps)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    return out.stdout


def restored_values(stdout: str) -> tuple[int, list[float]] | None:
    for line in stdout.splitlines():
        if line.startswith("RESTORED"):
            step_part, w_part = line.split(" ", 2)[1:]
            return int(step_part.split("=")[1]), json.loads(w_part.split("=", 1)[1])
    return None


def test_replicator_checkpoint_manager_end_to_end(gs_url: str, tmp_path: Path) -> None:
    config_path, cfg = write_config(
        tmp_path,
        gs_url,
        enable_multi_tier_checkpointing=True,
        checkpoint_period=1000,
        tiered={"write_jax_init_info": True, "coordinator_address": f"127.0.0.1:{free_port()}"},
    )
    local = cfg.local_dir
    local.mkdir(parents=True)
    durable = DurableTier(cfg.durable_url, storage_options=cfg.tiered.storage_options)
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        coordinator = cfg.tiered.coordinator_address or ""
        assert "FRESH" in run_client(local, 120, coordinator=coordinator)
        # saves every 10 steps, backup interval 50 from replicator.yaml (not checkpoint_period);
        # the client's exit (its JAX coordinator gone) owes its last step, 110, as final
        wait_for(lambda: durable.committed_steps() == [50, 100, 110], timeout=60, what=daemon.log())
        for step in (50, 100, 110):
            durable.verify_step(step)
        assert durable.read_manifest(110).reason == "final"
        assert "the run has ended" in daemon.log()
        # restart with local steps present: the newest local step, no download
        out = run_client(local, 125, coordinator=coordinator)
        restored = restored_values(out)
        assert restored is not None and restored[0] == 110
        assert restored[1] == expected_w(110)
        assert "Fetched" not in daemon.log()
    finally:
        assert daemon.terminate() == 0
    # The second run's last step (120, not a multiple of 50) is durable too: orbax's steps
    # carry no reason, and the run is over when its coordinator goes (or its sidecar stops).
    assert durable.committed_steps() == [50, 100, 110, 120]
    assert durable.read_manifest(120).reason == "final"

    # A fresh node: the local directory is wiped and both restart.
    shutil.rmtree(local)
    local.mkdir()
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        out = run_client(local, 125, coordinator=coordinator)
        restored = restored_values(out)
        assert restored is not None and restored[0] == 120
        assert restored[1] == expected_w(120)  # bit-exact float32 values
        assert "Fetched step 120" in daemon.log()
    finally:
        daemon.terminate()


def test_restart_with_local_steps_restores_newest_local_without_download(tmp_path: Path) -> None:
    config_path, cfg = mtc_config(tmp_path, f"file://{tmp_path}/durable")
    local = cfg.local_dir
    trainer = Trainer(local)
    states = {s: example_state(s) for s in (10, 20)}
    for step, st in states.items():
        trainer.save(step, st)
    trainer.close()
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        client_handshake(local)
        assert (local / "20").is_symlink()  # moved aside into staging, renamed back by orbax
        assert "Fetched" not in daemon.log() and "(from the local tier)" in daemon.log()
        assert_trees_equal(orbax_restore(str(local), 20, example_state(5)), states[20])
        assert LocalTier(local).committed_steps() == [10, 20]
    finally:
        daemon.terminate()


def test_fatal_replicator_yaml_makes_the_client_raise_with_our_reason(tmp_path: Path) -> None:
    config_path, cfg = mtc_config(tmp_path, f"file://{tmp_path}/durable")
    local = cfg.local_dir
    local.mkdir(parents=True)
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        (local / "replicator.yaml").write_text(
            "job-name: j\nnodes: 2\nnode-rank: 5\nbackup-interval-steps: 50\n"
        )
        with pytest.raises(RuntimeError, match="node-rank 5 must be below nodes 2"):
            mtc._wait_for_replicator_file_to_disappear(local, timeout_seconds=30)
    finally:
        daemon.terminate()


def test_a_newer_durable_step_wins_over_an_older_local_one(tmp_path: Path) -> None:
    """The one restore choice: the protocol offers what `tiered status` says restore uses."""
    from tiered import promote_step

    config_path, cfg = mtc_config(tmp_path, f"file://{tmp_path}/durable")
    states = {10: example_state(10), 100: example_state(100)}
    trainer = Trainer(cfg.local_dir)
    trainer.save(10, states[10])
    trainer.close()
    elsewhere = Trainer(tmp_path / "other-node")
    elsewhere.save(100, states[100])
    elsewhere.close()
    promote_step(LocalTier(tmp_path / "other-node"), DurableTier(cfg.durable_url), 100)
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        # ready once the durable tier answers; the status shows its steps after the listing
        wait_for(
            lambda: json.loads(daemon.get("/status")[1])["latest"]["restorable"] == 100,
            timeout=30,
            what=daemon.log(),
        )
        client_handshake(cfg.local_dir)
        assert (cfg.local_dir / "100").is_symlink()
        assert "Offered step 100 (from the durable tier)" in daemon.log()
        assert_trees_equal(orbax_restore(str(cfg.local_dir), 100, example_state(5)), states[100])
    finally:
        daemon.terminate()


def test_a_short_run_is_seen_and_its_last_step_owed_as_final(tmp_path: Path) -> None:
    """A client whose whole run fits between two coordinator probes (2 s apart) is still seen:
    replicator.yaml comes after jax.distributed.initialize, so the daemon probes on accepting
    it. Missed, the run would never be known to have ended and its last step never be final."""
    import socket

    from daemon.service import Daemon
    from tiered import load_config

    port = free_port()
    config_path, cfg = write_config(
        tmp_path,
        f"file://{tmp_path}/durable",
        enable_multi_tier_checkpointing=True,
        checkpoint_period=1000,
        tiered={"write_jax_init_info": True, "coordinator_address": f"127.0.0.1:{port}"},
    )
    d = Daemon(load_config(config_path))
    d.start()
    try:
        d.cycle(force_rescan=True)  # probes once: no coordinator yet
        assert not d.state.trainer_seen
        with socket.create_server(("127.0.0.1", port)):  # the client's coordinator, up
            write_replicator_yaml(cfg.local_dir)
            d.cycle()  # within 2 s of the first probe
            assert d.state.trainer_seen and d.state.coordinator_up
            wait_for(lambda: d.cycle() is not None and d.mtc and d.mtc.pending_restore is None)
            trainer = Trainer(cfg.local_dir)  # told to start fresh, it saves one step
            trainer.save(7, example_state(7))  # not a multiple of the backup interval
            trainer.close()
            assert 7 not in d.cycle().owed  # running: step 7 is not due
        d.trainer.probe_now()  # the next probe, 2 s later, without waiting for it
        assert 7 in d.cycle().owed  # gone: the run ended, its last step is owed as final
    finally:
        d.close()

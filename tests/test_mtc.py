"""orbax's multi-tier protocol, with orbax's own client functions against the real daemon.

These drive the protocol steps of ``initialize_multi_tier_checkpointing`` (write
replicator.yaml, wait for it to be consumed, check errors, take the .restore entry) with orbax's
own code, without jax.distributed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from orbax.checkpoint.experimental.emergency.multi_tier_checkpointing import (
    initialization as mtc,
)

from tiered import DurableTier, LocalTier

from conftest import DaemonProc, wait_for, write_config
from helpers import Trainer, assert_trees_equal, example_state, orbax_restore


def client_handshake(local: Path, *, steps: int = 50) -> None:
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
    mtc._wait_for_replicator_file_to_disappear(local, timeout_seconds=30)
    assert mtc._block_and_process_restore_dir(local, timeout_seconds=60)


def mtc_config(tmp_path: Path, durable_url: str):
    return write_config(
        tmp_path, durable_url, enable_multi_tier_checkpointing=True, checkpoint_period=1000
    )


def test_fresh_start_then_backup_every_interval_then_restores(gs_url: str, tmp_path: Path) -> None:
    config_path, cfg = mtc_config(tmp_path, gs_url)
    local = cfg.local_dir
    local.mkdir(parents=True)
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        client_handshake(local)  # nothing anywhere: the empty s0 marker, consumed by the client
        assert not list(local.glob("*.restore"))
        state = example_state()
        trainer = Trainer(local)
        for step in range(10, 160, 10):
            trainer.save(step, state)
        trainer.close()
        durable = DurableTier(cfg.durable_url, storage_options=cfg.tiered.storage_options)
        # the interval from replicator.yaml (50), not checkpoint_period (1000), drives promotion
        wait_for(lambda: durable.committed_steps() == [50, 100, 150], timeout=60, what=daemon.log())
    finally:
        daemon.terminate()

    # A fresh node: the local directory is wiped. The client is offered the newest durable step.
    import shutil

    shutil.rmtree(local)
    local.mkdir()
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        client_handshake(local)
        step_dir = local / "150"
        assert step_dir.is_symlink() and (step_dir / "commit_success.txt").exists()
        assert_trees_equal(orbax_restore(str(local), 150, example_state(1)), state)
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

"""The training API with real orbax saves of real JAX arrays on the CPU."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tiered import (
    CheckpointManager,
    ChecksumMismatch,
    CommitError,
    DurableTier,
    LocalTier,
    StepUnreadable,
    config_from_mapping,
    promote_step,
)

from conftest import ROOT, subprocess_env, write_config
from helpers import assert_trees_equal, corrupt_largest_file, example_state


def advance(state, n: int = 1):
    """A cheap deterministic change to every leaf, so steps differ."""
    return jax.tree.map(lambda x: x + n if x.dtype != np.uint32 else x ^ n, state)


def test_round_trip_is_bit_exact(durable_url: str, tmp_path: Path) -> None:
    _, cfg = write_config(tmp_path, durable_url)
    state = advance(example_state(), 3)
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        assert mgr.save(5, state) is False  # not a multiple of local_checkpoint_period
        assert mgr.save(10, state) is True
        mgr.wait_until_finished()
        restored = mgr.restore(example_state())
    assert restored is not None and restored.step == 10 and restored.source == "local"
    assert_trees_equal(restored.state, state)
    # params, Adam moments, the step counter and the RNG key all came back
    assert set(restored.state) == {"params", "opt_state", "step", "rng"}


def only_on_durable(cfg, steps: tuple[int, ...]) -> tuple[dict, LocalTier, DurableTier]:
    """Save real states, promote them, then lose the local copies (a fresh node's empty SSD)."""
    states = {s: advance(example_state(), s) for s in steps}
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        for step, st in states.items():
            mgr.save(step, st)
    local = LocalTier(cfg.local_dir)
    durable = DurableTier(cfg.durable_url, storage_options=cfg.tiered.storage_options)
    for step in states:
        promote_step(local, durable, step)
        local.delete_step(step)
    assert local.committed_steps() == []
    return states, local, durable


def test_fresh_node_restores_newest_durable_step(durable_url: str, tmp_path: Path) -> None:
    _, cfg = write_config(tmp_path, durable_url)
    states, local, _durable = only_on_durable(cfg, (50, 100))
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        restored = mgr.restore(example_state())
    assert restored is not None and (restored.step, restored.source) == (100, "durable")
    assert_trees_equal(restored.state, states[100])
    assert local.committed_steps() == [100]  # fetched into the local tier, verified


@pytest.mark.parametrize("mode", ["store", "verify_first"])
def test_durable_restore_modes(
    mode: str, gs_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``store``: GCS keeps a crc32c per object; when each equals the manifest's, orbax reads the
    step where it is and the local copy follows in the background (there once the manager is
    closed). ``verify_first``: downloaded and verified before orbax loads it."""
    _, cfg = write_config(tmp_path, gs_url, tiered={"durable_restore": mode})
    states, local, _durable = only_on_durable(cfg, (50, 100))
    with (
        caplog.at_level(logging.INFO, logger="tiered"),
        CheckpointManager(cfg, install_signal_handlers=False) as mgr,
    ):
        restored = mgr.restore(example_state())
        assert restored is not None and (restored.step, restored.source) == (100, "durable")
        assert_trees_equal(restored.state, states[100])
    read_in_place = any("vouched for every byte" in r.message for r in caplog.records)
    assert read_in_place is (mode == "store")
    assert local.committed_steps() == [100]  # verified into the local tier either way


def test_corrupt_durable_step_falls_back_with_warning(
    durable_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, cfg = write_config(tmp_path, durable_url)
    states, local, durable = only_on_durable(cfg, (50, 100))
    victim = corrupt_largest_file(durable, 100)
    with (
        caplog.at_level(logging.WARNING),
        CheckpointManager(cfg, install_signal_handlers=False) as mgr,
    ):
        restored = mgr.restore(example_state())
    assert restored is not None and restored.step == 50
    assert_trees_equal(restored.state, states[50])
    assert any(
        "Step 100" in r.message and "falling back" in r.message and victim in r.message
        for r in caplog.records
    )
    assert 100 not in local.committed_steps()  # the bad copy never became a local step


def test_a_rolled_back_run_saves_its_step_numbers_again(tmp_path: Path) -> None:
    """Step 30 fails to load, so the run resumes from 20 and reaches 30 again: that save must
    happen (the old 30 is set aside, not silently kept), and restore then returns the new one."""
    _, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        for step in (10, 20, 30):
            mgr.save(step, advance(example_state(), step))
    broken = max((cfg.local_dir / "30").rglob("*"), key=lambda p: p.stat().st_size)
    broken.write_bytes(b"not what orbax wrote")
    again = advance(example_state(), 1000)
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        restored = mgr.restore(example_state())
        assert restored is not None and restored.step == 20
        assert mgr.save(30, again) is True
        assert mgr.save(30, again) is False  # saved already, by this run
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        restored = mgr.restore(example_state())
    assert restored is not None and restored.step == 30
    assert_trees_equal(restored.state, again)
    (aside,) = LocalTier(cfg.local_dir).displaced()
    assert aside.step == 30 and (cfg.local_dir / ".tiered" / "displaced" / aside.name).is_dir()


def test_a_named_step_that_cannot_be_loaded_raises_naming_it(tmp_path: Path) -> None:
    """``restore(target, step=30)`` of a local step orbax cannot read raises ``StepUnreadable``
    naming the step and the cause: never None (that means "no checkpoint anywhere", so the
    caller would start fresh) and never step 20 instead. Without a step it falls back."""
    _, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        for step in (20, 30):
            mgr.save(step, advance(example_state(), step))
    broken = max((cfg.local_dir / "30").rglob("*"), key=lambda p: p.stat().st_size)
    broken.write_bytes(b"\xff" * broken.stat().st_size)  # same size, undecodable
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        with pytest.raises(StepUnreadable, match=r"step 30 from the local tier") as info:
            mgr.restore(example_state(), step=30)
        assert isinstance(info.value, CommitError) and info.value.__cause__ is not None
        fallback = mgr.restore(example_state())
    assert fallback is not None and fallback.step == 20


def test_a_named_durable_step_that_fails_verification_raises_naming_it(
    durable_url: str, tmp_path: Path
) -> None:
    _, cfg = write_config(tmp_path, durable_url)
    _states, _local, durable = only_on_durable(cfg, (50, 100))
    victim = corrupt_largest_file(durable, 100)
    with (
        CheckpointManager(cfg, install_signal_handlers=False) as mgr,
        pytest.raises(StepUnreadable, match=r"step 100 from the durable tier") as info,
    ):
        mgr.restore(example_state(), step=100)
    assert victim in str(info.value) and isinstance(info.value.__cause__, ChecksumMismatch)


def test_a_durable_step_with_another_steps_ocdbt_root_is_refused_on_a_fresh_node(
    durable_url: str, tmp_path: Path
) -> None:
    """Step 100's ``manifest.ocdbt`` overwritten with step 50's (same size, same crc32c: every
    OCDBT file has the one crc32c): the xxh3 catches it in both restore modes, so the named
    step raises and the newest good one is step 50."""
    _, cfg = write_config(tmp_path, durable_url)
    states, _local, durable = only_on_durable(cfg, (50, 100))
    rel = "manifest.ocdbt"
    roots = [r for r in durable.read_manifest(100).files if r.endswith(rel)]
    for root in roots:
        durable.fs.pipe_file(
            durable.object_path(100, root), durable.fs.cat_file(durable.object_path(50, root))
        )
    assert (
        durable.remote_files(100)[roots[0]]["size"]
        == durable.read_manifest(100).files[roots[0]].size
    )
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        with pytest.raises(StepUnreadable, match=r"step 100 .*xxh3"):
            mgr.restore(example_state(), step=100)
        restored = mgr.restore(example_state())
    assert restored is not None and restored.step == 50
    assert_trees_equal(restored.state, states[50])


def test_no_checkpoint_anywhere_returns_none(tmp_path: Path) -> None:
    _, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        assert mgr.restore(example_state()) is None
        assert mgr.latest_step() is None


def train_command(config_path: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "examples" / "train.py"),
        "--config",
        str(config_path),
        *args,
    ]


def test_sigint_mid_run_saves_preemption_then_resumes(tmp_path: Path) -> None:
    config_path, cfg = write_config(
        tmp_path, f"file://{tmp_path}/durable", local_checkpoint_period=200, checkpoint_period=1000
    )
    proc = subprocess.Popen(
        train_command(config_path, "--steps", "100000", "--step-time", "0.01"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=subprocess_env(),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("FRESH")
    import time

    # Past the first periodic save, however slow JAX's start was on this machine: a signal
    # before step 1 would stop at step 0, which tells nothing.
    first = cfg.local_dir / "200" / "commit_success.txt"
    deadline = time.monotonic() + 90
    while not first.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    stopped = [line for line in out.splitlines() if line.startswith("STOPPED")]
    assert stopped, out
    stop_step = int(stopped[0].split("=")[1].split()[0])
    assert stop_step % 200 > 0  # not a periodic step: saved only because of the signal
    local = LocalTier(cfg.local_dir)
    facts = {f.step: f for f in local.scan()}
    assert facts[stop_step].committed and facts[stop_step].reason == "preemption"

    resumed = subprocess.run(
        train_command(config_path, "--steps", str(stop_step + 3)),
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"RESUMED step={stop_step} from=local" in resumed.stdout
    assert f"DONE step={stop_step + 2}" in resumed.stdout
    assert {f.step: f.reason for f in local.scan()}[stop_step + 2] == "final"


def test_local_saves_are_raw_unless_compression_is_on(tmp_path: Path) -> None:
    """By default local saves skip zstd (less CPU per save); tiered.local_compression: true
    turns it on. Both restore the same arrays."""
    import jax.numpy as jnp

    zeros = {"w": jnp.zeros((1024, 1024), jnp.float32)}  # 4 MB that compresses to almost nothing
    sizes = {}
    for name, tiered_keys in (("default", {}), ("zstd", {"local_compression": True})):
        cfg = config_from_mapping(
            {
                "checkpoint_dir": f"file://{tmp_path}/durable-{name}",
                "local_checkpoint_directory": str(tmp_path / f"local-{name}"),
                "tiered": tiered_keys,
            },
            env={},
        )
        with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
            mgr.save(0, zeros, force=True)
            mgr.wait_until_finished()
            restored = mgr.restore(zeros)
        assert restored is not None and float(restored.state["w"].sum()) == 0.0
        step = tmp_path / f"local-{name}" / "0"
        sizes[name] = sum(p.stat().st_size for p in step.rglob("*") if p.is_file())
    assert sizes["default"] >= 4 * 2**20
    assert sizes["zstd"] < 2**20


def test_local_saves_are_split_into_data_files_of_the_set_size(tmp_path: Path) -> None:
    """tiered.local_data_file_size cuts a local save's OCDBT data into files of about that size
    (orbax's own default, 2 GiB, puts a state this small in one or two files), so several threads
    copy and flush them at once; plain orbax, with no tiered code, restores the step bit-exact."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    mib = 2**20
    state = {f"w{i}": jnp.arange(i, i + mib // 4, dtype=jnp.float32) for i in range(6)}
    local = tmp_path / "local"
    cfg = config_from_mapping(
        {
            "checkpoint_dir": f"file://{tmp_path}/durable",
            "local_checkpoint_directory": str(local),
            "tiered": {"local_data_file_size": "1Mi"},
        },
        env={},
    )
    assert cfg.tiered.local_data_file_size == mib
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        mgr.save(0, state, force=True)
        mgr.wait_until_finished()
    data = [p.stat().st_size for p in (local / "0").rglob("d/*") if p.is_file()]
    assert len([n for n in data if n >= mib]) >= 3, data  # six MiB, not one file of them
    assert max(data) < 3 * mib, data
    with ocp.CheckpointManager(local) as plain:
        restored = plain.restore(0)
    got = restored.state if hasattr(restored, "state") else restored
    assert_trees_equal(got, state)

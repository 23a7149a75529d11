"""tiered as a drop-in for orbax's CheckpointManager: the same loop, two lines changed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tiered import ConfigError, DurableTier, LocalTier, promote_step
from tiered.orbax_api import resolve_config

from conftest import ROOT, subprocess_env
from helpers import assert_trees_equal

LOOP = ROOT / "examples" / "orbax_loop.py"


def test_orbax_options_become_tiered_settings(tmp_path: Path) -> None:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        save_interval_steps=100,
        max_to_keep=3,
        keep_period=1000,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    cfg = resolve_config(
        f"{tmp_path}/durable", options=options, local_dir=tmp_path / "local", env={}
    )
    assert cfg.durable_url == f"file://{tmp_path}/durable"
    assert cfg.local_dir == tmp_path / "local"
    assert (cfg.local_checkpoint_period, cfg.checkpoint_period) == (100, 500)
    assert cfg.max_num_checkpoints_to_keep == 3 and cfg.tiered.keep_period == 1000
    assert cfg.async_checkpointing is False
    # orbax's defaults mean what they mean in orbax: every step saved, every step kept
    plain = resolve_config(
        f"{tmp_path}/d", options=ocp.CheckpointManagerOptions(), local_dir=tmp_path / "l", env={}
    )
    assert (plain.local_checkpoint_period, plain.max_num_checkpoints_to_keep) == (1, None)


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("best_fn", lambda metrics: metrics["loss"], "retention"),
        ("step_prefix", "ckpt", "plain integers"),
        ("save_on_steps", frozenset({7}), "save_interval_steps"),
        ("single_host_load_and_broadcast", True, "own shards"),
        ("read_only", True, "plain orbax"),
    ],
)
def test_options_that_would_not_apply_are_refused(
    tmp_path: Path, field: str, value: object, why: str
) -> None:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(**{field: value})
    with pytest.raises(ConfigError, match=f"CheckpointManagerOptions.{field}=") as err:
        resolve_config(f"{tmp_path}/d", options=options, local_dir=tmp_path / "l", env={})
    assert why in str(err.value)


def test_a_directory_alone_asks_for_the_local_tier(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="local_dir") as err:
        resolve_config(f"{tmp_path}/durable", env={})
    assert "TIERED_LOCAL_CHECKPOINT_DIRECTORY" in str(err.value)
    env = {"TIERED_LOCAL_CHECKPOINT_DIRECTORY": str(tmp_path / "ssd")}
    assert resolve_config(f"{tmp_path}/durable", env=env).local_dir == tmp_path / "ssd"


def run_loop(*args: str, timeout: float = 180) -> str:
    done = subprocess.run(
        [sys.executable, str(LOOP), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def line(out: str, prefix: str) -> str:
    found = [ln for ln in out.splitlines() if ln.startswith(prefix)]
    assert found, out
    return found[0]


def test_an_orbax_loop_switched_to_tiered_saves_stops_resumes_and_restores_on_a_fresh_node(
    tmp_path: Path,
) -> None:
    """examples/orbax_loop.py is written for orbax.checkpoint.CheckpointManager (Composite of an
    NNX model with its optax state and a data iterator's position, metrics, should_save,
    reached_preemption, latest_step, restore with args); --tiered changes only the import and
    the constructor. Interrupted by SIGTERM, resumed, then restored on a node with an empty
    disk, it ends with the same loss, to the last digit, as plain orbax run straight through."""
    import orbax.checkpoint as ocp

    steps = "40"
    baseline = run_loop("--directory", str(tmp_path / "plain"), "--steps", steps)
    expected = line(baseline, "DONE")

    durable, local = tmp_path / "durable", tmp_path / "local"
    ours = ["--tiered", "--directory", str(durable), "--steps", steps]
    proc = subprocess.Popen(
        [sys.executable, str(LOOP), *ours, "--local-dir", str(local), "--step-time", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    deadline = time.monotonic() + 120
    while not (local / "10" / "commit_success.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = int(line(out, "STOPPED").split()[1].removeprefix("step="))
    assert 10 < stopped < 39 and stopped % 10, out  # saved because of the signal, not the period
    assert (local / str(stopped) / "commit_success.txt").exists()

    resumed = run_loop(*ours, "--local-dir", str(local))
    assert line(resumed, "RESUMED") == f"RESUMED step={stopped} position={stopped + 1}"
    assert line(resumed, "DONE") == expected

    # The step the daemon would promote, then a node with an empty disk: it restores from the
    # durable tier through the same two lines.
    promote_step(LocalTier(local), DurableTier(f"file://{durable}"), 30)
    fresh = run_loop(*ours, "--local-dir", str(tmp_path / "fresh-node"))
    assert line(fresh, "RESUMED") == "RESUMED step=30 position=31"
    assert line(fresh, "DONE") == expected

    # Plain orbax, with no tiered code, reads the durable step: whole, by item, by name.
    with ocp.CheckpointManager(durable) as plain:
        everything = plain.restore(30)
    with ocp.CheckpointManager(local) as plain:
        original = plain.restore(30)
    assert everything.data == {"position": 31} == original.data
    assert_trees_equal(everything.state, original.state)
    with ocp.CheckpointManager(durable) as plain:
        data_only = plain.restore(30, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    assert data_only.data == {"position": 31}


@pytest.mark.parametrize("durable_url", ["file", "gs"], indirect=True)
def test_sharded_state_restores_bit_exact_onto_other_meshes_through_both_tiers(
    durable_url: str, tmp_path: Path
) -> None:
    from conftest import write_config

    config, _ = write_config(tmp_path, durable_url)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    fresh_config, _ = write_config(fresh, durable_url)
    env = {**subprocess_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharded_state.py"), str(config), str(fresh_config)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert [ln for ln in done.stdout.splitlines() if ln.startswith("OK")] == [
        "OK same sharding, local",
        "OK resharded onto 2x4, local",
        "OK resharded onto 8, orbax's args form",
        "OK fresh node, from the durable tier, resharded onto 2x4",
    ]


def test_orbax_queries_answer_across_both_tiers(tmp_path: Path) -> None:
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    import tiered

    options = ocp.CheckpointManagerOptions(save_interval_steps=10)
    state = {"w": jnp.arange(6.0), "n": jnp.asarray(3)}
    with tiered.CheckpointManager(
        f"{tmp_path}/durable",
        options=options,
        local_dir=tmp_path / "local",
        install_signal_handlers=False,
    ) as mgr:
        assert mgr.latest_step() is None and mgr.all_steps() == []
        assert [s for s in range(25) if mgr.should_save(s)] == [0, 10, 20]
        for step in (10, 20):
            assert mgr.save(step, args=ocp.args.StandardSave(state), metrics={"loss": 1.0 / step})
        assert mgr.save(21, args=ocp.args.StandardSave(state)) is False  # not due, as in orbax
        mgr.wait_until_finished()
        promote_step(mgr.local, mgr.durable, 10)
        mgr.local.delete_step(10)
        mgr.reload()
        assert mgr.all_steps() == [10, 20] and mgr.latest_step() == 20
        assert set(mgr.item_metadata(20)) == {"w", "n"}
        assert mgr.metrics(20) == {"loss": 0.05}
        with pytest.raises(tiered.CommitError, match="durable tier only"):
            mgr.item_metadata(10)
        with pytest.raises(TypeError, match="not both"):
            mgr.save(30, state, args=ocp.args.StandardSave(state))
        back = mgr.restore(10, args=ocp.args.StandardRestore(state))  # fetched, verified, loaded
        assert_trees_equal(back, state)
    with (
        tiered.CheckpointManager(
            f"{tmp_path}/empty", local_dir=tmp_path / "empty-local", install_signal_handlers=False
        ) as mgr,
        pytest.raises(FileNotFoundError, match="no checkpoint"),
    ):
        mgr.restore(None, args=ocp.args.StandardRestore(state))


def test_a_config_file_is_told_from_a_checkpoint_directory(tmp_path: Path) -> None:
    from tiered.orbax_api import is_config_file

    plain = tmp_path / "settings"  # a YAML file with no suffix
    plain.write_text(f"checkpoint_dir: {tmp_path}/d\nlocal_checkpoint_directory: {tmp_path}/l\n")
    assert is_config_file(plain) and is_config_file("configs/demo.yml")
    assert not is_config_file(tmp_path) and not is_config_file("gs://bucket/run.yml")
    assert resolve_config(plain, env={}).local_dir == tmp_path / "l"


def test_should_save_answers_as_orbax_does_for_every_step(tmp_path: Path) -> None:
    """The same loop on orbax's manager and on tiered's: saved every 5 and at 22 (forced),
    then every step 0..30 probed, in the same run and in a resumed one. Orbax never saves a
    step at or below its newest: a resumed loop that asks first must not write a step twice."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    import tiered

    state = {"w": jnp.arange(4.0)}

    def run(mgr: Any) -> tuple[list[int], list[int]]:
        for step in range(23):
            if mgr.should_save(step) or step == 22:
                mgr.save(step, args=ocp.args.StandardSave(state), force=step == 22)
        mgr.wait_until_finished()
        return sorted(mgr.all_steps()), [s for s in range(31) if mgr.should_save(s)]

    def resumed(mgr: Any) -> list[int]:
        mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore(state))
        return [s for s in range(31) if mgr.should_save(s)]

    options = ocp.CheckpointManagerOptions(save_interval_steps=5)
    with ocp.CheckpointManager(tmp_path / "orbax", options=options) as mgr:
        orbax_run = run(mgr)
    with ocp.CheckpointManager(tmp_path / "orbax", options=options) as mgr:
        orbax_resumed = resumed(mgr)

    def tiered_manager() -> tiered.CheckpointManager:
        return tiered.CheckpointManager(
            f"{tmp_path}/durable",
            options=options,
            local_dir=tmp_path / "local",
            install_signal_handlers=False,
        )

    with tiered_manager() as mgr:
        tiered_run = run(mgr)
    with tiered_manager() as mgr:
        tiered_resumed = resumed(mgr)
    assert orbax_run == ([0, 5, 10, 15, 20, 22], [25, 30])
    assert tiered_run == orbax_run
    assert tiered_resumed == orbax_resumed == [25, 30]

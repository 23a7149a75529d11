"""Checkpoint facts in W&B and TensorBoard, read back through the libraries' own readers and
checked against what ``tiered status`` says (real orbax saves, a real promotion)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tiered import CheckpointManager, DurableTier, LocalTier, promote_step
from tiered.integrations import TensorBoardLogger, WandbLogger
from tiered.status_client import collect_status

from conftest import ROOT, DaemonProc, subprocess_env, wait_for, write_config
from helpers import example_state, orbax_save


@pytest.fixture
def run_with_saves(tmp_path: Path) -> Any:
    """Steps 10, 20, 30 saved locally, step 10 promoted: the manager still open."""
    _, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        for step in (10, 20, 30):
            mgr.save(step, example_state(step))
            mgr.wait_until_finished()
        promote_step(LocalTier(cfg.local_dir), DurableTier(cfg.durable_url), 10)
        yield mgr


def expected_from_status(mgr: CheckpointManager, step: int) -> dict[str, float]:
    status = collect_status(mgr.config).to_dict()  # what `tiered status --json` prints
    latest, ages = status["latest"], {s["step"]: s["age_seconds"] for s in status["steps"]}
    stats = json.loads(
        (LocalTier(mgr.config.local_dir).tiered_dir / "trainer-stats.json").read_text()
    )
    return {
        "checkpoint/newest_local_step": latest["local"],
        "checkpoint/newest_durable_step": latest["durable"],
        "checkpoint/steps_at_risk_crash": step - latest["local"],
        "checkpoint/steps_at_risk_node": step - latest["durable"],
        "checkpoint/save_blocking_seconds": stats["save_blocking_seconds"][-1],
        "checkpoint/durable_lag_seconds": ages[latest["durable"]] - ages[latest["local"]],
    }


def assert_facts(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)  # no peers without a daemon: no peer step is made up
    for key, value in want.items():
        tolerance = 0.15 if key == "checkpoint/durable_lag_seconds" else 1e-4  # ages: 0.1 s
        assert got[key] == pytest.approx(value, abs=tolerance), key


def test_tensorboard_scalars_read_back(run_with_saves: CheckpointManager, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mgr = run_with_saves
    with TensorBoardLogger(mgr, tmp_path / "tb") as tb:
        tb.log(30, loss=0.5)  # the user's own scalar beside ours
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    got = {t: events.Scalars(t)[-1].value for t in tags if t.startswith("checkpoint/")}
    assert events.Scalars("loss")[-1].value == 0.5
    assert {events.Scalars(t)[-1].step for t in tags} == {30}
    want = expected_from_status(mgr, 30)
    assert (
        want["checkpoint/steps_at_risk_node"] == 20 and want["checkpoint/steps_at_risk_crash"] == 0
    )
    assert_facts(got, want)


def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """The history rows of an offline run, from its ``.wandb`` transaction log (LevelDB log
    framing, each record wandb's own protobuf ``Record``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    block, pos, rows, pending = 32768, 7, [], b""  # 7: the ":W&B" file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
    return rows


def test_wandb_offline_run_read_back(
    run_with_saves: CheckpointManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    mgr = run_with_saves
    run = wandb.init(project="tiered-test", dir=str(tmp_path))
    try:
        run.log({"loss": 0.5}, step=30)
        logged = WandbLogger(mgr).log(30)
    finally:
        run.finish()
    want = expected_from_status(mgr, 30)
    assert_facts(logged, want)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    rows = [r for r in wandb_history(run_dir) if r.get("_step") == 30]
    row = {k: v for r in rows for k, v in r.items()}
    assert row["loss"] == 0.5  # beside the user's loss, at the same step
    assert_facts({k: v for k, v in row.items() if k.startswith("checkpoint/")}, want)


def test_importing_the_integrations_loads_neither_library_nor_jax() -> None:
    probe = (
        "import sys, tiered.integrations\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('jax', 'orbax', 'wandb', 'tensorboardX', 'tensorboard')))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_example_logs_checkpoints_beside_its_loss(tmp_path: Path) -> None:
    """``examples/train.py --tensorboard DIR --wandb``: the loss at every step, the checkpoint
    facts at every save; the final save's facts say step 24 is safe locally."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, _ = write_config(tmp_path, f"file://{tmp_path}/durable")
    env = {**subprocess_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env["WANDB_DIR"] = str(tmp_path)
    example = [sys.executable, str(ROOT / "examples" / "train.py"), "--config", str(config)]
    done = subprocess.run(
        [*example, "--steps", "25", "--tensorboard", str(tmp_path / "tb"), "--wandb"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(25))
    local = {e.step: e.value for e in events.Scalars("checkpoint/newest_local_step")}
    assert local[24] == 24  # the final save is whole locally when its facts are logged
    crash = {e.step: e.value for e in events.Scalars("checkpoint/steps_at_risk_crash")}
    assert crash[24] == 0 and set(crash) == {0, 10, 20, 24}  # one row per save
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    rows: dict[int, dict[str, Any]] = {}
    for row in wandb_history(run_dir):
        rows.setdefault(row["_step"], {}).update(row)
    assert sorted(rows) == list(range(25))
    assert rows[24]["checkpoint/newest_local_step"] == 24 and "loss" in rows[24]
    assert rows[7]["loss"] == pytest.approx(events.Scalars("loss")[7].value)


def test_daemon_writes_tensorboard_scalars(tmp_path: Path) -> None:
    """``tiered.tensorboard_dir``: the daemon (no jax) writes the facts of its own status each
    time a step commits, keyed by the newest local step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "tb"
    config, cfg = write_config(
        tmp_path, f"file://{tmp_path}/durable", tiered={"tensorboard_dir": str(board)}
    )
    daemon = DaemonProc(config, cfg)
    try:
        daemon.wait_ready()
        orbax_save(cfg.local_dir, 50, example_state())
        wait_for(lambda: DurableTier(cfg.durable_url).committed_steps() == [50], what="promotion")
        orbax_save(cfg.local_dir, 60, example_state(1))
        wait_for(lambda: json.loads(daemon.get("/status")[1])["latest"]["local"] == 60, what="scan")
        status = json.loads(daemon.get("/status")[1])
    finally:
        assert daemon.terminate() == 0
    events = EventAccumulator(str(board))
    events.Reload()

    def at(tag: str, step: int) -> list[float]:
        return [e.value for e in events.Scalars(tag) if e.step == step]

    # written as step 60 committed locally; again when the drain on SIGTERM promoted it
    assert at("checkpoint/newest_durable_step", 60) == [status["latest"]["durable"], 60]
    assert at("checkpoint/newest_durable_step", 50) == [50]
    assert at("checkpoint/newest_local_step", 60)[0] == status["latest"]["local"] == 60
    assert at("checkpoint/steps_at_risk_node", 60)[0] >= 10  # at least the steps since 50
    assert "jax" not in daemon.log()

"""The goodput bench's arithmetic: the forecast on a worked example, and the driver's accounting
on a tiny trace of real trainer processes (plain orbax, one kill -9)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.goodput import KINDS, Event, System, account, failure_trace, run_system
from tiered.risk import Interruptions, forecast_goodput

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_forecast_goodput_adds_up_a_worked_example() -> None:
    # 1000 steps of 1 s, a local save every 100 (2 s each), a durable one every 500.
    figures = dict(
        steps=1000,
        step_seconds=1.0,
        local_period=100,
        durable_period=500,
        save_seconds=2.0,
        preemption_save_seconds=5.0,
        final_save_seconds=5.0,
        restore_seconds=10.0,
        node_restore_seconds=30.0,
        restart_seconds=60.0,
        local_lag_seconds=3.0,
        durable_lag_seconds=20.0,
        interruptions=Interruptions(crashes=2, preemptions=1, node_losses=1),
    )
    f = forecast_goodput(**figures)  # type: ignore[arg-type]
    assert f.lost_seconds == {
        "saves": 10 * 2 + 5 + 5,  # ten periodic saves, one preemption save, the final one
        "redone": 2 * (50 + 3) + (250 + 20),  # half an interval plus its commit lag
        "restoring": 3 * 10 + 30,  # the lost node's restore is a download
        "restarts": 4 * 60,
    }
    assert f.goodput == pytest.approx(1000 / (1000 + 30 + 376 + 60 + 240))
    # A peer holding every local step: a lost node redoes half a local period.
    peer = forecast_goodput(**figures, peer_period=100)  # type: ignore[arg-type]
    assert peer.lost_seconds["redone"] == 2 * 53 + 50


def test_the_trace_is_seeded_and_has_every_kind() -> None:
    trace = failure_trace(steps=300, mtbf_steps=60, seed=3)
    assert trace == failure_trace(steps=300, mtbf_steps=60, seed=3)
    assert sorted(e.kind for e in trace) == sorted(KINDS)
    assert all(30 <= e.after_steps <= 90 for e in trace)


def test_one_crash_recomputes_the_steps_since_the_last_checkpoint(tmp_path: Path) -> None:
    # 30 steps, orbax every 10; kill -9 once 19 steps are computed (steps 0..18): the
    # restart resumes from step 10, so steps 11..18 are computed twice.
    step_s = 0.05  # the save of step 10 has 8 steps (400 ms) to commit before the kill
    raw = run_system(
        System("orbax", "orbax", 10, 10),
        [Event("kill", 19)],
        steps=30,
        size_mb=1,
        step_ms=step_s * 1000,
        restart_s=0.2,
        work=tmp_path,
    )
    row = account(raw, steps=30, step_s=step_s)
    assert [life["event"] and life["event"]["kind"] for life in raw["lives"]] == ["kill", None]
    assert row["steps_recomputed"] == 8
    assert row["lost_s"]["redone"] == pytest.approx(8 * step_s)
    assert row["inputs"]["counts"] == {"crashes": 1, "preemptions": 0, "node_losses": 0}
    # every second of the wall time is in exactly one bucket
    assert row["useful_s"] + sum(row["lost_s"].values()) == pytest.approx(row["wall_s"])
    assert row["lost_s"]["restarts"] >= 0.2  # the fixed cost is in the restart
    assert 0 < row["goodput"] < 1
    # steps 0, 10, 20 and the final 29 (1 MB each, zstd takes some 10 % of random float32's
    # exponents) went to the durable tier
    assert 3_000_000 <= row["bytes_durable"] < 8_000_000


def test_a_preemption_under_tiered_recomputes_nothing(tmp_path: Path) -> None:
    # SIGTERM once 8 steps are computed: tiered.CheckpointManager saves the step it reached,
    # the real daemon promotes it, and the restart resumes right after it.
    raw = run_system(
        System("tiered", "tiered", 5, 10),
        [Event("sigterm", 8)],
        steps=20,
        size_mb=1,
        step_ms=30,
        restart_s=0.2,
        work=tmp_path,
    )
    row = account(raw, steps=20, step_s=0.03)
    assert row["steps_recomputed"] == 0
    assert row["inputs"]["counts"] == {"crashes": 0, "preemptions": 1, "node_losses": 0}
    assert row["inputs"]["preemption_save_seconds"] > 0
    reached, resumed = row["fallbacks"][0]
    assert resumed == reached  # resumed from the very step the signal found it at
    # steps 0 and 10, the preemption step and the final 19 are durable, written by the daemon
    assert (tmp_path / "tiered" / "durable" / "19" / "commit_success.txt").exists()
    assert row["bytes_durable"] >= 3_000_000

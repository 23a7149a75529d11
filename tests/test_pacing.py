"""Pacing: with no cap, a periodic transfer goes just fast enough for the period it protects,
so training keeps the host; preemption and final steps, and a daemon that is stopping, go at
full speed. The rule as a table (pure), then the real daemon with real orbax saves."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tiered import DurableTier
from tiered.policy import (
    FullSpeed,
    Pacing,
    Rules,
    Snapshot,
    Upload,
    plan,
    replication_pace,
    seconds_per_step,
    upload_pace,
)
from tiered.report import render_table, status_from_dict
from tiered.storage.transfer import RateLimiter
from tiered.types import LocalStep

from conftest import DaemonProc, wait_for, write_config

GB = 10**9
RULES = Rules(durable_period=500, local_max_to_keep=2, local_period=100, pacing=Pacing(share=0.5))


def L(step: int, *, t: float, per_step: float | None = None, reason: str = "periodic") -> LocalStep:
    return LocalStep(
        step=step,
        committed=True,
        reason=reason,  # type: ignore[arg-type]
        commit_time=t,
        seconds_per_step=per_step,
        size=GB,
        identity=f"id{step}",
    )


@pytest.mark.parametrize(
    ("local", "reason", "rules", "rate", "within"),
    [
        # the trainer recorded 0.2 s a step: 500 steps are 100 s, half of it for the upload
        ([L(500, t=0, per_step=0.2)], "periodic", RULES, GB / 50, 50),
        # nothing recorded: the spacing of the two newest local steps (100 steps in 20 s)
        ([L(400, t=0), L(500, t=20)], "periodic", RULES, GB / 50, 50),
        # a quarter of the period instead of half
        ([L(500, t=0, per_step=0.2)], "periodic", replace(RULES, pacing=Pacing(0.25)), GB / 25, 25),
        # a backup interval shorter than the step period is what the next step is due by
        (
            [L(500, t=0, per_step=0.2)],
            "periodic",
            replace(RULES, backup_interval_seconds=40),
            GB / 20,
            20,
        ),
        # a very long period: never slower than the floor, so the lag stays bounded
        ([L(500, t=0, per_step=1e4)], "periodic", RULES, 2e6, GB / 2e6),
        # no step time known yet: the fallback rate
        ([L(500, t=0)], "periodic", RULES, 25e6, GB / 25e6),
        # preemption and final steps are never paced
        ([L(500, t=0, per_step=0.2)], "preemption", RULES, None, None),
        ([L(500, t=0, per_step=0.2)], "final", RULES, None, None),
        # pacing off
        ([L(500, t=0, per_step=0.2)], "periodic", replace(RULES, pacing=None), None, None),
    ],
)
def test_upload_pace(
    local: list[LocalStep], reason: Any, rules: Rules, rate: float | None, within: float | None
) -> None:
    pace = upload_pace(GB, reason, local=local, rules=rules)
    assert pace.bytes_per_s == pytest.approx(rate)
    assert pace.within_s == pytest.approx(within)
    assert pace.why


def test_a_copy_to_a_peer_is_paced_to_the_local_period() -> None:
    # 100 steps of 0.2 s: the next local step comes in 20 s; half of it for the copy
    pace = replication_pace(GB, "periodic", local=[L(500, t=0, per_step=0.2)], rules=RULES)
    assert pace.bytes_per_s == pytest.approx(GB / 10)
    assert replication_pace(GB, "preemption", local=[], rules=RULES).bytes_per_s is None


def test_the_trainers_own_figure_wins_over_the_spacing_of_saves() -> None:
    # the spacing includes a restart; the trainer's figure does not
    assert seconds_per_step([L(400, t=0), L(500, t=900, per_step=0.2)]) == 0.2
    assert seconds_per_step([L(500, t=0)]) is None
    assert seconds_per_step([]) is None


def test_pacing_validates_when_built() -> None:
    with pytest.raises(ValueError, match="share"):
        Pacing(share=0)
    with pytest.raises(ValueError, match="share"):
        Pacing(share=1.5)


def _snap(local: list[LocalStep], **kw: Any) -> Snapshot:
    return Snapshot(now=1000.0, local=tuple(local), durable=(), **kw)


def test_the_plan_paces_periodic_uploads_and_says_so() -> None:
    p = plan(_snap([L(500, t=0, per_step=0.2)], trainer_running=True), RULES)
    assert p.uploads == [Upload(500, "periodic", GB / 50)]
    assert "paced to 20.0 MB/s" in p.verdicts[500].why
    assert not p.of(FullSpeed)
    busy = plan(_snap([L(500, t=0, per_step=0.2)], busy=frozenset({500})), RULES)
    assert "paced to 20.0 MB/s" in busy.verdicts[500].why


@pytest.mark.parametrize(
    ("local", "kw", "why"),
    [
        # a preemption step waits behind a paced periodic upload: that one must hurry
        (
            [L(500, t=0, per_step=0.2), L(537, t=5, reason="preemption")],
            {"busy": frozenset({500}), "trainer_running": True},
            "preemption step 537 is waiting",
        ),
        ([L(500, t=0, per_step=0.2)], {"busy": frozenset({500}), "draining": True}, "stopping"),
        ([L(500, t=0, per_step=0.2)], {"busy": frozenset({500}), "run_ended": True}, "ended"),
    ],
)
def test_what_lifts_the_pace(local: list[LocalStep], kw: dict, why: str) -> None:
    p = plan(_snap(local, **kw), RULES)
    (hurry,) = p.of(FullSpeed)
    assert why in hurry.why
    assert (
        plan(_snap(local[:1], busy=frozenset({500}), trainer_running=True), RULES).of(FullSpeed)
        == []
    )


def test_a_lifted_limiter_lets_a_sleeping_transfer_go_at_once() -> None:
    limiter = RateLimiter(1e6)
    limiter.take(1_000_000)  # the bucket is empty now
    started = time.monotonic()
    threading.Timer(0.3, limiter.lift).start()
    limiter.take(10_000_000)  # 10 s at 1 MB/s, unless lifted
    assert time.monotonic() - started < 2


# -- the real daemon ------------------------------------------------------------------------------


def _save(local_dir: Path, step: int, state: Any, *, reason: str, per_step: float) -> None:
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(
        str(local_dir), options=ocp.CheckpointManagerOptions(create=True)
    ) as mgr:
        mgr.save(
            step,
            args=ocp.args.StandardSave(state),
            custom_metadata={"tiered": {"reason": reason, "seconds_per_step": per_step}},
        )
        mgr.wait_until_finished()


def test_a_preemption_step_is_not_held_behind_a_paced_upload(tmp_path: Path) -> None:
    import jax.numpy as jnp
    import numpy as np

    state = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(5_000_000, np.float32))}
    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    durable = DurableTier(cfg.durable_url)
    # 50 steps of 100 s: the next durable step is hours away, so step 50's 20 MB go at the
    # floor of 2 MB/s, about 10 s
    _save(cfg.local_dir, 50, state, reason="periodic", per_step=100.0)
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        wait_for(lambda: (tmp_path / "durable" / "50").exists(), what="the upload to start")
        time.sleep(1.0)
        assert durable.committed_steps() == [], "a paced upload of 20 MB at 2 MB/s took < 1 s"
        status = json.loads(daemon.get("/status")[1])
        # the upload in flight says its pace and the bound it keeps, in the table too
        pace = status["daemon"]["current_upload"]["pace"]
        assert pace.startswith("paced to 2.0 MB/s: ") and "to the next durable step" in pace
        table = render_table(status_from_dict(status))
        line = next(x for x in table.splitlines() if x.startswith("uploading step 50: "))
        assert line.endswith(f"; {pace}"), line
        saved = time.monotonic()
        _save(cfg.local_dir, 57, state, reason="preemption", per_step=100.0)
        wait_for(lambda: durable.committed_steps() == [50, 57], timeout=30, what=daemon.log())
        # both at full speed: far sooner than the ~10 s the paced upload had left
        assert time.monotonic() - saved < 6, daemon.log()
        assert "now goes at full speed: preemption step 57 is waiting" in daemon.log()
    finally:
        daemon.terminate()


def test_the_trainer_records_its_step_time_for_the_daemon(tmp_path: Path) -> None:
    from tiered import CheckpointManager, LocalTier
    from tiered.policy import rules_for

    from helpers import example_state

    _path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    state = example_state()
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        for step in range(21):
            time.sleep(0.02)  # a training step of 20 ms
            mgr.save(step, state)
        mgr.wait_until_finished()
    steps = LocalTier(cfg.local_dir).scan(with_size=True)
    assert [s.step for s in steps] == [0, 10, 20]  # local_checkpoint_period 10
    assert steps[0].seconds_per_step is None  # nothing to measure from before the first save
    assert 0.02 <= (steps[-1].seconds_per_step or 0) < 0.2
    # and the daemon's rule reads it: 50 steps of ~20 ms, half of it for the upload
    pace = upload_pace(steps[-1].size, "periodic", local=steps, rules=rules_for(cfg))
    assert pace.within_s is not None and pace.within_s <= 50 * 0.2 * 0.5


def test_a_resumed_run_records_its_step_time_without_the_restart(tmp_path: Path) -> None:
    # After a restart, the first save's step time counted from the commit of the step before
    # the restart, restart included: the daemon then paced that durable upload to 10x the
    # period (the goodput bench's durable tier lagged 7.5 s behind a 4 s period).
    from tiered import CheckpointManager, LocalTier
    from tiered.policy import seconds_per_step

    from helpers import example_state

    _path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    state = example_state()
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        mgr.save(10, state, force=True)
        mgr.wait_until_finished()
    time.sleep(2.0)  # the restart
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        restored = mgr.restore(state)
        assert restored is not None and restored.step == 10
        for step in range(11, 21):
            time.sleep(0.02)  # a training step of 20 ms
            mgr.save(step, state)
        mgr.wait_until_finished()
    steps = LocalTier(cfg.local_dir).scan(with_size=True)
    assert [s.step for s in steps] == [10, 20]
    assert 0.02 <= (seconds_per_step(steps) or 0) < 0.1  # 20 ms steps; with the gap, 0.22

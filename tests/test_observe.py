"""What a user sees of each save and restore: the line they grep the log for, and the
jax.monitoring events their listeners get (real orbax saves of real JAX arrays on the CPU)."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import jax.monitoring
import pytest

from tiered import CheckpointManager, DurableTier, LocalTier, promote_step
from tiered.logs import log_saved
from tiered.observe import SaveRecord, tree_bytes

from conftest import write_config
from helpers import example_state

SAVED = re.compile(r"^Saved checkpoint at step (\d+) \((\w+), ([\d.]+) s, ([\d.]+) (\w+)\)(.*)$")


def saved_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, float, str, str]]:
    out = []
    for record in caplog.records:
        m = SAVED.match(record.getMessage())
        if m:
            out.append((int(m[1]), m[2], float(m[3]), f"{m[4]} {m[5]}", m[6]))
    return out


@pytest.mark.parametrize("asynchronous", [True, False])
def test_one_line_per_local_save(
    asynchronous: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, cfg = write_config(tmp_path, f"file://{tmp_path}/durable", async_checkpointing=asynchronous)
    caplog.set_level(logging.INFO, logger="tiered")
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        begun = time.perf_counter()
        mgr.save(10, example_state())
        mgr.wait_until_finished()
        wall = time.perf_counter() - begun
        mgr.save(20, example_state(1), final=True)
    lines = saved_lines(caplog)
    assert [(s, tier) for s, tier, *_ in lines] == [(10, "local"), (20, "local")]
    (_, _, seconds, size, detail), (*_, final_detail) = lines
    assert 0 < seconds <= wall + 0.006  # to the millisecond, or the hundredth above 0.1 s
    on_disk = tree_bytes(LocalTier(cfg.local_dir).step_dir(10))
    assert size.endswith(" KB") and abs(float(size[:-3]) * 1000 - on_disk) / on_disk < 0.05
    assert (detail, final_detail) == ("", ", final")
    record = next(r for r in caplog.records if SAVED.match(r.getMessage()))
    assert (record.event, record.step, record.tier) == ("saved", 10, "local")  # type: ignore[attr-defined]


def test_a_save_of_milliseconds_does_not_read_zero(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tiered")
    for seconds in (0.004, 0.04, 0.4, 4.0):
        log_saved(logging.getLogger("tiered.test"), step=1, tier="local", seconds=seconds, size=1)
    shown = [float(s) for _, _, s, *_ in saved_lines(caplog)]
    assert shown == [0.004, 0.04, 0.4, 4.0]


def test_jax_monitoring_events(tmp_path: Path) -> None:
    _, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    durations: list[tuple[str, float, dict]] = []
    scalars: list[tuple[str, float, dict]] = []

    def on_duration(event: str, seconds: float, **labels: object) -> None:
        if event.startswith("/tiered/"):
            durations.append((event, seconds, labels))

    def on_scalar(event: str, value: float, **labels: object) -> None:
        if event.startswith("/tiered/"):
            scalars.append((event, value, labels))

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_scalar_listener(on_scalar)
    try:
        with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
            begun = time.perf_counter()
            mgr.save(10, example_state())
            blocked = time.perf_counter() - begun
            mgr.wait_until_finished()
            saved = time.perf_counter() - begun
            mgr.save(30, example_state(1))
            mgr.wait_until_finished()
            local_restore = time.perf_counter()
            assert mgr.restore(example_state()).source == "local"
            local_restore = time.perf_counter() - local_restore
        local, durable = LocalTier(cfg.local_dir), DurableTier(cfg.durable_url)
        promote_step(local, durable, 30)
        local.delete_step(30)
        local.delete_step(10)
        with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
            durable_restore = time.perf_counter()
            assert mgr.restore(example_state()).source == "durable"
            durable_restore = time.perf_counter() - durable_restore
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_scalar_listener(on_scalar)
    by_name: dict[str, list[tuple[float, dict]]] = {}
    for event, seconds, labels in durations:
        by_name.setdefault(event, []).append((seconds, labels))
    blocking = by_name["/tiered/save/blocking_secs"]
    assert len(blocking) == 2 and 0 < blocking[0][0] <= blocked
    local_secs = by_name["/tiered/save/local_secs"]
    assert len(local_secs) == 2 and 0 < local_secs[0][0] <= saved  # may end before save() returns
    restores = by_name["/tiered/restore/secs"]
    assert [labels for _, labels in restores] == [{"source": "local"}, {"source": "durable"}]
    assert 0 < restores[0][0] <= local_restore and 0 < restores[1][0] <= durable_restore
    # when step 30's save starts, a crash would cost the 20 steps since step 10
    assert scalars == [("/tiered/save/steps_at_risk_on_crash", 20, {})]


def test_a_save_that_never_finalized_lends_no_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Step 10's async save failed on orbax's finalize thread (no callback came); orbax raised
    it on the next wait. Step 20's line must name step 20."""
    caplog.set_level(logging.INFO, logger="tiered")
    local = LocalTier(tmp_path)
    local.ensure()
    saves = SaveRecord(local)
    saves.started(10, "periodic", time.perf_counter())
    saves.settled()  # what the manager does when orbax raises or has waited
    saves.started(20, "periodic", time.perf_counter())
    local.step_dir(20).mkdir()
    (local.step_dir(20) / "data").write_bytes(b"x" * 1500)
    saves.finished()
    saves.finished()  # a stray callback logs nothing
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Saved")]
    assert len(said) == 1 and said[0].startswith("Saved checkpoint at step 20 (local, ")
    assert said[0].endswith(" s, 1.5 KB)")

"""What an interruption would cost now, and what each checkpoint period costs. Pure functions
of a snapshot, the settings and measured times; no I/O.

**At risk.** The trainer's current step is not on disk, so it is estimated: the newest local
step plus the time since it was committed, divided by the time per step measured between
consecutive saves (the median over the local steps). Then

- a crash (the process dies, the node lives) loses the steps since the newest local step;
- a preemption or Ctrl+C loses nothing when the trainer writes a checkpoint on the signal
  (``tiered.CheckpointManager`` does); MaxText's multi-tier path writes none, so there it costs
  what a crash does;
- losing the node (its disk with it) loses the steps since the newest durable step, or since
  the newest step its peers hold a copy of, when that is newer (peer replication).

**Advice** (``tiered advise``), the Young/Daly first-order optimum: with C the time a checkpoint
costs the run and M the mean time between interruptions, checkpointing every
``sqrt(2 * C * M)`` seconds minimises the expected time lost, which is then about
``C / T + T / (2 M)`` of the run for an interval T (the checkpoint cost, plus on average half an
interval redone per interruption). Locally, C is the trainer's blocking time per save and M
the time between crashes or preemptions; durably, C is the time an upload holds the daemon
(it does not block the trainer, so it bounds how often steps can be made durable) and M the
time between losses of a node.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tiered.types import DurableStep, LocalStep


def step_seconds(local: Sequence[LocalStep]) -> float | None:
    """Seconds per training step, from consecutive committed local steps' commit times."""
    timed = sorted((s.step, s.commit_time) for s in local if s.committed and s.commit_time)
    rates = [
        (t2 - t1) / (s2 - s1)
        for (s1, t1), (s2, t2) in itertools.pairwise(timed)
        if s2 > s1 and t2 > t1
    ]
    return statistics.median(rates) if rates else None


@dataclass(frozen=True)
class Loss:
    steps: int | None
    """Steps that would be redone (None: unknown, there is no rate yet)."""
    seconds: float | None
    """Training time they stand for."""


def at_risk(
    local: Sequence[LocalStep],
    durable: Sequence[DurableStep] | None,
    *,
    now: float,
    saves_on_signal: bool,
    trainer_running: bool | None = None,
    replicated: int | None = None,
    local_period: int | None = None,
) -> dict[str, Loss]:
    """What a crash, a preemption and the loss of this node would each cost at ``now``.

    ``replicated``: the newest local step every one of this node's peers holds a copy of;
    losing the node then costs only the steps since it (or since the newest durable step, when
    that is newer).

    The trainer is taken to be where its last save left it (nothing more to lose locally) once
    that save was its final one, when ``trainer_running`` is False (its lock is free), or, when
    nothing says whether it runs, once it is more than two ``local_period``s past its newest
    save (a running trainer would have saved again by then)."""
    committed = [s for s in local if s.committed]
    newest = max(committed, key=lambda s: s.step, default=None)
    kept = [d for d in durable or () if d.kept]
    newest_durable = max(kept, key=lambda d: d.step, default=None)
    per_step = step_seconds(local)
    stopped = trainer_running is False or (newest is not None and newest.reason == "final")
    if newest is not None and stopped:
        current: float | None = float(newest.step)
    elif newest is None or newest.commit_time is None or per_step is None:
        current = None
    else:
        current = newest.step + max(0.0, now - newest.commit_time) / per_step
        if trainer_running is None and local_period and current - newest.step > 2 * local_period:
            current = float(newest.step)

    def since(step: int | None, when: float | None) -> Loss:
        if current is None:
            return Loss(None, max(0.0, now - when) if when else None)
        done = max(0.0, current - (step if step is not None else 0))
        return Loss(round(done), done * per_step if per_step else (0.0 if not done else None))

    crash = since(newest.step if newest else None, newest.commit_time if newest else None)
    node = since(
        newest_durable.step if newest_durable else None,
        newest_durable.commit_time if newest_durable else None,
    )
    if replicated is not None and (newest_durable is None or replicated > newest_durable.step):
        copy = next((s for s in committed if s.step == replicated), None)
        node = since(replicated, copy.commit_time if copy else None)
    return {"crash": crash, "preemption": Loss(0, 0.0) if saves_on_signal else crash, "node": node}


def risk_now(
    local: Sequence[LocalStep],
    durable: Sequence[DurableStep] | None,
    *,
    now: float,
    saves_on_signal: bool,
    cannot_promote: str | None,
    local_period: int,
    trainer_running: bool | None = None,
    replicated: int | None = None,
) -> tuple[dict[str, Loss], dict[str, str]]:
    """``at_risk`` as ``tiered status`` and the daemon's ``tiered_at_risk_steps`` both report
    it, with a note per figure that needs one. ``durable`` None: the tier was not read, so the
    loss of the node is unknown. ``cannot_promote``: why no daemon can make a step durable now
    (none runs, it does not answer, the durable tier does not answer it), or None when one can.
    Then a preemption's step is saved locally but not made durable: a preemption that takes the
    node costs what losing the node does."""
    risk = at_risk(
        local,
        durable,
        now=now,
        saves_on_signal=saves_on_signal,
        trainer_running=trainer_running,
        replicated=replicated,
        local_period=local_period,
    )
    notes: dict[str, str] = {}
    if durable is None:
        notes["node"] = "the durable tier was not read"
    if saves_on_signal and cannot_promote is not None:
        risk["preemption"] = risk["node"]
        notes["preemption"] = cannot_promote
    return risk, notes


def held_by_every_peer(steps: Iterable[int | None]) -> int | None:
    """The newest local step every peer holds a copy of, from each peer's newest (None: some
    peer holds none, or there are no peers)."""
    held = list(steps)
    if not held or any(s is None for s in held):
        return None
    return min(s for s in held if s is not None)


@dataclass(frozen=True)
class Advice:
    interval_seconds: float
    """The Young/Daly interval."""
    period_steps: int
    """The interval in steps, rounded to a whole step (and to the other period's multiple)."""
    overhead: float
    """Fraction of the run spent on checkpoints and on redoing lost work, at ``period_steps``."""
    current_overhead: float
    """The same fraction at the current setting."""
    loss_per_interruption_seconds: float
    """Expected training time redone per interruption at ``period_steps`` (half an interval)."""


def young_daly(cost_seconds: float, mtbf_seconds: float) -> float:
    """The checkpoint interval that minimises the expected lost time: sqrt(2 C M)."""
    return math.sqrt(2.0 * cost_seconds * mtbf_seconds)


def overhead(interval: float, cost_seconds: float, mtbf_seconds: float) -> float:
    """Fraction of the run lost at ``interval``: C / T for checkpointing, T / 2M for redoing."""
    return cost_seconds / interval + interval / (2.0 * mtbf_seconds)


def advise(
    *,
    cost_seconds: float,
    mtbf_seconds: float,
    step_seconds: float,
    current_steps: int,
    multiple_of: int = 1,
) -> Advice:
    """The period (in steps, a multiple of ``multiple_of``) for a checkpoint that costs
    ``cost_seconds``, against interruptions every ``mtbf_seconds`` on average."""
    interval = young_daly(cost_seconds, mtbf_seconds)
    unit = multiple_of * step_seconds
    steps = max(multiple_of, round(interval / unit) * multiple_of)
    at = steps * step_seconds
    return Advice(
        interval_seconds=interval,
        period_steps=steps,
        overhead=overhead(at, cost_seconds, mtbf_seconds),
        current_overhead=overhead(current_steps * step_seconds, cost_seconds, mtbf_seconds),
        loss_per_interruption_seconds=at / 2.0,
    )


@dataclass(frozen=True)
class Interruptions:
    """How many of each kind a run meets (expected, or counted from a trace)."""

    crashes: float = 0.0
    """The process dies, the node lives (kill -9, an OOM): back to the newest local step."""
    preemptions: float = 0.0
    """SIGTERM or Ctrl+C: a checkpoint is written on the signal, nothing is redone."""
    node_losses: float = 0.0
    """The node and its disk gone: back to the newest durable step (or a peer's copy)."""

    @property
    def total(self) -> float:
        return self.crashes + self.preemptions + self.node_losses


@dataclass(frozen=True)
class GoodputForecast:
    goodput: float
    """Useful step time over wall time, restarts included."""
    lost_seconds: dict[str, float]
    """Wall time by cause: ``saves`` (blocking), ``redone``, ``restoring``, ``restarts``."""


def forecast_goodput(
    *,
    steps: int,
    step_seconds: float,
    local_period: int,
    durable_period: int,
    save_seconds: float,
    preemption_save_seconds: float,
    restore_seconds: float,
    restart_seconds: float,
    durable_lag_seconds: float,
    interruptions: Interruptions,
    peer_period: int | None = None,
    local_lag_seconds: float = 0.0,
    node_restore_seconds: float | None = None,
    final_save_seconds: float = 0.0,
) -> GoodputForecast:
    """The goodput of a run of ``steps`` steps with tiered checkpointing, to first order.

    Each periodic local save blocks ``save_seconds`` and the final one ``final_save_seconds``;
    each interruption costs a restart and a restore, and redoes on average half an interval
    plus the lag until that interval's checkpoint has committed (a failure inside the lag goes
    back one interval more): after a crash, half a local period and ``local_lag_seconds``
    (the asynchronous save's commit); nothing after a preemption (which blocks
    ``preemption_save_seconds`` instead); after a lost node, half a durable period plus
    ``durable_lag_seconds`` until a durable step has committed (or half of ``peer_period``
    with a peer holding a copy of every local step), and the restore is a download
    (``node_restore_seconds``, default ``restore_seconds``).

    Plain orbax straight to the durable tier is the same model with every interruption a
    crash, its save period as ``local_period`` and its commit lag as ``local_lag_seconds``."""
    per_node = (
        peer_period * step_seconds / 2
        if peer_period
        else durable_period * step_seconds / 2 + durable_lag_seconds
    )
    node_restore = restore_seconds if node_restore_seconds is None else node_restore_seconds
    useful = steps * step_seconds
    lost = {
        "saves": steps / local_period * save_seconds
        + interruptions.preemptions * preemption_save_seconds
        + final_save_seconds,
        "redone": interruptions.crashes * (local_period * step_seconds / 2 + local_lag_seconds)
        + interruptions.node_losses * per_node,
        "restoring": (interruptions.crashes + interruptions.preemptions) * restore_seconds
        + interruptions.node_losses * node_restore,
        "restarts": interruptions.total * restart_seconds,
    }
    return GoodputForecast(goodput=useful / (useful + sum(lost.values())), lost_seconds=lost)

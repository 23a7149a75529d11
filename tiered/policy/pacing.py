"""How fast a periodic transfer goes when no cap is set (``tiered.transfer_pacing``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tiered.policy.inputs import Pacing, Rules
from tiered.types import PRECIOUS_REASONS, LocalStep, Reason


@dataclass(frozen=True)
class Pace:
    """One transfer's pace: bytes per second (None: full speed), the seconds it should take at
    that pace (None: not known), and why, in words for the status."""

    bytes_per_s: float | None
    within_s: float | None
    why: str


def seconds_per_step(local: Sequence[LocalStep]) -> float | None:
    """The trainer's wall time per step: what its newest save recorded, else the spacing of the
    two newest committed local steps (None: not known yet)."""
    committed = [s for s in local if s.committed]
    if not committed:
        return None
    if committed[-1].seconds_per_step:
        return committed[-1].seconds_per_step
    timed = [s for s in committed if s.commit_time is not None]
    if len(timed) >= 2:
        a, b = timed[-2], timed[-1]
        spent = (b.commit_time or 0.0) - (a.commit_time or 0.0)
        if spent > 0:
            return spent / (b.step - a.step)
    return None


def upload_pace(
    size: int | None, reason: Reason, *, local: Sequence[LocalStep], rules: Rules
) -> Pace:
    """The pace of one upload of ``size`` bytes owed for ``reason``."""
    if rules.pacing is None:
        return Pace(None, None, "unpaced (tiered.transfer_pacing: null)")
    if reason in PRECIOUS_REASONS:
        return Pace(None, None, f"{reason}: full speed")
    per_step = seconds_per_step(local)
    horizon = rules.durable_period * per_step if per_step else None
    if rules.backup_interval_seconds:
        horizon = min(horizon or rules.backup_interval_seconds, rules.backup_interval_seconds)
    return _paced(size, horizon, rules.pacing, "the next durable step")


def replication_pace(
    size: int | None, reason: Reason, *, local: Sequence[LocalStep], rules: Rules
) -> Pace:
    """The pace of one copy of a local step to a peer: within a share of a local period."""
    if rules.pacing is None:
        return Pace(None, None, "unpaced (tiered.transfer_pacing: null)")
    if reason in PRECIOUS_REASONS:
        return Pace(None, None, f"{reason}: full speed")
    per_step = seconds_per_step(local)
    horizon = rules.local_period * per_step if per_step and rules.local_period else None
    return _paced(size, horizon, rules.pacing, "the next local step")


def _paced(size: int | None, horizon: float | None, pacing: Pacing, until: str) -> Pace:
    if horizon is None:
        rate = pacing.unknown_bytes_per_s
        within = size / rate if size else None
        return Pace(rate, within, f"at {rate / 1e6:.0f} MB/s until the step time is known")
    rate = max(pacing.floor_bytes_per_s, (size or 0) / (horizon * pacing.share))
    within = (size or 0) / rate
    return Pace(
        rate,
        within,
        f"paced to {rate / 1e6:.1f} MB/s: {within:.0f} s, within {pacing.share:.0%} of the "
        f"{horizon:.0f} s to {until}",
    )

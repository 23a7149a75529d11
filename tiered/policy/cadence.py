"""When the training API saves: the reason a save of a step has, or none (no save)."""

from __future__ import annotations

from tiered.types import Reason


def is_periodic(step: int, local_period: int) -> bool:
    """Whether ``step`` is on the local period (a periodic save)."""
    return step % local_period == 0


def save_reason(
    step: int,
    *,
    local_period: int,
    signalled: bool,
    final: bool,
    force: bool = False,
    save_on_completion: bool = True,
) -> Reason | None:
    """Why ``save(step)`` writes a step, or None when it writes nothing: after a signal, the
    preemption save (whatever the step); a final save when the config keeps one
    (``save_checkpoint_on_completion``); otherwise a periodic one, on the local period or when
    forced."""
    if signalled:
        return "preemption"
    if final:
        return "final" if save_on_completion else None
    if force or is_periodic(step, local_period):
        return "periodic"
    return None

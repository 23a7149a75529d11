"""The one restore choice: for one node (``restore_options``) and for several (``agree_step``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from tiered.types import DurableStep, LocalStep

if TYPE_CHECKING:
    pass

from tiered.policy.actions import RestoreOption

# -- the one restore choice ----------------------------------------------------------------------


def restore_options(
    local: Iterable[LocalStep], durable: Iterable[DurableStep], *, nodes: int = 1
) -> list[RestoreOption]:
    """Every step a restore may use, newest first; local wins a tie, since it is the trainer's
    latest save of that number. Foreign durable steps cannot be verified, and local steps saved
    by a job of another shape (not ``nodes`` nodes) hold the wrong shards: both are left out."""
    out: dict[int, RestoreOption] = {
        d.step: RestoreOption(d.step, "durable") for d in durable if d.own
    }
    out.update(
        {s.step: RestoreOption(s.step, "local") for s in local if s.committed and s.fits(nodes)}
    )
    return [out[s] for s in sorted(out, reverse=True)]


def agree_step(
    local_by_node: Mapping[int, Iterable[int]],
    durable: Iterable[int],
    *,
    epochs: Mapping[int, Mapping[int, int]] | None = None,
) -> int | None:
    """Several nodes: the newest step every node holds locally, or the newest durable step when
    that is newer (a node without it downloads its part).

    ``epochs`` (node -> step -> the restore epoch it was saved under, where recorded): a step
    whose nodes recorded different epochs is not one checkpoint but parts of two runs (one node
    kept, or got back from a peer, a copy saved before a rollback), and is never chosen."""
    sets = [set(steps) for steps in local_by_node.values()]
    common = set.intersection(*sets) if sets else set()
    if epochs:
        common = {
            s
            for s in common
            if len({by_step[s] for by_step in epochs.values() if s in by_step}) <= 1
        }
    return max(common | set(durable), default=None)

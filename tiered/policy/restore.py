"""The one restore choice: for one node (``restore_options``) and for several (``agree_step``)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Literal

from tiered.policy.actions import RestoreOption
from tiered.types import DurableStep, LocalStep

FIRST_LISTING_WAIT_SECONDS = 60.0
"""How long the daemon waits for its first listing of the durable tier before it chooses the step
orbax's multi-tier client restores without one (the listing may hold a newer step)."""

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


def restore_choice_ready(
    *, durable_listed: bool, waited_seconds: float, wait: float = FIRST_LISTING_WAIT_SECONDS
) -> bool:
    """Whether to choose the restore step now: once the durable tier has been listed, or after
    ``wait`` seconds without a listing (an unreachable store must not hold the restore forever;
    the local tier's newest step is then the best there is)."""
    return durable_listed or waited_seconds >= wait


def newer_than(steps: Iterable[int], step: int | None) -> list[int]:
    """The steps, oldest first, that the run saves again once it goes on from ``step`` (all of
    them for None, a fresh start): after a restore agreement on an older step, or a rollback.
    Such local steps are set aside and such peer copies dropped."""
    return sorted(s for s in set(steps) if step is None or s > step)


def save_over(
    step: int, *, local: Collection[int], saved_here: Collection[int], restored: int
) -> Literal["save", "done", "rolled_back"]:
    """What a save of ``step`` meets on the local tier: nothing (``save``); this run's own save
    of it, or a step it restored from or passed (``done``: nothing to write); or a step of that
    number from another trajectory (``rolled_back``: the run went back to an older step, or
    started afresh, and reached this number again, so the local steps from ``step`` on are set
    aside before it saves)."""
    if step not in local:
        return "save"
    if step in saved_here or step <= restored:
        return "done"
    return "rolled_back"


def may_read_in_place(*, durable_restore: str, several_nodes: bool) -> bool:
    """Whether a step only the durable tier holds may be read by orbax straight from the store
    (then copied to the local tier in the background), provided the store vouches for every
    byte: with ``tiered.durable_restore: store``, and on one node (several nodes restore their
    parts through the local tier, as orbax's multi-tier client reads)."""
    return durable_restore == "store" and not several_nodes

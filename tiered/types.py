"""Plain data shared by storage, policy and status: what each tier knows about a step.

This module is the bottom layer: it imports nothing of tiered's, does no I/O and holds no
logic beyond validating its own values. Storage builds these facts, the planner decides over
them, and the status renders them.

Identity is by content. ``identity`` is the digest of a step's manifest (the relative path,
size and crc32c of every file), so two steps with the same number are the same checkpoint only
when their identities are equal; the number alone proves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Reason = Literal["periodic", "preemption", "final", "unknown"]
REASONS: tuple[Reason, ...] = ("periodic", "preemption", "final")
"""The reasons a trainer records in a step's ``custom_metadata``."""
PRECIOUS_REASONS: frozenset[str] = frozenset({"preemption", "final"})
"""Steps that end a run: always promoted, newest first, and what a resume needs."""


def as_reason(value: object) -> Reason:
    """A recorded reason, or ``unknown`` for anything that is not one of ours."""
    for reason in REASONS:
        if value == reason:
            return reason
    return "unknown"


@dataclass(frozen=True)
class Topology:
    """Which node this process is, of how many. An immutable value: a changed topology is a
    new value handed to whoever needs it, never a mutation of a live object."""

    rank: int = 0
    nodes: int = 1

    def __post_init__(self) -> None:
        if self.nodes < 1 or not 0 <= self.rank < self.nodes:
            raise ValueError(f"node rank {self.rank} must be in 0..{self.nodes - 1}")

    @property
    def multi(self) -> bool:
        return self.nodes > 1

    @property
    def committer(self) -> bool:
        """Node 0 commits multi-node steps and is the one writer that deletes durable steps."""
        return self.rank == 0


@dataclass(frozen=True)
class LocalStep:
    """One step directory on the local tier."""

    step: int
    committed: bool
    reason: Reason = "unknown"
    commit_time: float | None = None
    size: int | None = None
    is_link: bool = False
    identity: str | None = None
    """The digest of the step's manifest, once the daemon has checksummed it."""
    nodes: int | None = None
    """The node count of the job that saved it, where the saver recorded it (tiered's
    ``CheckpointManager`` does): a step of another shape holds one process's shards of another
    mesh, so it is never restored, promoted or taken for a copy."""

    epoch: int | None = None
    """The restore epoch of the run that saved it (``tiered.coord``), where recorded: the nodes'
    parts of one save share it, and a step saved again after a rollback has a higher one."""
    seconds_per_step: float | None = None
    """The trainer's wall time per step before this save, where it recorded one."""

    def fits(self, nodes: int) -> bool:
        """Whether a job of ``nodes`` nodes may use this step (unknown shapes may)."""
        return self.nodes is None or self.nodes == nodes


@dataclass(frozen=True)
class DurableStep:
    """One step prefix on the durable tier.

    ``committed`` means the commit marker is there; ``tiered`` that a tiered manifest could be
    read, so the step can be verified. ``identity`` is that of this node's files (its part
    marker, with several nodes), set only when this node has a part to restore. A committed step
    with no tiered manifest was written by some other tool or is damaged: it is ``foreign``,
    never taken for a copy of anything, restored from, or deleted.
    """

    step: int
    committed: bool
    identity: str | None = None
    reason: Reason = "unknown"
    commit_time: float | None = None
    size: int | None = None
    problem: str | None = None
    """Why a committed step has no identity (no manifest, an unreadable one, another shape)."""
    tiered: bool = True

    @property
    def foreign(self) -> bool:
        return self.committed and not self.tiered

    @property
    def kept(self) -> bool:
        """A committed step of tiered's: what durable retention counts and prunes."""
        return self.committed and self.tiered

    @property
    def own(self) -> bool:
        """A committed step this node can verify and restore."""
        return self.committed and self.identity is not None


@dataclass(frozen=True)
class Displaced:
    """A step moved aside because another step with its number had to take its place."""

    name: str
    step: int
    moved_at: float | None = None
    tier: str = "durable"

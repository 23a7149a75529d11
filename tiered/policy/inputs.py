"""What the planner is given: the rules (from the config) and one snapshot of both tiers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from tiered.types import DurableStep, LocalStep, Topology

if TYPE_CHECKING:
    pass

from tiered.policy.retention import AnyOf, EveryNSteps, KeepAll, LatestN, PreservationRule

# -- inputs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pacing:
    """How fast a periodic transfer goes when no cap is set: fast enough to end within
    ``share`` of the expected time until the next step it protects against (the next durable
    step for an upload, the next local step for a copy to a peer), never slower than
    ``floor_bytes_per_s``, and at ``unknown_bytes_per_s`` until the trainer's step time is
    known. So a periodic durable step commits within ``share`` of a durable period of its start,
    and training keeps the host (docs/benchmarks.md, interference). Preemption and final steps
    are never paced."""

    share: float = 0.5
    floor_bytes_per_s: float = 2e6
    unknown_bytes_per_s: float = 25e6

    def __post_init__(self) -> None:
        if not 0 < self.share <= 1:
            raise ValueError(f"Pacing needs 0 < share <= 1, got {self.share}")
        if self.floor_bytes_per_s <= 0 or self.unknown_bytes_per_s <= 0:
            raise ValueError("Pacing needs positive rates")


@dataclass(frozen=True)
class Rules:
    """What the configuration says; validated when built."""

    durable_period: int
    local_max_to_keep: int
    backup_interval_seconds: float | None = None
    max_num_checkpoints_to_keep: int | None = None
    keep_period: int | None = None
    backlog: Literal["all", "newest"] = "all"
    topology: Topology = field(default_factory=Topology)
    local_period: int | None = None
    """Steps that are multiples of this and carry no recorded reason were saved periodically."""
    last_step: int | None = None
    """The run's last step (MaxText's ``steps`` - 1), when known: its save is the final one."""
    final_after_idle_seconds: float | None = None
    """With no trainer lock to tell, the run counts as ended once its newest local step is this
    old, and at least three of its usual save intervals: that step is then owed as final."""
    pacing: Pacing | None = None
    """How periodic transfers are paced when no cap is set; None: full speed."""

    def __post_init__(self) -> None:
        if self.durable_period <= 0:
            raise ValueError(f"durable_period must be positive, got {self.durable_period}")
        if self.local_max_to_keep < 1:
            raise ValueError(f"local_max_to_keep must be >= 1, got {self.local_max_to_keep}")
        if self.max_num_checkpoints_to_keep is not None and self.max_num_checkpoints_to_keep < 1:
            raise ValueError("max_num_checkpoints_to_keep must be >= 1 or None")

    def durable_rule(self) -> PreservationRule:
        keep_n = self.max_num_checkpoints_to_keep
        rules: list[PreservationRule] = [LatestN(1)]
        rules.append(KeepAll() if keep_n is None else LatestN(keep_n))
        if self.keep_period:
            rules.append(EveryNSteps(self.keep_period))
        return AnyOf(tuple(rules))


@dataclass(frozen=True)
class Snapshot:
    """Both tiers and the daemon's state at one moment.

    ``durable`` is None while the durable tier cannot be listed: then nothing is deleted on
    either tier because of what the durable tier holds, and nothing durable is deleted at all.
    """

    now: float
    local: tuple[LocalStep, ...] = ()
    durable: tuple[DurableStep, ...] | None = ()
    busy: frozenset[int] = frozenset()
    """Steps a worker is uploading, moving aside or staging right now."""
    staged: frozenset[int] = frozenset()
    """Steps held for a restore the trainer is about to read."""
    failed: Mapping[int, str] = field(default_factory=dict)
    """Steps whose promotion failed permanently, with the reason; their local copy is kept."""
    retry_at: Mapping[int, float] = field(default_factory=dict)
    """Steps whose last promotion failed transiently: not tried again before this time."""
    parts: Mapping[int, int] = field(default_factory=dict)
    """Several nodes: steps whose part this node uploaded, by the restore epoch it carries."""
    epoch: int = 0
    abandoned: frozenset[int] = frozenset()
    pruned: Mapping[int, str] = field(default_factory=dict)
    """Durable steps this daemon deleted under retention, by identity: never uploaded again."""
    disk_pressure: bool = False
    run_ended: bool = False
    """The trainer is gone (or the daemon drains with no trainer running): the newest local step
    is owed to the durable tier whatever its number."""
    trainer_running: bool = False
    """A ``tiered.CheckpointManager`` holds its lock: the run has not ended, however idle."""
    draining: bool = False
    """The daemon is stopping: what it still owes must move at full speed, within its grace."""

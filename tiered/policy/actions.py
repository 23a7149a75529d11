"""What the planner answers: typed actions, a verdict per step, the restore options."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from tiered.types import Reason

if TYPE_CHECKING:
    pass


Tier = Literal["local", "durable"]

# -- outputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """Checksum a local step (build and keep its manifest) so its identity is known."""

    step: int
    why: str


@dataclass(frozen=True)
class Upload:
    step: int
    reason: Reason
    bytes_per_s: float | None = None
    """The pace (``upload_pace``); None: full speed."""
    pace_why: str = field(default="", compare=False)
    """The pace in words, with the time the upload should take and the bound it keeps (for
    the status; not part of what the action is)."""


@dataclass(frozen=True)
class FullSpeed:
    """Lift the pace of the transfers in flight: a preemption or final step is waiting behind
    one, the run ended, or the daemon is stopping."""

    why: str


@dataclass(frozen=True)
class Displace:
    """Move a durable step aside (to ``.tiered/displaced``): it holds other content than the
    local step of the same number, which must take its place."""

    step: int
    why: str


@dataclass(frozen=True)
class Commit:
    """Node 0: commit a multi-node step once every node's part is in."""

    step: int
    epoch: int


@dataclass(frozen=True)
class ForgetPart:
    """Stop waiting for the commit of this node's part of a step."""

    step: int
    why: str


@dataclass(frozen=True)
class Abandon:
    """Give up on a multi-node step that can never commit: a newer step is durable."""

    step: int
    why: str


@dataclass(frozen=True)
class Skip:
    """An owed step that is not uploaded, and why (shown in the status)."""

    step: int
    why: str


@dataclass(frozen=True)
class Delete:
    tier: Tier
    step: int
    why: str


Action = Fingerprint | Upload | FullSpeed | Displace | Commit | ForgetPart | Abandon | Skip | Delete

State = Literal[
    "committed",
    "due",
    "uploading",
    "retrying",
    "failed",
    "skipped",
    "conflict",
    "committing",
    "abandoned",
    "local",
    "partial",
    "foreign",
]


@dataclass(frozen=True)
class Verdict:
    """Where a step stands and why, in words a user can act on."""

    state: State
    why: str
    tiers: tuple[Tier, ...]
    """The tiers that hold this step's content (a durable step of the same number with other
    content does not count)."""
    reason: Reason = "unknown"


@dataclass(frozen=True)
class RestoreOption:
    step: int
    source: Tier


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = ()
    verdicts: Mapping[int, Verdict] = field(default_factory=dict)
    restore: tuple[RestoreOption, ...] = ()
    """Restore candidates, best first."""
    owed: frozenset[int] = frozenset()
    """Steps that must still become durable (wanted, not yet a copy, not failed)."""
    pinned: frozenset[int] = frozenset()
    """Local steps retention keeps whatever their age."""

    def of(self, kind: type) -> list:
        return [a for a in self.actions if isinstance(a, kind)]

    @property
    def uploads(self) -> list[Upload]:
        return self.of(Upload)

    @property
    def deletes(self) -> list[Delete]:
        return self.of(Delete)

    @property
    def skipped(self) -> list[int]:
        return [a.step for a in self.of(Skip)]


def pins(state: State) -> bool:
    return state in ("due", "uploading", "retrying", "failed", "conflict", "committing")

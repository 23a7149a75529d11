"""Pure promotion and retention decisions.

Given a snapshot of both tiers (``StepInfo`` rows), what is in flight, the clock and the config,
decide what to promote and what to delete on each tier. Nothing here does I/O or reads the clock:
the time comes in ``PolicyContext.now``, so every rule is tested with plain data.

Retention rules are small frozen dataclasses (``LatestN``, ``EveryNSteps``, ``Steps``) combined
with ``AnyOf``; each takes the steps, oldest first, and returns a keep-mask aligned with them.

The invariants the planner keeps:
- a local step that is due but not yet durable, being uploaded, staged for restore, or failed
  (kept for a human to look at) is never deleted;
- the newest committed durable step is never deleted;
- a partial durable upload is deleted only when nothing can finish it any more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from tiered.config import TieredConfig

PRECIOUS_REASONS = frozenset({"preemption", "final"})


@dataclass(frozen=True)
class StepFacts:
    """What one tier knows about one step (built by ``tiered.storage``)."""

    step: int
    committed: bool
    reason: str = "unknown"
    commit_time: float | None = None
    size: int | None = None
    is_link: bool = False


@dataclass(frozen=True)
class StepInfo:
    """One step, as seen on both tiers."""

    step: int
    reason: str = "unknown"
    commit_time: float | None = None
    local: bool = False
    durable: bool = False
    durable_partial: bool = False
    local_link: bool = False
    local_size: int | None = None
    durable_size: int | None = None


# -- preservation rules --------------------------------------------------------------------------


class PreservationRule(Protocol):
    def keep(self, steps: Sequence[int]) -> list[bool]: ...


@dataclass(frozen=True)
class LatestN:
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"LatestN needs n >= 0, got {self.n}")

    def keep(self, steps: Sequence[int]) -> list[bool]:
        newest = set(sorted(steps)[-self.n :]) if self.n else set()
        return [s in newest for s in steps]


@dataclass(frozen=True)
class EveryNSteps:
    n: int

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError(f"EveryNSteps needs n > 0, got {self.n}")

    def keep(self, steps: Sequence[int]) -> list[bool]:
        return [s % self.n == 0 for s in steps]


@dataclass(frozen=True)
class Steps:
    """Keep exactly these steps (pins)."""

    steps: frozenset[int]

    def keep(self, steps: Sequence[int]) -> list[bool]:
        return [s in self.steps for s in steps]


@dataclass(frozen=True)
class KeepAll:
    def keep(self, steps: Sequence[int]) -> list[bool]:
        return [True] * len(steps)


@dataclass(frozen=True)
class AnyOf:
    rules: tuple[PreservationRule, ...]

    def keep(self, steps: Sequence[int]) -> list[bool]:
        mask = [False] * len(steps)
        for rule in self.rules:
            mask = [a or b for a, b in zip(mask, rule.keep(steps), strict=True)]
        return mask


# -- context and plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyContext:
    now: float
    durable_period: int
    local_max_to_keep: int
    backup_interval_seconds: float | None = None
    max_num_checkpoints_to_keep: int | None = None
    keep_period: int | None = None
    backlog: Literal["all", "newest"] = "all"
    disk_pressure: bool = False
    in_flight: frozenset[int] = frozenset()
    staged: frozenset[int] = frozenset()
    failed: frozenset[int] = frozenset()
    abandoned: frozenset[int] = frozenset()
    """Multi-node steps this node gave up on: never committed (a node's part never came), and a
    newer step is durable. They are neither promoted again nor pinned."""

    def __post_init__(self) -> None:
        if self.durable_period <= 0:
            raise ValueError(f"durable_period must be positive, got {self.durable_period}")
        if self.local_max_to_keep < 1:
            raise ValueError(f"local_max_to_keep must be >= 1, got {self.local_max_to_keep}")


@dataclass(frozen=True)
class Promote:
    step: int
    reason: str


@dataclass(frozen=True)
class Delete:
    tier: Literal["local", "durable"]
    step: int
    why: str


@dataclass(frozen=True)
class Plan:
    promote: tuple[Promote, ...] = ()
    delete: tuple[Delete, ...] = ()
    skipped: tuple[int, ...] = ()
    pinned: frozenset[int] = field(default_factory=frozenset)


# -- decisions -----------------------------------------------------------------------------------


def merge_inventories(local: Sequence[StepFacts], durable: Sequence[StepFacts]) -> list[StepInfo]:
    """Join the two tiers' facts by step, oldest first. Uncommitted local dirs are left out."""
    rows: dict[int, StepInfo] = {}
    for f in durable:
        rows[f.step] = StepInfo(
            step=f.step,
            reason=f.reason,
            commit_time=f.commit_time,
            durable=f.committed,
            durable_partial=not f.committed,
            durable_size=f.size,
        )
    for f in local:
        if not f.committed:
            continue
        prev = rows.get(f.step, StepInfo(step=f.step))
        rows[f.step] = replace(
            prev,
            reason=f.reason if f.reason != "unknown" else prev.reason,
            commit_time=f.commit_time if f.commit_time is not None else prev.commit_time,
            local=True,
            local_link=f.is_link,
            local_size=f.size,
        )
    return [rows[s] for s in sorted(rows)]


def due_steps(steps: Sequence[StepInfo], ctx: PolicyContext) -> list[int]:
    """Committed local steps not yet durable that the promotion rules name, oldest first.

    Step 0 is not due by the period rule: it holds the initial state, which a fresh start
    recreates at no cost, so uploading it would only spend bandwidth.
    """
    durable_times = [s.commit_time for s in steps if s.durable and s.commit_time is not None]
    reference = max(durable_times) if durable_times else None
    interval = ctx.backup_interval_seconds
    due = []
    for s in steps:
        if not s.local or s.durable or s.step in ctx.abandoned:
            continue
        # A newer step committed "before" the newest durable one means the clock jumped back:
        # back it up rather than wait for the clock to catch up.
        by_time = (
            interval is not None
            and s.commit_time is not None
            and (
                reference is None
                or s.commit_time - reference >= interval
                or s.commit_time < reference
            )
        )
        periodic = s.step > 0 and s.step % ctx.durable_period == 0
        if by_time or periodic or s.reason in PRECIOUS_REASONS:
            due.append(s.step)
            # The next time-based backup is measured from the newest step that will be durable.
            if s.commit_time is not None:
                reference = s.commit_time
    return due


def plan_promotions(
    steps: Sequence[StepInfo], ctx: PolicyContext
) -> tuple[list[Promote], list[int]]:
    """(what to promote, in order; what the backlog policy skips).

    Preemption and final steps go first, newest first: they are what a resume needs. The rest
    go oldest first. With ``backlog="newest"`` only the newest due step is kept and older ones
    that have not started are skipped, as is any due step older than the newest durable one.
    """
    by_step = {s.step: s for s in steps}
    due = [s for s in due_steps(steps, ctx) if s not in ctx.in_flight and s not in ctx.failed]
    skipped: list[int] = []
    if ctx.backlog == "newest" and due:
        newest_durable = max((s.step for s in steps if s.durable), default=-1)
        newest_due = max(due)
        keep = {
            s
            for s in due
            if s == newest_due or (by_step[s].reason in PRECIOUS_REASONS and s > newest_durable)
        }
        skipped = [s for s in due if s not in keep]
        due = [s for s in due if s in keep]
    precious = sorted((s for s in due if by_step[s].reason in PRECIOUS_REASONS), reverse=True)
    rest = [s for s in due if by_step[s].reason not in PRECIOUS_REASONS]
    return [Promote(s, by_step[s].reason) for s in [*precious, *rest]], skipped


def pinned_local(
    steps: Sequence[StepInfo], ctx: PolicyContext, *, skipped: Sequence[int] = ()
) -> frozenset[int]:
    """Local steps that must not be deleted whatever the retention rules say."""
    due = set(due_steps(steps, ctx)) - set(skipped)
    return frozenset(due | ctx.in_flight | ctx.staged | ctx.failed)


def plan_local_retention(
    steps: Sequence[StepInfo], ctx: PolicyContext, *, pinned: frozenset[int]
) -> list[Delete]:
    """Keep the newest ``local_max_to_keep`` (only the newest one under disk pressure) plus pins."""
    local = [s.step for s in steps if s.local]
    keep_n = 1 if ctx.disk_pressure else ctx.local_max_to_keep
    rule = AnyOf((LatestN(keep_n), Steps(pinned)))
    why = "disk pressure" if ctx.disk_pressure else f"local_max_to_keep={ctx.local_max_to_keep}"
    return [
        Delete("local", step, why)
        for step, keep in zip(local, rule.keep(local), strict=True)
        if not keep
    ]


def durable_rule(ctx: PolicyContext) -> PreservationRule:
    keep_n = ctx.max_num_checkpoints_to_keep
    rules: list[PreservationRule] = [LatestN(1)]
    rules.append(KeepAll() if keep_n is None else LatestN(keep_n))
    if ctx.keep_period:
        rules.append(EveryNSteps(ctx.keep_period))
    return AnyOf(tuple(rules))


def plan_durable_retention(
    steps: Sequence[StepInfo], ctx: PolicyContext, *, due: frozenset[int]
) -> list[Delete]:
    """Committed steps beyond the retention rules, and partial uploads nothing can finish."""
    durable = [s.step for s in steps if s.durable]
    deletes = [
        Delete("durable", step, f"max_num_checkpoints_to_keep={ctx.max_num_checkpoints_to_keep}")
        for step, keep in zip(durable, durable_rule(ctx).keep(durable), strict=True)
        if not keep
    ]
    for s in steps:
        if s.durable_partial and s.step not in ctx.in_flight and s.step not in due and not s.local:
            deletes.append(Delete("durable", s.step, "partial upload with no local source"))
    return deletes


def plan(steps: Sequence[StepInfo], ctx: PolicyContext) -> Plan:
    """Everything the daemon should do next for this snapshot."""
    promote, skipped = plan_promotions(steps, ctx)
    pins = pinned_local(steps, ctx, skipped=skipped)
    due = frozenset(due_steps(steps, ctx))
    deletes = plan_local_retention(steps, ctx, pinned=pins) + plan_durable_retention(
        steps, ctx, due=due
    )
    return Plan(promote=tuple(promote), delete=tuple(deletes), skipped=tuple(skipped), pinned=pins)


def context_for(
    cfg: TieredConfig,
    *,
    now: float,
    disk_pressure: bool = False,
    in_flight: frozenset[int] = frozenset(),
    staged: frozenset[int] = frozenset(),
    failed: frozenset[int] = frozenset(),
    abandoned: frozenset[int] = frozenset(),
) -> PolicyContext:
    """The policy context a config implies, plus the live facts the caller knows."""
    return PolicyContext(
        now=now,
        durable_period=cfg.durable_period,
        local_max_to_keep=cfg.tiered.local_max_to_keep,
        backup_interval_seconds=cfg.backup_interval_seconds,
        max_num_checkpoints_to_keep=cfg.max_num_checkpoints_to_keep,
        keep_period=cfg.tiered.keep_period,
        backlog=cfg.tiered.backlog,
        disk_pressure=disk_pressure,
        in_flight=in_flight,
        staged=staged,
        failed=failed,
        abandoned=abandoned,
    )

"""Every decision about a step, as pure functions over one snapshot.

``plan(snapshot, rules)`` answers, for every step on either tier, "what happens to it next, and
why": a ``Verdict`` per step and a list of typed actions (``Fingerprint``, ``Upload``,
``Displace``, ``Commit``, ``ForgetPart``, ``Abandon``, ``Skip``, ``Delete``). The daemon, the CLI
and the status all call it; nothing else decides. ``restore_options`` is the one restore choice
(the training API, orbax's multi-tier protocol, ``tiered restore`` and the status use it), and
``agree_step`` its form for several nodes. Nothing here does I/O or reads the clock: the time
comes in ``Snapshot.now``.

What happens to step N, in order:

1. **Identity.** A durable step is the copy of local step N only when both identities (manifest
   digests) are known and equal. A committed durable step without a readable manifest is
   ``foreign``: never a copy, never restored from, never deleted.
2. **Owed.** A committed local step that is not a copy is owed to the durable tier when its
   reason is preemption or final, when N is a positive multiple of the durable period, when the
   backup interval has passed since the step that is durable before it (or the clock jumped
   back), or when it is the newest local step of a run that ended (the trainer's lock was
   released, the daemon drains with no trainer, or, with no lock to tell, nothing was saved for
   ``final_after_idle_seconds`` and three usual save intervals).
3. **Not wanted after all.** An owed step is skipped when durable retention would delete it at
   once (``superseded`` by steps already committed), when this daemon pruned the same content
   from the durable tier before, or when ``backlog: newest`` passes over it. A skipped step is no
   longer pinned locally.
4. **Next action for a wanted step:** checksum it (``Fingerprint``) when its identity is not
   known yet; move a durable step of the same number but other content out of the way
   (``Displace``, node 0 only) before uploading; otherwise ``Upload``, newest first, preemption
   and final steps before periodic ones. A step being worked on, failed (kept for a human), or
   waiting for its retry time gets no action.
5. **Several nodes.** A part this node uploaded waits for node 0's ``Commit``; it is forgotten
   once committed, gone, or from an older restore epoch, and abandoned when a newer step became
   durable without it.
6. **Retention.** Local: the newest ``local_max_to_keep`` committed steps (only the newest one
   under disk pressure) plus every pinned step (owed and not yet a copy, being worked on, staged
   for restore, failed, or waiting for its commit). Durable (node 0 only, and only while the
   durable tier could be listed): the newest ``max_num_checkpoints_to_keep`` own steps, every
   multiple of ``keep_period``, and always the newest; partial uploads older than the newest
   committed step that nothing can finish.

Retention rules are small frozen dataclasses (``LatestN``, ``EveryNSteps``, ``Steps``) combined
with ``AnyOf``; each takes the steps, oldest first, and returns a keep-mask aligned with them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from tiered.types import PRECIOUS_REASONS, DurableStep, LocalStep, Reason, Topology

if TYPE_CHECKING:
    from tiered.config import TieredConfig

Tier = Literal["local", "durable"]

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


# -- pacing --------------------------------------------------------------------------------------


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


# -- inputs --------------------------------------------------------------------------------------


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


def _pins(state: State) -> bool:
    return state in ("due", "uploading", "retrying", "failed", "conflict", "committing")


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


# -- the planner ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    step: int
    local: LocalStep | None
    durable: DurableStep | None

    @property
    def copy(self) -> bool:
        """The durable step is a verified copy of the local one."""
        return (
            self.local is not None
            and self.durable is not None
            and self.durable.own
            and self.local.identity is not None
            and self.local.identity == self.durable.identity
        )

    @property
    def reason(self) -> Reason:
        if self.local is not None and self.local.reason != "unknown":
            return self.local.reason
        return self.durable.reason if self.durable is not None else "unknown"

    def inferred_reason(self, rules: Rules) -> Reason:
        """The recorded reason, or "periodic" for a reason-less multiple of the local period
        (MaxText records none)."""
        reason = self.reason
        if reason == "unknown" and rules.local_period and self.step % rules.local_period == 0:
            return "periodic"
        return reason

    @property
    def commit_time(self) -> float | None:
        if self.local is not None and self.local.commit_time is not None:
            return self.local.commit_time
        return self.durable.commit_time if self.durable is not None else None


def _rows(snap: Snapshot) -> list[_Row]:
    local = {s.step: s for s in snap.local if s.committed}
    durable = {d.step: d for d in snap.durable or ()}
    return [_Row(s, local.get(s), durable.get(s)) for s in sorted(local.keys() | durable.keys())]


def owed_steps(rows: Sequence[_Row], snap: Snapshot, rules: Rules) -> dict[int, Reason]:
    """Committed local steps the promotion rules name and the durable tier lacks, with the
    reason each is owed (a reason-less step owed as the end of a run counts as ``final``)."""
    interval = rules.backup_interval_seconds
    newest_local = max((r.step for r in rows if r.local is not None), default=None)
    ended = snap.run_ended or (not snap.trainer_running and _idle(rows, snap, rules))
    reference: float | None = None  # when the step durable before this one was saved
    owed: dict[int, Reason] = {}
    for row in rows:
        when = row.commit_time
        if row.local is None or row.copy:
            if row.durable is not None and row.durable.kept and when is not None:
                reference = when
            continue
        if row.step in snap.abandoned or not row.local.fits(rules.topology.nodes):
            continue  # a step of another job shape is no part of this run's checkpoints
        reason: Reason | None = None
        if row.reason in PRECIOUS_REASONS:
            reason = row.reason
        elif row.step == newest_local and _off_period(row, rules):
            # MaxText records no reason: its newest save off the local period is the one it
            # wrote as it stopped (enable_autocheckpoint on SIGTERM, or the run's last step)
            reason = "final" if row.step == rules.last_step else "preemption"
        elif (row.step > 0 and row.step % rules.durable_period == 0) or (
            interval is not None
            and when is not None
            # a step saved "before" the one durable ahead of it: the clock jumped back
            and (reference is None or when - reference >= interval or when < reference)
        ):
            reason = row.reason if row.reason != "unknown" else "periodic"
        elif ended and row.step == newest_local:
            reason = "final"
        if reason is not None:
            owed[row.step] = reason
            if when is not None:
                reference = when
    return owed


def _off_period(row: _Row, rules: Rules) -> bool:
    """A reason-less step off the local period: a save the trainer made as it stopped."""
    period = rules.local_period
    return row.reason == "unknown" and period is not None and period > 0 and row.step % period != 0


def _idle(rows: Sequence[_Row], snap: Snapshot, rules: Rules) -> bool:
    """Whether the newest local step is old enough that the run has probably stopped saving."""
    floor = rules.final_after_idle_seconds
    times = sorted(r.local.commit_time for r in rows if r.local and r.local.commit_time)
    if floor is None or not times:
        return False
    recent = times[-4:]
    gaps = [b - a for a, b in itertools.pairwise(recent) if b > a]
    usual = sorted(gaps)[len(gaps) // 2] if gaps else 0.0
    return snap.now - times[-1] >= max(floor, 3 * usual)


def _superseded(step: int, own_durable: Sequence[int], rules: Rules) -> bool:
    """Whether durable retention would delete ``step`` as soon as it arrived."""
    steps = sorted({*own_durable, step})
    return not rules.durable_rule().keep(steps)[steps.index(step)]


def plan(snap: Snapshot, rules: Rules) -> Plan:
    """Everything that should happen next, and where every step stands."""
    rows = _rows(snap)
    by_step = {r.step: r for r in rows}
    topo = rules.topology
    durable_known = snap.durable is not None
    own_durable = [r.step for r in rows if r.durable is not None and r.durable.kept]
    newest_durable = max(own_durable, default=-1)
    owed = owed_steps(rows, snap, rules)
    verdicts: dict[int, Verdict] = {}
    actions: list[Action] = []
    skips: dict[int, Skip] = {}

    def verdict(step: int, state: State, why: str, *, tiers: tuple[Tier, ...] = ("local",)) -> None:
        reason = owed.get(step, by_step[step].inferred_reason(rules))
        verdicts[step] = Verdict(state, why, tiers, reason)

    def engaged(step: int) -> bool:
        return step in snap.busy or step in snap.parts or step in snap.failed

    # 3. owed steps that are not wanted after all (only knowable while the durable tier is)
    wanted: dict[int, Reason] = {}
    for step, reason in owed.items():
        identity = by_step[step].local.identity  # type: ignore[union-attr]
        if not durable_known or engaged(step):
            wanted[step] = reason
        elif _superseded(step, [s for s in own_durable if s != step], rules):
            skips[step] = Skip(step, "superseded: durable retention keeps newer steps")
        elif identity is not None and snap.pruned.get(step) == identity:
            skips[step] = Skip(step, "pruned from the durable tier before; not uploaded again")
        else:
            wanted[step] = reason
    if rules.backlog == "newest" and wanted:
        newest_wanted = max(wanted)
        for step in sorted(wanted):
            keep = step == newest_wanted or (
                wanted[step] in PRECIOUS_REASONS and step > newest_durable
            )
            if not keep and not engaged(step):
                skips[step] = Skip(step, "backlog: newest (a newer step is due)")
                del wanted[step]

    # 5. parts waiting for node 0
    waiting: dict[int, int] = {}
    for step, epoch in sorted(snap.parts.items()):
        row = by_step.get(step)
        if row is not None and row.copy:
            actions.append(ForgetPart(step, "committed"))
        elif row is None or row.local is None:
            actions.append(ForgetPart(step, "no longer on the local tier"))
        elif epoch != snap.epoch:
            actions.append(
                ForgetPart(step, f"uploaded under restore epoch {epoch}, now {snap.epoch}")
            )
            verdict(step, "due", f"its part is from restore epoch {epoch}: uploading it again")
        elif step < newest_durable:
            why = f"never committed, and the newer step {newest_durable} is durable"
            actions.append(Abandon(step, why))
            verdict(step, "abandoned", why)
        else:
            waiting[step] = epoch

    # 4. the next action for each wanted step, newest first (preemption and final first)
    fingerprints: list[Fingerprint] = []
    transfers: list[Upload | Displace] = []
    for step in sorted(wanted, key=lambda s: (wanted[s] not in PRECIOUS_REASONS, -s)):
        row = by_step[step]
        local = row.local
        assert local is not None
        if step in verdicts:
            continue  # a part forgotten or abandoned above: planned afresh next time
        if step in snap.failed:
            # first: a failed step is never worked on again, so "busy" too means its job has
            # just posted the failure and its lane is a moment from going idle
            verdict(step, "failed", snap.failed[step])
        elif step in snap.busy:
            pace = upload_pace(local.size, wanted[step], local=snap.local, rules=rules)
            verdict(step, "uploading", f"a worker is on it now, {pace.why}")
        elif step in waiting:
            verdict(step, "committing", "this node's part is uploaded; node 0 commits the step")
            if topo.committer:
                actions.append(Commit(step, waiting[step]))
        elif snap.retry_at.get(step, 0.0) > snap.now:
            verdict(step, "retrying", f"retrying in {snap.retry_at[step] - snap.now:.0f} s")
        elif local.identity is None:
            fingerprints.append(Fingerprint(step, f"owed to the durable tier ({wanted[step]})"))
            verdict(step, "due", "checksumming before upload")
        elif not durable_known:
            verdict(step, "due", "waiting for the durable tier to answer")
        elif row.durable is not None and row.durable.committed:
            other = "a step with no tiered manifest" if row.durable.foreign else "other content"
            if topo.committer:
                transfers.append(Displace(step, f"durable step {step} holds {other}"))
                verdict(step, "conflict", f"the durable step holds {other}: moving it aside")
            else:
                verdict(step, "conflict", f"the durable step holds {other}: node 0 moves it aside")
        else:
            pace = upload_pace(local.size, wanted[step], local=snap.local, rules=rules)
            transfers.append(Upload(step, wanted[step], pace.bytes_per_s))
            verdict(step, "due", f"owed to the durable tier ({wanted[step]}); {pace.why}")

    # every other step
    for row in rows:
        step, d = row.step, row.durable
        if step in verdicts:
            continue
        if row.copy:
            verdict(
                step, "committed", "durable copy verified by manifest", tiers=("local", "durable")
            )
        elif row.local is not None:
            if step in snap.failed:
                verdict(step, "failed", snap.failed[step])
            elif step in snap.abandoned:
                verdict(step, "abandoned", "never committed by node 0; a newer step is durable")
            elif step in skips:
                verdict(step, "skipped", skips[step].why)
            elif d is not None and d.committed and (d.foreign or row.local.identity):
                verdict(step, "local", f"not owed; durable step {step} is another checkpoint")
            else:
                verdict(step, "local", "not owed to the durable tier")
        elif d is not None and d.own:
            verdict(step, "committed", "durable only", tiers=("durable",))
        elif d is not None and d.kept:
            verdict(step, "committed", d.problem or "durable only", tiers=("durable",))
        elif d is not None and d.committed:
            verdict(step, "foreign", d.problem or "no tiered manifest", tiers=("durable",))
        else:
            verdict(step, "partial", "an upload that never committed", tiers=())

    # 6. retention
    pinned = {s for s, v in verdicts.items() if "local" in v.tiers and _pins(v.state)}
    pinned |= snap.busy | snap.staged | set(snap.failed) | set(waiting)
    deletes: list[Delete] = []
    local_steps = [r.step for r in rows if r.local is not None]
    keep_n = 1 if snap.disk_pressure else rules.local_max_to_keep
    why = "disk pressure" if snap.disk_pressure else f"local_max_to_keep={rules.local_max_to_keep}"
    keep_local = AnyOf((LatestN(keep_n), Steps(frozenset(pinned)))).keep(local_steps)
    deletes += [
        Delete("local", s, why) for s, k in zip(local_steps, keep_local, strict=True) if not k
    ]
    if durable_known and topo.committer:
        moving = {a.step for a in transfers if isinstance(a, Displace)}
        keep_durable = rules.durable_rule().keep(own_durable)
        deletes += [
            Delete("durable", s, f"max_num_checkpoints_to_keep={rules.max_num_checkpoints_to_keep}")
            for s, k in zip(own_durable, keep_durable, strict=True)
            if not k and s not in snap.busy and s not in moving
        ]
        for row in rows:
            d = row.durable
            if (
                d is not None
                and not d.committed
                and row.step < newest_durable
                and row.step not in wanted
                and row.step not in snap.busy
                and row.step not in snap.parts
            ):
                deletes.append(Delete("durable", row.step, "partial upload nothing can finish"))

    hurry = [a for a in transfers if isinstance(a, Upload) and a.reason in PRECIOUS_REASONS]
    if snap.draining or snap.run_ended or hurry:
        why = "the daemon is stopping" if snap.draining else "the run ended"
        if hurry:
            why = f"{hurry[0].reason} step {hurry[0].step} is waiting"
        actions.append(FullSpeed(why))
    return Plan(
        actions=(*actions, *fingerprints, *transfers, *skips.values(), *deletes),
        verdicts=verdicts,
        restore=tuple(restore_options(snap.local, snap.durable or (), nodes=rules.topology.nodes)),
        owed=frozenset(s for s in wanted if s not in snap.failed),
        pinned=frozenset(pinned),
    )


def rules_for(cfg: TieredConfig, *, topology: Topology | None = None) -> Rules:
    """The rules a config implies."""
    return Rules(
        durable_period=cfg.durable_period,
        local_max_to_keep=cfg.tiered.local_max_to_keep,
        backup_interval_seconds=cfg.backup_interval_seconds,
        max_num_checkpoints_to_keep=cfg.max_num_checkpoints_to_keep,
        keep_period=cfg.tiered.keep_period,
        backlog=cfg.tiered.backlog,
        topology=topology or cfg.topology,
        local_period=cfg.local_checkpoint_period,
        last_step=cfg.steps - 1 if cfg.steps else None,
        final_after_idle_seconds=cfg.tiered.final_after_idle_seconds,
        pacing=Pacing(share=pacing) if (pacing := cfg.tiered.transfer_pacing) else None,
    )

"""``plan``: every verdict and action over one snapshot, in the order the package's docstring
gives; ``rules_for`` builds the rules from the config."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tiered.types import PRECIOUS_REASONS, DurableStep, LocalStep, Reason, Topology

if TYPE_CHECKING:
    from tiered.config import TieredConfig

from tiered.policy.actions import (
    Abandon,
    Action,
    Commit,
    Delete,
    Displace,
    Fingerprint,
    ForgetPart,
    FullSpeed,
    Plan,
    Skip,
    State,
    Tier,
    Upload,
    Verdict,
    pins,
)
from tiered.policy.inputs import Pacing, Rules, Snapshot
from tiered.policy.pacing import upload_pace
from tiered.policy.restore import restore_options
from tiered.policy.retention import AnyOf, LatestN, Steps

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
            transfers.append(Upload(step, wanted[step], pace.bytes_per_s, pace.why))
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
    pinned = {s for s, v in verdicts.items() if "local" in v.tiers and pins(v.state)}
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

"""The tier status model: one model, three views (CLI table or JSON, HTTP ``/status``, Python).

``build_status`` is pure: inventories of both tiers, the daemon's live state and the clock in,
a ``TierStatus`` out; ``render_table`` prints one. The reading is ``tiered.status_client``'s:
``collect_status`` asks a running daemon first (whose answer already holds both tiers and its
live state) and otherwise scans the tiers itself.

The JSON form is versioned (``schema``) and documented in ``docs/status.md``; fields are only
ever added within a schema version.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tiered.config import TieredConfig
from tiered.policy import Plan, Snapshot, plan, rules_for
from tiered.risk import held_by_every_peer, risk_now, step_seconds
from tiered.types import Displaced
from tiered.units import human_bytes, human_duration, human_rate
from tiered.urls import redact_url

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class StepStatus:
    step: int
    tiers: list[str]
    state: str
    reason: str
    size_bytes: int | None
    age_seconds: float | None
    why: str = ""


@dataclass(frozen=True)
class TierStatus:
    schema: int
    generated_at: float
    run_name: str
    local_dir: str
    durable_url: str
    durable_period: int
    local_period: int
    steps: list[StepStatus]
    latest: dict[str, int | None]
    daemon: dict[str, Any] = field(default_factory=dict)
    durable_error: str | None = None
    """Why the durable tier could not be listed; None when it answered."""
    displaced: list[dict[str, Any]] = field(default_factory=list)
    tiers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per tier: committed steps, their bytes, and free bytes (None where unknown)."""
    at_risk: dict[str, Any] = field(default_factory=dict)
    """What a crash, a preemption and the loss of this node would cost now (tiered.risk)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def build_status(
    cfg: TieredConfig,
    *,
    snapshot: Snapshot,
    live: dict[str, Any] | None,
    decided: Plan | None = None,
    durable_error: str | None = None,
    displaced: Sequence[Displaced] = (),
    local_free: int | None = None,
    saves_on_signal: bool | None = None,
    trainer_running: bool | None = None,
) -> TierStatus:
    """The status of a snapshot, with the planner's verdict for every step (``decided`` when the
    caller has planned this snapshot already)."""
    live = dict(live or {})
    now = snapshot.now
    decided = decided if decided is not None else plan(snapshot, rules_for(cfg))
    local = {s.step: s for s in snapshot.local if s.committed}
    durable = {d.step: d for d in snapshot.durable or ()}
    steps = []
    for step, verdict in sorted(decided.verdicts.items()):
        size = local[step].size if step in local else None
        if size is None and step in durable:
            size = durable[step].size
        when = local[step].commit_time if step in local else None
        if when is None and step in durable:
            when = durable[step].commit_time
        steps.append(
            StepStatus(
                step=step,
                tiers=list(verdict.tiers),
                state=verdict.state,
                reason=verdict.reason,
                size_bytes=size,
                age_seconds=round(now - when, 1) if when else None,
                why=verdict.why,
            )
        )
    for pruned in live.get("recently_pruned") or []:
        if not any(s.step == pruned["step"] for s in steps):
            steps.append(
                StepStatus(
                    step=pruned["step"],
                    tiers=[],
                    state="pruned",
                    reason="unknown",
                    size_bytes=None,
                    age_seconds=None,
                    why=f"pruned from the {pruned['tier']} tier",
                )
            )
    steps.sort(key=lambda s: s.step)
    best = decided.restore[0].step if decided.restore else None
    latest = {
        "local": max(local, default=None),
        "durable": max((d.step for d in durable.values() if d.kept), default=None),
        "restorable": best,
    }
    live.setdefault("running", False)
    live.setdefault("health", "not running")
    busy = (live.get("current_upload") or {}).get("step")
    live["backlog"] = sorted(decided.owed - {busy})
    live.setdefault("skipped", decided.skipped)
    kept = [d for d in durable.values() if d.kept]
    tiers = {
        "local": {
            "steps": len(local),
            "bytes": sum(s.size or 0 for s in local.values()),
            "free_bytes": local_free,
        },
        "durable": {
            # Not read (unreachable): no counts, never "0 steps".
            "steps": len(kept) if snapshot.durable is not None else None,
            "bytes": sum(d.size or 0 for d in kept) if snapshot.durable is not None else None,
            "free_bytes": None,
        },
    }
    signal_saves = cfg.saves_on_sigterm if saves_on_signal is None else saves_on_signal
    risk, notes = risk_now(
        snapshot.local,
        snapshot.durable,
        now=now,
        saves_on_signal=signal_saves,
        cannot_promote=cannot_promote(live),
        local_period=cfg.local_checkpoint_period,
        trainer_running=trainer_running,
        replicated=replicated_step((live or {}).get("peers")),
    )
    return TierStatus(
        schema=SCHEMA_VERSION,
        generated_at=now,
        run_name=cfg.run_name,
        local_dir=str(cfg.local_dir),
        durable_url=redact_url(cfg.durable_url),
        durable_period=cfg.durable_period,
        local_period=cfg.local_checkpoint_period,
        steps=steps,
        latest=latest,
        daemon=live,
        durable_error=durable_error,
        displaced=[
            {"name": d.name, "step": d.step, "moved_at": d.moved_at, "tier": d.tier}
            for d in displaced
        ],
        tiers=tiers,
        at_risk={
            **{k: asdict(v) for k, v in risk.items()},
            "step_seconds": step_seconds(snapshot.local),
            "preemption_saves": signal_saves,
            # MaxText turns SIGINT into KeyboardInterrupt: Ctrl+C saves only under tiered run
            "ctrl_c_needs_launcher": cfg.speaks_mtc,
            "notes": notes,
        },
    )


def cannot_promote(live: dict[str, Any]) -> str | None:
    """Why no daemon can make the preemption step durable now (None: one can)."""
    if not live.get("running"):
        return "no daemon running to promote the preemption step"
    health = str(live.get("health") or "")
    if health in ("ok", "degraded"):
        return None
    return f"the daemon cannot promote it now: {live.get('ready_reason') or health}"


def replicated_step(peers: dict[str, Any] | None) -> int | None:
    """The newest local step every peer of this node holds (from the daemon's ``peers``)."""
    sends = (peers or {}).get("sends_to") or {}
    return held_by_every_peer(info.get("step") for info in sends.values())


def is_settled(status: TierStatus) -> bool:
    """Whether the daemon owes nothing urgent: no upload in progress, and no preemption or final
    checkpoint still waiting to become durable. A pod's preStop hook waits for this."""
    if status.daemon.get("current_upload"):
        return False
    return not any(
        s.state in ("due", "uploading", "retrying", "conflict", "committing")
        and s.reason in ("preemption", "final")
        for s in status.steps
    )


def status_from_dict(data: dict[str, Any]) -> TierStatus:
    return TierStatus(
        **{k: v for k, v in data.items() if k != "steps"},
        steps=[StepStatus(**s) for s in data["steps"]],
    )


def _tier_summary(tier: dict[str, Any], error: str | None = None) -> str:
    if error is not None:
        return error if error.startswith("unreachable:") else f"unreachable: {error}"
    n = tier.get("steps", 0)
    text = f"{n} step{'s' if n != 1 else ''}, {human_bytes(tier.get('bytes') or 0)}"
    if tier.get("free_bytes") is not None:
        text += f", {human_bytes(tier['free_bytes'])} free"
    return text


def _risk_line(risk: dict[str, Any]) -> str:
    notes = risk.get("notes") or {}

    def one(kind: str) -> str:
        loss = risk[kind]
        note = notes.get(kind)
        if kind == "node" and note:
            return f"unknown ({note})"
        if loss.get("steps") is None:
            text = "unknown (no step time yet)"
        elif loss["steps"] == 0:
            text = "nothing"
        else:
            text = f"{loss['steps']} steps (~{human_duration(loss.get('seconds'))})"
        if note:
            text = f"{text[:-1]}; {note})" if text.endswith(")") else f"{text} ({note})"
        return text

    stops = f"preemption or Ctrl+C {one('preemption')}"
    if risk.get("ctrl_c_needs_launcher") and risk.get("preemption_saves"):
        stops = f"preemption {one('preemption')}; Ctrl+C under tiered run "
        stops += f"{one('preemption')}, else {one('crash')}"
    elif risk.get("ctrl_c_needs_launcher"):
        stops += " (MaxText without enable_autocheckpoint saves nothing on SIGTERM)"
    return f"crash {one('crash')}; {stops}; losing this node {one('node')}"


def render_table(status: TierStatus) -> str:
    """The human view of ``tiered status``."""
    d = status.daemon
    t = status.tiers
    lines = [
        f"run      {status.run_name or '-'}",
        f"local    {status.local_dir}  (every {status.local_period} steps)"
        + (f"  {_tier_summary(t['local'])}" if t.get("local") else ""),
        f"durable  {status.durable_url}  (every {status.durable_period} steps)"
        + (f"  {_tier_summary(t['durable'], status.durable_error)}" if t.get("durable") else ""),
    ]
    if status.at_risk:
        lines.append(f"at risk  {_risk_line(status.at_risk)}")
    daemon_line = f"daemon   {d.get('health', 'not running')}"
    if d.get("running"):
        daemon_line += f"  pid {d.get('pid')}  backlog {len(d.get('backlog') or [])}"
        if d.get("throughput_mb_s"):
            daemon_line += f"  last upload {human_rate(d['throughput_mb_s'] * 1e6)}"
    lines.append(daemon_line)
    node = d.get("node")
    if node:
        line = f"node     {node['rank']} of {node['nodes']}  (restore epoch {node['epoch']})"
        waiting = {
            step: info.get("missing")
            for step, info in (node.get("committing") or {}).items()
            if info.get("missing")
        }
        if waiting:
            line += "  " + "; ".join(
                f"step {step} waits for nodes {', '.join(map(str, missing))}"
                for step, missing in waiting.items()
            )
        lines.append(line)
    current = d.get("current_upload")
    if current:
        total = current.get("bytes_total") or 0
        progress = (
            f"{human_bytes(current.get('bytes_done'))} of {human_bytes(total)}"
            if total
            else "listing what is there already"
        )
        pace = f"; {current['pace']}" if current.get("pace") else ""
        lines.append(
            f"uploading step {current['step']}: {progress} "
            f"for {current.get('elapsed_seconds', 0):.0f}s{pace}"
        )
    if d.get("last_error"):
        when = d.get("last_error_time")
        ago = f" ({human_duration(status.generated_at - when)} ago)" if when else ""
        state = "resolved" if d.get("last_error_resolved") else "last error"
        lines.append(f"{state}{ago}: {d['last_error']}")
    if d.get("disk_pressure"):
        lines.append("local disk pressure: keeping only the newest and pinned steps")
    peers = d.get("peers")
    if peers:
        sent = "; ".join(
            f"node {rank} has step {info['step'] if info.get('step') is not None else '-'}"
            + (f" (failing: {info['error']})" if info.get("error") else "")
            for rank, info in sorted(peers.get("sends_to", {}).items())
        )
        held = ", ".join(f"node {h['node']} step {h['step']}" for h in peers.get("holds", []))
        lines.append(f"peers    {sent or 'no partner yet'}")
        lines.append(
            f"         keeping {held or 'nothing'} for others"
            f" ({human_bytes(peers.get('holds_bytes') or 0)})"
        )
    lines.append("")
    lines.append(
        f"{'STEP':>10}  {'LOCAL':<5}  {'DURABLE':<7}  {'STATE':<10}  {'SIZE':>9}  "
        f"{'AGE':>6}  REASON"
    )
    shown = [s for s in status.steps if s.state != "pruned"]
    for s in shown:
        lines.append(
            f"{s.step:>10}  {'yes' if 'local' in s.tiers else '-':<5}  "
            f"{'yes' if 'durable' in s.tiers else '-':<7}  {s.state:<10}  "
            f"{human_bytes(s.size_bytes):>9}  {human_duration(s.age_seconds):>6}  {s.reason}"
        )
    if not shown:
        lines.append(f"{'(no checkpoints yet)':>22}")
    pruned = sorted(d.get("recently_pruned") or [], key=lambda p: p.get("time", 0))
    if pruned:
        by_tier: dict[str, str] = {}
        for tier in ("local", "durable"):
            names = [str(p["step"]) for p in pruned if p["tier"] == tier]
            kept = (["..."] if len(names) > 6 else []) + names[-6:]  # oldest to newest
            by_tier[tier] = ", ".join(kept)
        lines.append(
            "recently pruned: "
            + "; ".join(f"{tier} {steps}" for tier, steps in by_tier.items() if steps)
        )
    for moved in status.displaced:
        lines.append(
            f"set aside: {moved['tier']} step {moved['step']} in .tiered/displaced/"
            f"{moved['name']} (another step of that number took its place)"
        )
    latest = status.latest
    lines.append("")
    lines.append(
        f"latest: local {latest['local'] if latest['local'] is not None else '-'}, "
        f"durable {latest['durable'] if latest['durable'] is not None else '-'}, "
        f"restore would use {latest['restorable'] if latest['restorable'] is not None else '-'}"
    )
    return "\n".join(lines)

"""Prometheus metrics of one daemon, in a registry of its own (so tests can run several).

Names follow Prometheus' conventions: base units with the unit as a suffix, ``_total`` on
counters, every label value present from the start (a series that appears only after the first
failure breaks ``rate()`` and alerts), and no ``_created`` series. The process collector adds
the daemon's memory, CPU time and open files. deploy/prometheus/alerts.yaml uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()

TIERS = ("local", "durable")
ERROR_KINDS = ("list", "transient", "permanent", "prune", "cycle", "peer")
EVENTS = ("crash", "preemption", "node")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.promoted = Counter(
            "tiered_promoted_steps", "Steps promoted to the durable tier", registry=r
        )
        self.pruned = Counter("tiered_pruned_steps", "Steps pruned", ["tier"], registry=r)
        self.bytes_uploaded = Counter(
            "tiered_uploaded_bytes", "Bytes uploaded to the durable tier", registry=r
        )
        self.upload_seconds = Histogram(
            "tiered_upload_duration_seconds",
            "Seconds to upload, verify and commit one step",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.backlog = Gauge("tiered_backlog_steps", "Due steps not yet durable", registry=r)
        self.skipped = Gauge(
            "tiered_skipped_steps", "Due steps the backlog policy skipped", registry=r
        )
        self.failed = Gauge(
            "tiered_failed_steps", "Steps whose promotion failed permanently", registry=r
        )
        self.current_upload_seconds = Gauge(
            "tiered_current_upload_seconds",
            "How long the upload in progress has been running (0 when idle)",
            registry=r,
        )
        self.last_success = Gauge(
            "tiered_last_commit_timestamp_seconds",
            "Unix time of the newest checkpoint committed on each tier",
            ["tier"],
            registry=r,
        )
        self.since_durable = Gauge(
            "tiered_durable_commit_age_seconds",
            "Seconds since the newest durable checkpoint was committed",
            registry=r,
        )
        self.newest_step = Gauge(
            "tiered_newest_step", "The newest committed step on each tier", ["tier"], registry=r
        )
        self.tier_steps = Gauge(
            "tiered_tier_steps", "Committed steps on each tier", ["tier"], registry=r
        )
        self.tier_bytes = Gauge(
            "tiered_tier_bytes", "Bytes of the committed steps on each tier", ["tier"], registry=r
        )
        self.local_free = Gauge(
            "tiered_local_free_bytes", "Free bytes on the local tier", registry=r
        )
        self.at_risk = Gauge(
            "tiered_at_risk_steps",
            "Steps an interruption would cost now (crash, preemption, losing the node)",
            ["event"],
            registry=r,
        )
        self.errors = Counter("tiered_errors", "Errors by kind", ["kind"], registry=r)
        self.peer_bytes_sent = Counter(
            "tiered_peer_sent_bytes", "Bytes of local steps sent to peers", registry=r
        )
        self.peer_step = Gauge(
            "tiered_peer_replicated_step",
            "Newest local step each partner holds a copy of",
            ["peer"],
            registry=r,
        )
        self.peer_held_bytes = Gauge(
            "tiered_peer_held_bytes", "Bytes of other nodes' steps kept here", registry=r
        )
        self.disk_pressure = Gauge(
            "tiered_local_disk_pressure", "1 while local free space is below the floor", registry=r
        )
        self.ready = Gauge(
            "tiered_ready", "1 while the daemon is ready (the durable tier answers)", registry=r
        )
        for tier in TIERS:
            self.pruned.labels(tier=tier)
            self.last_success.labels(tier=tier)
            self.newest_step.labels(tier=tier)
            self.tier_steps.labels(tier=tier)
            self.tier_bytes.labels(tier=tier)
        for kind in ERROR_KINDS:
            self.errors.labels(kind=kind)
        for event in EVENTS:
            self.at_risk.labels(event=event)

    def record_tiers(self, snap: Any, *, local_free: int | None) -> None:
        """Per tier from one snapshot (``tiered.policy.Snapshot``): newest step, steps, bytes,
        the newest commit's time; the age of the newest durable step; local free space."""
        local = [s for s in snap.local if s.committed]
        durable = [d for d in snap.durable or () if d.kept]
        for tier, steps in (("local", local), ("durable", durable)):
            when = max((s.commit_time or 0 for s in steps), default=0)
            if when:
                self.last_success.labels(tier=tier).set(when)
            if steps:
                self.newest_step.labels(tier=tier).set(max(s.step for s in steps))
            self.tier_steps.labels(tier=tier).set(len(steps))
            self.tier_bytes.labels(tier=tier).set(sum(s.size or 0 for s in steps))
        newest = max((d.commit_time or 0 for d in durable), default=0)
        if newest:
            self.since_durable.set(max(0.0, snap.now - newest))
        if local_free is not None:
            self.local_free.set(local_free)

    def record_risk(self, risk: Mapping[str, Any]) -> None:
        """What each event would cost now (``tiered.risk.risk_now``), where known."""
        for event, loss in risk.items():
            if loss.steps is not None:
                self.at_risk.labels(event=event).set(loss.steps)

    def record_plan(self, decided: Any, *, failed: int) -> None:
        self.backlog.set(len(decided.owed))
        self.skipped.set(len(decided.skipped))
        self.failed.set(failed)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

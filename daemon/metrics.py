"""Prometheus metrics of one daemon, in a registry of its own (so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.promoted = Counter(
            "tiered_steps_promoted", "Steps promoted to the durable tier", registry=r
        )
        self.pruned = Counter("tiered_steps_pruned", "Steps pruned", ["tier"], registry=r)
        self.bytes_uploaded = Counter(
            "tiered_bytes_uploaded", "Bytes uploaded to the durable tier", registry=r
        )
        self.upload_seconds = Histogram(
            "tiered_upload_seconds",
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
            "tiered_last_success_timestamp_seconds",
            "Unix time of the newest checkpoint committed on each tier",
            ["tier"],
            registry=r,
        )
        self.errors = Counter("tiered_errors", "Errors by kind", ["kind"], registry=r)
        self.disk_pressure = Gauge(
            "tiered_local_disk_pressure", "1 while local free space is below the floor", registry=r
        )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

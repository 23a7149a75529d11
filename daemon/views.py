"""What threads other than the loop read of the daemon: liveness, readiness, the live state and
the status document. Each reads the current ``DaemonState`` value and changes nothing."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemon.metrics import Metrics
from daemon.mtc import MtcProtocol
from daemon.peers import Peering
from daemon.settings import Settings
from daemon.state import DaemonState
from daemon.trainer import TrainerWatch
from daemon.workers import Lane
from tiered import LocalTier
from tiered.sidecar import Plan, Snapshot, TierStatus, build_status, plan


@dataclass(frozen=True)
class View:
    """The last cycle's snapshot and plan, for the HTTP thread."""

    snapshot: Snapshot
    decided: Plan


class Views:
    """The daemon's read-only side, for the status server's threads. It reads the loop's
    figures through the accessors it is given (``state``, ``last``, ``heartbeat``) and takes
    snapshots with the loop's own ``snapshot`` (planning is pure: any thread may)."""

    def __init__(
        self,
        settings: Settings,
        local: LocalTier,
        *,
        metrics: Metrics,
        transfer: Lane,
        trainer: TrainerWatch,
        peering: Peering,
        free: Callable[[], int | None],
        mtc: MtcProtocol | None,
        state: Callable[[], DaemonState],
        snapshot: Callable[[DaemonState], Snapshot],
        last: Callable[[], View | None],
        heartbeat: Callable[[], float],
        tick: float,
    ) -> None:
        self._settings = settings
        self._local = local
        self._metrics = metrics
        self._transfer = transfer
        self._trainer = trainer
        self._peering = peering
        self._free = free
        self._mtc = mtc
        self._state = state
        self._snapshot = snapshot
        self._last = last
        self._heartbeat = heartbeat
        self._tick = tick
        self._started = time.time()

    def alive(self) -> tuple[bool, str]:
        """Liveness: the loop is making progress. Only this is worth a restart; a store that is
        away is not (a restarted sidecar finds it just as away)."""
        quiet = time.monotonic() - self._heartbeat()
        limit = max(60.0, 6 * self._tick)
        if quiet > limit:
            return False, f"the daemon's loop has not run for {quiet:.0f} s"
        return True, "alive"

    def routes(self) -> dict[str, Any]:
        """What the status server answers: the status, the metrics, liveness, readiness."""

        def probe(check: Any) -> tuple[int, str, bytes]:
            ok, why = check()
            return (200 if ok else 503), "text/plain", f"{why}\n".encode()

        return {
            "/status": lambda: (200, "application/json", self.status_json().encode()),
            "/metrics": lambda: (200, "text/plain; version=0.0.4", self._metrics.render()),
            "/healthz": lambda: probe(self.alive),
            "/readyz": lambda: probe(self.health),
        }

    def health(self) -> tuple[bool, str]:
        """Readiness: the durable tier answers, and promotion has not been failing for longer
        than ``tiered.unhealthy_after_seconds``."""
        state = self._state()
        if state.durable_error is not None:
            return False, f"the durable tier does not answer: {state.durable_error}"
        if state.durable is None:
            return False, "waiting for the durable tier's first answer"
        if state.failing_since is not None:
            failing = time.time() - state.failing_since
            if failing > self._settings.cfg.tiered.unhealthy_after_seconds:
                message = state.last_error.message if state.last_error else "unknown"
                return False, f"promotion failing for {failing:.0f}s: {message}"
            return True, "degraded"
        return True, "ok"

    def live_state(self) -> dict[str, Any]:
        healthy, health = self.health()
        alive, _why = self.alive()
        state = self._state()
        job = self._transfer.job
        mtc, topology = self._mtc, self._settings.topology
        current = None
        if job is not None and job.kind == "upload":
            progress = self._transfer.progress
            current = {
                "step": job.step,
                "elapsed_seconds": round(time.time() - job.started, 1),
                "bytes_done": progress.bytes_done,
                "bytes_total": progress.bytes_total,
                "attempt": progress.attempt,
                "pace": "full speed (lifted)"
                if job.pacer is not None and job.pacer.lifted
                else getattr(job.data, "pace_why", "") or None,
            }
        promo = state.last_promotion
        view = self._last()
        return {
            "running": True,
            "pid": os.getpid(),
            "health": health if healthy else "unhealthy",
            "ready": healthy,
            "ready_reason": health,
            "alive": alive,
            "loop_seconds_ago": round(time.monotonic() - self._heartbeat(), 1),
            "started_at": self._started,
            "current_upload": current,
            "skipped": view.decided.skipped if view else [],
            "failed": {str(k): v for k, v in state.failed.items()},
            "last_error": state.last_error.message if state.last_error else None,
            "last_error_time": state.last_error.time if state.last_error else None,
            "last_error_resolved": bool(
                state.last_error
                and state.failing_since is None
                and state.durable_error is None
                and not state.failed
            ),
            "last_promotion": promo.__dict__ if promo else None,
            "throughput_mb_s": promo.mb_per_s if promo else None,
            "recently_pruned": [p.__dict__ for p in state.recently_pruned],
            "disk_pressure": state.disk_pressure,
            "mtc_job": mtc.active.job_name if mtc and mtc.active else None,
            "peers": self._peering.view(state),
            "node": (
                {
                    "rank": topology.rank,
                    "nodes": topology.nodes,
                    "epoch": state.epoch,
                    "committing": {
                        str(step): {"missing": list(state.missing.get(step, ())) or None}
                        for step in sorted(state.parts)
                    },
                    "abandoned": sorted(state.abandoned),
                }
                if topology.multi
                else None
            ),
        }

    def status_json(self) -> str:
        return self.status().to_json()

    def status(self) -> TierStatus:
        """The status now: the planner's verdicts over a fresh snapshot of the current state
        (planning is pure, so any thread may do it)."""
        state = self._state()
        snap = self._snapshot(state)
        return build_status(
            self._settings.cfg,
            snapshot=snap,
            live=self.live_state(),
            decided=plan(snap, self._settings.rules),
            durable_error=state.durable_error,
            displaced=[*state.displaced, *self._local.displaced()],
            local_free=self._free(),
            trainer_running=self._trainer.running(),
        )

"""What the parts of ``Daemon`` share: its attributes, set once by ``Daemon.__init__`` (the state
alone is replaced, by the loop thread only)."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

from daemon.metrics import Metrics
from daemon.mtc import MtcProtocol
from daemon.state import DaemonState
from daemon.workers import Lane, Outcome
from tiered import DurableTier, LocalTier, TieredConfig
from tiered.sidecar import DirectoryLock, Plan, RestoreOption, Rules, Snapshot, Topology


@dataclass(frozen=True)
class View:
    """The last cycle's snapshot and plan, for the HTTP thread."""

    snapshot: Snapshot
    decided: Plan


class DaemonBase:
    cfg: TieredConfig
    topology: Topology
    rules: Rules
    local: LocalTier
    durable: DurableTier
    metrics: Metrics
    stopping: threading.Event
    outbox: queue.Queue[Outcome]
    transfer: Lane
    durable_lane: Lane
    local_lane: Lane
    peer_lane: Lane
    trainer_lock: DirectoryLock
    state: DaemonState
    view: View | None
    mtc: MtcProtocol | None
    restore_choice: RestoreOption | None
    heartbeat: float
    _started: float
    _started_mono: float
    _probed_at: float
    """When `_watch_trainer` last probed the JAX coordinator (monotonic; 0.0: probe now)."""
    _tick: float

    def _snapshot(self, state: DaemonState) -> Snapshot:
        raise NotImplementedError

    def peers_view(self) -> dict[str, Any] | None:
        """The status's ``peers`` block (``daemon.peers``)."""
        raise NotImplementedError

    def _replicated_step(self) -> int | None:
        raise NotImplementedError

    def _shed_replicas(self) -> None:
        raise NotImplementedError

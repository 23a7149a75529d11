"""Is a trainer there? A ``tiered.CheckpointManager`` holds its lock; orbax's multi-tier client
takes none, but its JAX coordinator (named in ``jax-init-info.txt``) accepts connections for as
long as the job runs. Once either was seen, its going away means the run ended, and the newest
local step is owed to the durable tier."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from daemon.mtc import MtcProtocol
from daemon.state import DaemonState
from tiered.sidecar import TRAINER_LOCK_NAME, DirectoryLock

log = logging.getLogger("daemon")

PROBE_SECONDS = 2.0
"""How often the JAX coordinator is probed (a TCP connection)."""


class TrainerWatch:
    """The trainer's lock and coordinator, as the loop probes them. Any thread may ask
    ``there`` and ``running``; only the loop calls ``probe``."""

    def __init__(self, tiered_dir: Path, mtc: MtcProtocol | None) -> None:
        self.lock = DirectoryLock(
            tiered_dir, name=TRAINER_LOCK_NAME, what="tiered.CheckpointManager"
        )
        self._mtc = mtc
        self._probed_at = 0.0
        """When ``probe`` last asked the coordinator (monotonic; 0.0: ask at the next)."""

    def probe_now(self) -> None:
        """Ask the coordinator at the next ``probe``, not up to 2 s later."""
        self._probed_at = 0.0

    def probe(self, state: DaemonState) -> DaemonState:
        """The state with what was seen of the trainer (at most every 2 s)."""
        now = time.monotonic()
        if now - self._probed_at < PROBE_SECONDS:
            return state
        self._probed_at = now
        up = self._mtc.coordinator_up() if self._mtc is not None else None
        held = self.lock.holder() is not None
        seen = state.trainer_seen or held or bool(up)
        if up is not None and up != state.coordinator_up:
            log.info(
                "The trainer's JAX coordinator is %s", "up" if up else "gone: the run has ended"
            )
        return replace(state, trainer_seen=seen, coordinator_up=bool(up))

    def there(self, state: DaemonState) -> bool:
        """A trainer holds its lock now, or its coordinator answered the last probe."""
        return self.lock.holder() is not None or state.coordinator_up

    def running(self) -> bool | None:
        """Whether ``tiered.CheckpointManager`` holds the trainer's lock (None: no such
        trainer here, as with orbax's multi-tier client)."""
        if not self.lock.exists():
            return None
        return self.lock.holder() is not None

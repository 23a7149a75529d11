"""The local tier's room: its free bytes (``tiered.local_capacity`` when set, else the disk's),
the floor the daemon keeps free (``tiered.min_free_local_fraction``), and disk pressure below
that floor. The loop measures once a cycle; the status and the peer server ask when they need."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace

from daemon.settings import Settings
from daemon.state import DaemonState
from tiered import LocalTier

log = logging.getLogger("daemon")


class LocalSpace:
    def __init__(self, settings: Settings, local: LocalTier) -> None:
        self._settings = settings
        self._local = local

    def _measure(self) -> tuple[int, int]:
        """Free and total bytes; with a capacity set, a walk of the local directory."""
        capacity = self._settings.cfg.tiered.local_capacity
        free = self._local.free_bytes(capacity)
        total = capacity if capacity is not None else shutil.disk_usage(self._local.root).total
        return free, total

    def free(self) -> int | None:
        """Free bytes now (None: the local directory cannot be measured)."""
        try:
            return self._local.free_bytes(self._settings.cfg.tiered.local_capacity)
        except OSError:
            return None

    def room(self) -> int:
        """Room for a replica: the free bytes less the floor, so others' copies never push this
        node's own saves into disk pressure."""
        try:
            free, total = self._measure()
        except OSError:
            return 0
        return max(0, free - int(total * self._settings.cfg.tiered.min_free_local_fraction))

    def check(self, state: DaemonState) -> tuple[int | None, DaemonState]:
        """The free bytes now, and the state with disk pressure as they say (unchanged when
        the local directory cannot be measured: free is None then)."""
        floor = self._settings.cfg.tiered.min_free_local_fraction
        try:
            free_bytes, total = self._measure()
        except OSError:
            return None, state
        free = free_bytes / total if total else 1.0
        pressure = free < floor
        if pressure != state.disk_pressure:
            if pressure:
                log.warning(
                    "Local disk pressure: %.1f%% free, below the %.1f%% floor; keeping only the "
                    "newest and pinned local steps",
                    free * 100,
                    floor * 100,
                )
            else:
                log.info("Local disk pressure over: %.1f%% free", free * 100)
            state = replace(state, disk_pressure=pressure)
        return free_bytes, state

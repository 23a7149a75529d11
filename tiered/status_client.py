"""The status as ``tiered status`` reads it: from the running daemon's ``/status`` (an HTTP
client of its status server) when it answers, else from both tiers scanned here. The model it
fills in, and prints, is ``tiered.report``'s."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from tiered.config import TieredConfig
from tiered.errors import StorageError
from tiered.layout import TRAINER_LOCK_NAME
from tiered.lock import DirectoryLock
from tiered.policy import Snapshot
from tiered.reach import within
from tiered.report import TierStatus, build_status, status_from_dict
from tiered.storage import LocalTier
from tiered.tiers import open_tiers


def query_daemon(address: str, *, timeout: float = 2.0) -> dict[str, Any] | None:
    """The daemon's ``/status`` JSON, or None when no daemon answers at ``address``."""
    try:
        with urllib.request.urlopen(f"http://{address}/status", timeout=timeout) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except (OSError, ValueError, urllib.error.URLError):
        return None


def _scan_durable(cfg: TieredConfig) -> tuple[list, list]:
    durable = open_tiers(cfg)[1]
    return durable.scan(), durable.list_displaced()


def collect_status(
    cfg: TieredConfig, *, ask_daemon: bool = True, durable_timeout: float = 5.0
) -> TierStatus:
    """Status as ``tiered status`` shows it: from the daemon when it answers, else the tiers.

    The daemon is asked at ``tiered.status_address``, and then at the address it recorded in
    its lock file (the two differ when the daemon was started with other settings)."""
    live: dict[str, Any] | None = None
    if ask_daemon:
        lock = DirectoryLock(LocalTier(cfg.local_dir).tiered_dir)
        recorded = lock.note()
        for address in dict.fromkeys([cfg.tiered.status_address, recorded]):
            answer = query_daemon(address) if address else None
            if answer is not None and answer.get("local_dir") == str(cfg.local_dir):
                return status_from_dict(answer)
        pid = lock.holder()
        if pid is not None:
            live = {
                "running": True,
                "pid": pid,
                "health": "not answering",
                "last_error": f"the daemon (pid {pid}) holds the lock but does not answer at "
                f"{recorded or cfg.tiered.status_address}",
            }
    local = LocalTier(cfg.local_dir)
    local_steps = tuple(local.scan(with_size=True))
    try:
        scanned, moved = within(
            durable_timeout, lambda: _scan_durable(cfg), knob="tiered status --timeout"
        )
        durable_steps: tuple | None = tuple(scanned)
        displaced = [*moved, *local.displaced()]
        error = None
    except StorageError as err:
        durable_steps, displaced, error = None, local.displaced(), str(err)
    snap = Snapshot(now=time.time(), local=local_steps, durable=durable_steps)
    try:
        free: int | None = local.free_bytes(cfg.tiered.local_capacity)
    except OSError:
        free = None
    trainer = DirectoryLock(local.tiered_dir, name=TRAINER_LOCK_NAME)
    running = trainer.holder() is not None if trainer.exists() else None
    return build_status(
        cfg,
        snapshot=snap,
        live=live,
        durable_error=error,
        displaced=displaced,
        local_free=free,
        trainer_running=running,
    )

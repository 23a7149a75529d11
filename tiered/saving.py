"""What a local save leaves beside the step, and how its failures read: the blocking time per
periodic save (``.tiered/trainer-stats.json``, for ``tiered advise``), a warning when the disk
will not take the next save, and a full disk as one line that says what to check."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from tiered.atomic import publish_file
from tiered.errors import StorageError
from tiered.layout import TRAINER_STATS
from tiered.orbax_api import is_disk_full
from tiered.storage import LocalTier

log = logging.getLogger("tiered.manager")


class SaveStats:
    """How long recent periodic saves held the training loop (the last 20)."""

    def __init__(self, local: LocalTier) -> None:
        self.local = local
        self.blocking: list[float] = []

    def record_blocking(self, seconds: float) -> None:
        self.blocking = [*self.blocking[-19:], round(seconds, 4)]
        path = self.local.tiered_dir / TRAINER_STATS
        with contextlib.suppress(OSError):
            publish_file(path, json.dumps({"save_blocking_seconds": self.blocking}).encode())


def warn_if_nearly_full(local: LocalTier, capacity: int | None) -> None:
    """Warn when the free space is below the size of the newest local step."""
    sizes = [f.size for f in local.scan(with_size=True) if f.committed and f.size]
    if not sizes:
        return
    free = local.free_bytes(capacity)
    if free < sizes[-1] * 1.1:
        log.warning(
            "Local tier %s has %d MB free and the last checkpoint took %d MB: the next save "
            "may fail. Is the daemon running and the durable tier reachable?",
            local.root,
            free // 10**6,
            sizes[-1] // 10**6,
        )


@contextlib.contextmanager
def disk_full_is_clear(local_dir: Path) -> Iterator[None]:
    """Turn orbax's wrapped ENOSPC (raised now or by an earlier async save) into one line."""
    try:
        yield
    except Exception as err:
        if is_disk_full(err):
            raise StorageError(
                f"local tier {local_dir} is full (no space left on device): is the tiered daemon "
                "running, and the durable tier reachable, so that promoted steps can be pruned?",
                transient=False,
            ) from err
        raise

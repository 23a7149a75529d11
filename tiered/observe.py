"""What the training side tells its user about each save and restore: one log line per local
save, and ``jax.monitoring`` events as orbax records its own, so existing listeners get them.

Events (durations in seconds, through ``record_event_duration_secs``):

- ``/tiered/save/blocking_secs``: how long ``save()`` held the training loop;
- ``/tiered/save/local_secs``: from ``save()`` until the step was whole on the local tier;
- ``/tiered/restore/secs``: a restore, with ``source="local" | "durable" | "peer"``;
- ``/tiered/save/steps_at_risk_on_crash`` (``record_scalar``): when a save starts, the steps a
  crash would cost until it commits (the step minus the newest step this manager committed).

The save line is logged when orbax finalizes the save: on orbax's finalize thread for an
asynchronous save (``post_finalization_callback``), so ``SaveRecord`` keeps the saves in flight
in a FIFO that the training thread appends to and the finalize thread pops. orbax finalizes
one save at a time and in order, so the head of the queue is the save being finalized; when
orbax raises or has waited for every save, the queue is emptied (``settled``), so a save that
failed on the finalize thread never lends its step to the next one's line.

jax is imported only inside these functions: ``import tiered`` stays free of it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tiered.layout import ORBAX_TMP_INFIX, step_name
from tiered.logs import log_saved
from tiered.storage import LocalTier

log = logging.getLogger("tiered.manager")

SAVE_BLOCKING = "/tiered/save/blocking_secs"
SAVE_LOCAL = "/tiered/save/local_secs"
RESTORE = "/tiered/restore/secs"
AT_RISK_ON_CRASH = "/tiered/save/steps_at_risk_on_crash"


def record_duration(event: str, seconds: float, **labels: str | int) -> None:
    import jax.monitoring

    jax.monitoring.record_event_duration_secs(event, seconds, **labels)


def record_scalar(event: str, value: float, **labels: str | int) -> None:
    import jax.monitoring

    if hasattr(jax.monitoring, "record_scalar"):  # jax >= 0.4.36
        jax.monitoring.record_scalar(event, value, **labels)


def tree_bytes(path: Path) -> int:
    """The bytes of every file under ``path`` (files that vanish meanwhile count nothing)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


@dataclass(frozen=True)
class InFlight:
    step: int
    reason: str
    started: float
    """``time.perf_counter()`` when ``save()`` was called."""


class SaveRecord:
    """The saves this manager started, until each is whole on disk, and what they cost."""

    def __init__(self, local: LocalTier) -> None:
        self.local = local
        self._in_flight: collections.deque[InFlight] = collections.deque()
        self._lock = threading.Lock()
        self.committed: int | None = None
        """The newest step this manager's saves committed."""

    def started(self, step: int, reason: str, started: float) -> None:
        newest = self.committed
        if newest is not None and step > newest:
            record_scalar(AT_RISK_ON_CRASH, step - newest)
        with self._lock:
            self._in_flight.append(InFlight(step, reason, started))

    def dropped(self) -> None:
        """orbax declined the save just queued."""
        with self._lock:
            if self._in_flight:
                self._in_flight.pop()

    def settled(self) -> None:
        """orbax raised, or waited until nothing is in flight: a save still queued here never
        finalized (it failed, or never started), and must not lend its step to the next one."""
        with self._lock:
            self._in_flight.clear()

    def finished(self) -> None:
        """orbax finalized the oldest save in flight: log it and record its duration."""
        with self._lock:
            if not self._in_flight:
                return
            done = self._in_flight.popleft()
        seconds = time.perf_counter() - done.started
        record_duration(SAVE_LOCAL, seconds)
        self.committed = max(done.step, self.committed or done.step)
        log_saved(
            log,
            step=done.step,
            tier="local",
            seconds=seconds,
            size=self._size(done.step),
            detail="" if done.reason == "periodic" else f", {done.reason}",
        )

    def _size(self, step: int) -> int | None:
        """The step's bytes: orbax calls back before it renames the tmp directory."""
        final = self.local.step_dir(step)
        for candidate in [*self.local.root.glob(f"{step_name(step)}{ORBAX_TMP_INFIX}*"), final]:
            if candidate.is_dir():
                return tree_bytes(candidate)
        return None

    @contextlib.contextmanager
    def settled_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self.settled()
            raise

"""Worker lanes: each runs one job at a time on its own thread and posts the outcome back.

The service loop is the only thread that changes the daemon's state. A job does I/O (an upload,
a durable listing, a checksum) and returns a value or raises; the lane puts an ``Outcome`` on
the loop's queue and wakes it, and the loop applies it. A lane never touches the daemon's
state, so no lock guards it.

Four lanes keep slow work from blocking quick work: ``peer`` (sending a local step to the
node's peers), ``transfer`` (uploads, moving a durable
step aside, restore staging), ``durable`` (listings, deletions, multi-node commits) and
``local`` (checksumming local steps).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """How far a job has come, for the status (written by the job's thread, read by others)."""

    bytes_done: int = 0
    bytes_total: int = 0
    attempt: int = 1

    def __call__(self, done: int, total: int) -> None:
        self.bytes_done, self.bytes_total = done, total


@dataclass(frozen=True)
class Job:
    """One piece of work: what it is (``kind``, ``step``), and the function that does it."""

    kind: str
    step: int | None
    run: Callable[[Progress], Any]
    data: Any = None
    """Whatever the loop needs to apply the outcome (the plan's action, say)."""
    pacer: Any = None
    """The job's ``RateLimiter`` when it is paced: the loop may ``lift`` it."""
    started: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Outcome:
    job: Job
    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0


class Lane:
    """One thread, one job at a time."""

    def __init__(self, name: str, outbox: queue.Queue[Outcome], wake: threading.Event) -> None:
        self.name = name
        self._outbox = outbox
        self._wake = wake
        self._lock = threading.Lock()
        self._job: Job | None = None
        self._progress = Progress()
        self._thread: threading.Thread | None = None

    @property
    def job(self) -> Job | None:
        with self._lock:
            return self._job

    @property
    def progress(self) -> Progress:
        return self._progress

    @property
    def busy(self) -> bool:
        return self.job is not None

    def submit(self, job: Job) -> bool:
        """Start ``job`` unless the lane is busy."""
        with self._lock:
            if self._job is not None:
                return False
            self._job = job
            self._progress = Progress()
        self._thread = threading.Thread(
            target=self._run, args=(job, self._progress), name=f"tiered-{self.name}", daemon=True
        )
        self._thread.start()
        return True

    def wait(self, timeout: float | None) -> bool:
        """Wait for the current job to end; True when the lane is idle."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.busy

    def _run(self, job: Job, progress: Progress) -> None:
        started = time.monotonic()
        try:
            outcome = Outcome(job, value=job.run(progress), seconds=time.monotonic() - started)
        except BaseException as err:  # posted to the loop, which decides; never swallowed
            outcome = Outcome(job, error=err, seconds=time.monotonic() - started)
        # Post first, then go idle: the loop applies outcomes before it looks at who is busy,
        # so a finished step is never seen as neither busy nor done.
        self._outbox.put(outcome)
        with self._lock:
            self._job = None
        self._wake.set()

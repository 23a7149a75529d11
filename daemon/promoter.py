"""The promoter: one worker thread that uploads, verifies and commits one step at a time.

Each step's files already go up in parallel (``tiered.upload_concurrency``), so one step at a time
keeps the bandwidth on the step the status reports. Transient errors are retried with
exponential backoff and full jitter; a step that keeps failing transiently goes back to the
planner after a cool-down. A permanent error (a corrupt or hostile step, permission denied)
marks the step failed: its local copy is pinned and it is not retried until the daemon restarts
or someone runs ``tiered promote``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tiered import (
    ChecksumMismatch,
    CommitError,
    DurableTier,
    LayoutError,
    LocalTier,
    StorageError,
    TransferResult,
    promote_step,
)

log = logging.getLogger(__name__)


@dataclass
class Upload:
    """The upload in progress, for status: what, since when, how far."""

    step: int
    started: float
    bytes_done: int = 0
    bytes_total: int = 0
    attempt: int = 1


class Promoter:
    def __init__(
        self,
        local: LocalTier,
        durable: DurableTier,
        *,
        retry_initial: float,
        retry_max: float,
        attempts: int,
        on_done: Callable[[int, TransferResult | None, BaseException | None, bool], None],
    ) -> None:
        self.local = local
        self.durable = durable
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.attempts = attempts
        self.on_done = on_done
        self.current: Upload | None = None
        self._lock = threading.Lock()
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        with self._lock:
            return self.current is not None

    def in_flight(self) -> frozenset[int]:
        with self._lock:
            return frozenset({self.current.step}) if self.current else frozenset()

    def submit(self, step: int) -> bool:
        """Start promoting ``step`` in the background; False if already busy."""
        with self._lock:
            if self.current is not None:
                return False
            self.current = Upload(step=step, started=time.time())
        self._thread = threading.Thread(
            target=self._run, args=(step,), name=f"tiered-promote-{step}", daemon=True
        )
        self._thread.start()
        return True

    def wait(self, timeout: float | None) -> bool:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def abort(self) -> None:
        """Stop retrying (the current attempt still finishes or fails on its own)."""
        self._abort.set()

    def _progress(self, done: int, total: int) -> None:
        with self._lock:
            if self.current is not None:
                self.current.bytes_done = done
                self.current.bytes_total = total

    def _run(self, step: int) -> None:
        result: TransferResult | None = None
        error: BaseException | None = None
        permanent = False
        for attempt in range(1, self.attempts + 1):
            with self._lock:
                if self.current is not None:
                    self.current.attempt = attempt
            try:
                result = promote_step(self.local, self.durable, step, progress=self._progress)
                error = None
                break
            except (ChecksumMismatch, LayoutError, CommitError) as err:
                error, permanent = err, True
            except StorageError as err:
                error, permanent = err, not err.transient
            except FileNotFoundError as err:
                # The local step vanished under us (pruned by hand, or moved for a restore).
                error, permanent = err, False
            except OSError as err:
                error, permanent = err, False
            if permanent or attempt == self.attempts or self._abort.is_set():
                break
            delay = random.uniform(0, min(self.retry_max, self.retry_initial * 2 ** (attempt - 1)))
            log.warning(
                "Promotion of step %d failed (attempt %d/%d), retrying in %.1f s: %s",
                step,
                attempt,
                self.attempts,
                delay,
                error,
            )
            if self._abort.wait(delay):
                break
        with self._lock:
            self.current = None
        self.on_done(step, result, error, permanent)

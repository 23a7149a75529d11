"""The progress of a long transfer, shown as users expect it: on a terminal, a bar with bytes,
rate and time left (rich's); anywhere else (the daemon, a trainer, a CI log, a pipe), one log line
every few seconds, ``restoring step 5000: 1.2 GB of 4.0 GB, 310 MB/s, 9s left``.

Both are a ``Progress`` callback, ``(bytes done, bytes total)``, called from transfer threads.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator

from tiered.units import human_bytes, human_duration, human_rate

Progress = Callable[[int, int], None]


class LogProgress:
    """A log line every ``every`` seconds while bytes move, and one when all have."""

    def __init__(
        self,
        what: str,
        *,
        logger: logging.Logger,
        every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.log = logger
        self.every = every
        self.clock = clock
        self.started = clock()
        self.last = self.started
        self.lock = threading.Lock()
        self.finished = False

    def line(self, done: int, total: int) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = done / elapsed
        text = f"{self.what}: {human_bytes(done)} of {human_bytes(total)}, {human_rate(rate)}"
        if done < total and rate > 0:
            text += f", {human_duration((total - done) / rate)} left"
        return text

    def __call__(self, done: int, total: int) -> None:
        with self.lock:
            now = self.clock()
            final = done >= total
            if self.finished or (not final and now - self.last < self.every):
                return
            self.last = now
            self.finished = final
            self.log.info("%s", self.line(done, total))


@contextlib.contextmanager
def shown(what: str, *, logger: logging.Logger, terminal: bool | None = None) -> Iterator[Progress]:
    """A progress callback for one transfer: rich's bar on a terminal (stderr), log lines
    otherwise."""
    if not (sys.stderr.isatty() if terminal is None else terminal):
        yield LogProgress(what, logger=logger)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as Bar

    bar = Bar(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    task = bar.add_task(what, total=None)
    with bar:

        def show(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield show

"""One daemon, and one trainer, per local directory: flocks in ``.tiered/`` holding owners' pids.

The kernel drops an flock when its holder dies, kill -9 included, so a stale lock file never
blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from tiered.errors import TieredError
from tiered.layout import LOCK_NAME


class AlreadyRunning(TieredError):
    """Another daemon holds the lock."""


class DaemonLock:
    """The lock of one kind of owner (``what``) of a local directory."""

    def __init__(self, tiered_dir: Path, *, name: str = LOCK_NAME, what: str = "tiered daemon"):
        self.path = Path(tiered_dir) / name
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.holder()
            raise AlreadyRunning(
                f"another {self.what} (pid {pid if pid is not None else 'unknown'}) already "
                f"uses {self.path.parent.parent}; only one may run per local directory"
            ) from None
        os.fchmod(fd, 0o644)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def holder(self) -> int | None:
        """The pid of the daemon holding the lock, or None when nobody holds it."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 64).decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

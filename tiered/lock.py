"""One daemon per local directory: an flock on ``.tiered/daemon.lock`` holding the owner's pid."""

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
    def __init__(self, tiered_dir: Path) -> None:
        self.path = Path(tiered_dir) / LOCK_NAME
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
                f"another tiered daemon (pid {pid if pid is not None else 'unknown'}) already "
                f"serves {self.path.parent.parent}; only one may run per local directory"
            ) from None
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

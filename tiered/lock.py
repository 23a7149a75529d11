"""One daemon, and one trainer, per local directory: flocks in ``.tiered/`` holding owners' pids.

The kernel drops an flock when its holder dies, kill -9 included, so a stale lock file never
blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from tiered.errors import AlreadyRunning, ConfigError
from tiered.layout import LOCK_NAME


class DirectoryLock:
    """One writer's lock of a local directory. ``what`` names this holder; the file records it
    beside the pid, so whoever is refused learns who holds it."""

    def __init__(self, tiered_dir: Path, *, name: str = LOCK_NAME, what: str = "tiered daemon"):
        self.path = Path(tiered_dir) / name
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(
                f"local_checkpoint_directory {self.path.parent.parent}: cannot take the lock "
                f"{self.path.relative_to(self.path.parent.parent)}: "
                f"{err.strerror or err}; the local tier must be a writable directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid, who = self._read_holder()
            raise AlreadyRunning(
                f"another {who or self.what} (pid {pid if pid is not None else 'unknown'}) "
                f"already uses {self.path.parent.parent}; only one may run per local directory"
            ) from None
        os.fchmod(fd, 0o644)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{self.what}\n".encode())
        self._fd = fd

    def annotate(self, note: str) -> None:
        """Record one more line in the lock file (the daemon's status address), for whoever
        finds the directory taken."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n{self.what}\n{note}\n".encode(), 0)

    def note(self) -> str | None:
        """The holder's note (see ``annotate``), when the lock is held."""
        if self.holder() is None:
            return None
        lines = self._lines()
        return lines[2].strip() or None if len(lines) > 2 else None

    def _lines(self) -> list[str]:
        try:
            return self.path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def _read_holder(self) -> tuple[int | None, str | None]:
        lines = self._lines()
        pid = int(lines[0]) if lines and lines[0].strip().isdigit() else None
        return pid, (lines[1].strip() or None) if len(lines) > 1 else None

    def still_held(self) -> bool:
        """Whether the lock file at our path is still the one we hold: a removed or replaced
        file (``.tiered/`` deleted and recreated, say) leaves our flock on an orphan, and a
        second owner could then take the new file."""
        if self._fd is None:
            return False
        try:
            ours, there = os.fstat(self._fd), os.stat(self.path)
        except OSError:
            return False
        return (ours.st_dev, ours.st_ino) == (there.st_dev, there.st_ino)

    def reacquire(self) -> None:
        """Take the lock again at our path after ``still_held`` turned False; raises
        ``AlreadyRunning`` when another owner got there first."""
        self.release()
        self.acquire()

    def exists(self) -> bool:
        return self.path.exists()

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
                pid, _who = self._read_holder()
                return pid if pid is not None else -1
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

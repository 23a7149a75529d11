"""Publishing a small local file in one step: the one way tiered writes a file a reader may be
looking at (a manifest kept for a step, a protocol file for orbax's client, a part marker or a
decision on a ``file://`` durable tier).

The bytes go to a temporary name of this writer's own (``layout.tmp_name``), are synced, and are
then renamed over the final name; or, when the file must not exist yet, hard-linked to it, which
fails if it does. A reader sees the old file, the whole new one, or nothing. A directory is
deleted the same way round (``discard``): renamed out of sight first, then removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from tiered.layout import tmp_name


def publish_file(
    path: str | os.PathLike[str], data: bytes, *, exclusive: bool = False, mode: int = 0o644
) -> bool:
    """Put ``data`` at ``path``; with ``exclusive``, only if nothing is there (False if it was)."""
    final = Path(path)
    tmp = final.with_name(tmp_name(final.name))
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask must not make it narrower than asked
        if not exclusive:
            os.replace(tmp, final)
            return True
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def discard(path: Path, trash: Path, name: str) -> None:
    """Delete a directory so that no reader ever sees part of it: one rename into ``trash`` (on
    the same filesystem) takes it out of its namespace, then it is removed; a crash in between
    leaves it whole in ``trash``, for ``empty_trash``."""
    trash.mkdir(parents=True, exist_ok=True)
    dest = trash / name
    os.replace(path, dest)
    shutil.rmtree(dest, ignore_errors=True)


def empty_trash(trash: Path) -> None:
    """Remove what earlier deletions moved into ``trash`` (after a crash, too)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in trash.iterdir():
            shutil.rmtree(entry, ignore_errors=True)

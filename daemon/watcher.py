"""Filesystem events as hints: they only wake the service loop, which then rescans.

The service checks, then watches, then checks again, and also rescans on a timer, because inotify
can drop events (queue overflow) and the daemon may have been down while steps appeared. Only
events that can change a decision wake it: a step directory moved or created at the top level
(orbax renames a finished save into place, so one non-recursive watch of the root suffices),
a commit marker closed or moved into place, a step deleted, orbax's protocol files, and
``.tiered/`` itself going away (the lock with it). Writes inside ``.tiered/`` and inside orbax's
tmp directories are ignored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from tiered.sidecar import (
    COMMIT_MARKER,
    REPLICATOR_FILE,
    TIERED_DIR,
    is_tmp_name,
    parse_step,
)

log = logging.getLogger(__name__)


def is_interesting(root: Path, path: str) -> bool:
    """Whether an event at ``path`` may change what the daemon should do."""
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        return False
    parts = rel.parts
    if parts == (TIERED_DIR,):
        return True  # removed or replaced: the daemon's lock went with it; take it back now
    if not parts or parts[0] == TIERED_DIR or is_tmp_name(parts[0]):
        return False
    if len(parts) == 1:
        return parse_step(parts[0]) is not None or parts[0] == REPLICATOR_FILE
    return len(parts) == 2 and parse_step(parts[0]) is not None and parts[1] == COMMIT_MARKER


class _Handler(FileSystemEventHandler):
    def __init__(self, root: Path, wake: threading.Event) -> None:
        self.root = root
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write", "modified"):
            return
        paths = [str(event.src_path), str(getattr(event, "dest_path", "") or "")]
        if any(p and is_interesting(self.root, p) for p in paths):
            log.debug("event %s %s", event.event_type, paths)
            self.wake.set()


class Watcher:
    """Wakes ``wake`` when something that matters changes under ``root``."""

    def __init__(self, root: Path, wake: threading.Event) -> None:
        self.root = Path(root)
        self._observer = Observer()
        self._observer.schedule(_Handler(self.root, wake), str(self.root), recursive=False)
        self._observer.daemon = True

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)


def save_in_progress(root: Path, *, quiet_seconds: float = 5.0) -> bool:
    """Whether the trainer is writing a save now: a tmp directory written to recently.

    A tmp directory left by a trainer killed mid-save stays forever; it must not hold the
    drain until the grace period runs out.
    """
    try:
        tmps = [p for p in root.iterdir() if is_tmp_name(p.name)]
    except OSError:
        return False
    cutoff = time.time() - quiet_seconds
    for tmp in tmps:
        for dirpath, _dirs, files in os.walk(tmp):
            for name in [".", *files]:
                with contextlib.suppress(OSError):
                    if os.stat(os.path.join(dirpath, name)).st_mtime > cutoff:
                        return True
    return False

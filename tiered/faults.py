"""Fault points for crash and stall tests, controlled from the environment.

``TIERED_FAULT=point`` makes the process exit with status 137 (as if killed with -9) the first
time it reaches ``point``; ``TIERED_FAULT=point:N`` on the N-th time. ``TIERED_PAUSE=point:S``
sleeps S seconds there instead, so a test can act in the window. Points in use:

    upload-file       after one file of a step is uploaded
    after-manifest    after a step's manifest is built, before its upload
    commit            after the durable manifest is written, before the commit marker
    prune-local       after a local step's commit marker is removed, before its data
    prune-durable     after a durable step's commit marker is removed, before its data

The environment is read on first use, not at import. Unset, every point is a no-op.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

_lock = threading.Lock()
_spec: dict[str, tuple[str, float]] | None = None
_counts: dict[str, int] = {}


def _load() -> dict[str, tuple[str, float]]:
    spec: dict[str, tuple[str, float]] = {}
    for var, action in (("TIERED_FAULT", "crash"), ("TIERED_PAUSE", "pause")):
        value = os.environ.get(var, "")
        if value:
            name, _, arg = value.partition(":")
            default = 1.0 if action == "crash" else 5.0
            spec[name] = (action, float(arg) if arg else default)
    return spec


def hit(point: str) -> None:
    """Crash or pause here if the environment asks for it."""
    global _spec
    with _lock:
        if _spec is None:
            _spec = _load()
        if point not in _spec:
            return
        action, arg = _spec[point]
        _counts[point] = _counts.get(point, 0) + 1
        count = _counts[point]
    if action == "pause":
        log.warning("Fault injection: pausing %.1f s at %s", arg, point)
        time.sleep(arg)
    elif count >= arg:
        log.error("Fault injection: exiting at %s", point)
        os._exit(137)

"""A storage call within a deadline, and the cause when it does not answer.

Object-store clients retry on their own for a minute or more (gcsfs six times, botocore with
its own backoff, google-auth three times against a metadata server that is not there), logging
each retry at DEBUG or WARNING. ``within`` waits ``seconds``, and when the call has not
returned it names what the client was retrying on (``Cannot connect to host 127.0.0.1:1``, no
Google credentials), where a bare timeout would hide it. The clients' own retry messages are
collected, not printed: a user sees one line naming the cause, not three google-auth warnings.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from tiered.errors import StorageError

T = TypeVar("T")

CLIENT_LOGGERS = (
    "gcsfs",
    "google.auth",
    "google.auth.compute_engine",
    "s3fs",
    "botocore",
    "aiobotocore",
    "urllib3",
)

_CREDENTIALS = (
    "credentials were not found",
    "could not automatically determine credentials",
    "Cloud SDK credentials not found",
    'Connection with method "google_default" failed',
    "metadata server unavailable",
    "Unable to locate credentials",
    "NoCredentialsError",
)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.retried: str | None = None
        self.credentials: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a library's malformed log call must not break the caller
            return
        if "retrying after exception:" in text:
            self.retried = text.split("retrying after exception:", 1)[1].strip()
        elif any(marker.lower() in text.lower() for marker in _CREDENTIALS):
            self.credentials = text.strip()

    def cause(self) -> str | None:
        if self.credentials:
            return (
                "no credentials found (GCS: `gcloud auth application-default login`, "
                "GOOGLE_APPLICATION_CREDENTIALS or the node's service account; S3: AWS_* "
                "variables or an instance role)"
            )
        return self.retried


def within(
    seconds: float, fn: Callable[[], T], *, knob: str = "tiered.durable_timeout_seconds"
) -> T:
    """``fn()``, or a transient ``StorageError`` when it takes longer than ``seconds``, naming
    what the storage client kept retrying on and ``knob``, the setting that sets ``seconds``
    (the thread is left to finish on its own)."""
    box: dict[str, Any] = {}
    collect = _Collect()
    loggers = [logging.getLogger(name) for name in CLIENT_LOGGERS]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(collect)
        lg.propagate = False
        if lg.getEffectiveLevel() > logging.DEBUG:
            lg.setLevel(logging.DEBUG)

    def restore() -> None:
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            lg.removeHandler(collect)
            lg.setLevel(level)
            lg.propagate = propagate

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the caller below
            box["error"] = err
        finally:
            # Answered, late or not: the clients log as configured again. Until then a call
            # still retrying after the caller gave up keeps its noise collected.
            restore()

    thread = threading.Thread(target=run, name="tiered-durable-within", daemon=True)
    thread.start()
    thread.join(seconds)
    alive = thread.is_alive()
    if alive:
        cause = collect.cause()
        raise StorageError(
            f"unreachable: {cause} (no answer within {seconds:g} s, {knob})"
            if cause
            else f"no answer within {seconds:g} s ({knob})",
            transient=True,
        )
    if "error" in box:
        raise box["error"]
    return box["value"]

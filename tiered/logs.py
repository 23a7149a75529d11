"""Logging for the ``tiered`` command and the daemon: one line per event, text or JSON.

JSON lines carry an RFC 3339 time with milliseconds and zone, the level, the logger, the
message, and the structured fields a log pipeline filters on (``event``, ``step``, ``tier``,
``bytes``, ``seconds``) when the event has them: pass them as ``extra=fields(...)``.

Storage clients log their own retries and failures with tracebacks (gcsfs: "out of retries on
exception", 40 lines); tiered reports the same failure itself, in one line, so a library's
record keeps its first line and loses its traceback. Below WARNING they stay quiet even with
``-v`` (botocore prints the S3 access key id at DEBUG) unless asked for by name
(``--debug-logger botocore``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Iterable
from typing import Any

from tiered.units import human_bytes

LIBRARIES = (
    "urllib3",
    "botocore",
    "boto3",
    "aiobotocore",
    "s3fs",
    "gcsfs",
    "fsspec",
    "google",
    "aiohttp",
    "asyncio",
    "watchdog",
    "absl",
    "jax",
    "orbax",
)
FIELDS = ("event", "step", "tier", "bytes", "seconds")
SAVED = "Saved checkpoint at step %d (%s, %s s, %s)"
"""The line users grep for, one per save on each tier: step, tier, duration and size."""


def seconds_text(seconds: float) -> str:
    """A save's duration as the line shows it: to the millisecond under 0.1 s (a local save of
    a small state takes milliseconds, which one decimal showed as "0.0 s"), to the hundredth
    under a second, then to the tenth."""
    if seconds < 0.0995:
        return f"{seconds:.3f}"
    return f"{seconds:.2f}" if seconds < 0.995 else f"{seconds:.1f}"


def fields(event: str, **values: Any) -> dict[str, Any]:
    """``extra=`` for a log call: the event's name and its structured fields."""
    return {"event": event, **{k: v for k, v in values.items() if k in FIELDS}}


def log_saved(
    logger: logging.Logger,
    *,
    step: int,
    tier: str,
    seconds: float,
    size: int | None,
    detail: str = "",
    event: str = "saved",
) -> None:
    """One INFO line for a checkpoint that is now whole on ``tier``:
    ``Saved checkpoint at step 5000 (local, 1.2 s, 245.3 MB)``, then ``detail``."""
    logger.info(
        SAVED + "%s",
        step,
        tier,
        seconds_text(seconds),
        human_bytes(size),
        detail,
        extra=fields(event, step=step, tier=tier, bytes=size, seconds=round(seconds, 3)),
    )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, tz=dt.timezone.utc)
        out: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _OneLineFromLibraries(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in LIBRARIES:
            message = record.getMessage()
            record.msg = message.splitlines()[0] if message else ""
            record.args = ()
            record.exc_info = record.exc_text = record.stack_info = None
        return True


def configure(
    fmt: str = "text",
    *,
    verbose: bool = False,
    debug_loggers: Iterable[str] = (),
    text_format: str = "%(asctime)s %(levelname)s %(name)s: %(message)s",
) -> None:
    """Send every record to stderr, one line each, at INFO (DEBUG with ``verbose``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(text_format))
    handler.addFilter(_OneLineFromLibraries())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    asked = set(debug_loggers)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if name in asked else logging.WARNING)
    for name in asked - set(LIBRARIES):
        logging.getLogger(name).setLevel(logging.DEBUG)

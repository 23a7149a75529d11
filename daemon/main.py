"""The daemon's entry point: logging, CPU priority, signals, one line per start-up error."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys

from daemon.service import Daemon
from tiered import TieredConfig, TieredError

log = logging.getLogger("daemon")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


_LIBRARIES = (
    "urllib3",
    "botocore",
    "aiobotocore",
    "gcsfs",
    "fsspec",
    "watchdog",
    "google",
    "asyncio",
    "s3fs",
    "aiohttp",
)


class _OneLineFromLibraries(logging.Filter):
    """Storage clients log their own retries and failures, with tracebacks (gcsfs: "out of
    retries on exception", 40 lines). tiered reports the same failure itself, in one line, so a
    library's record keeps its first line and loses its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in _LIBRARIES:
            record.msg = record.getMessage().splitlines()[0] if record.getMessage() else ""
            record.args = ()
            record.exc_info = record.exc_text = record.stack_info = None
        return True


def configure_logging(fmt: str, *, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_OneLineFromLibraries())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in _LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def lower_cpu_priority(nice: int) -> int:
    """Run at least at ``nice`` (``tiered.daemon_nice``), so that on a busy host the trainer's
    threads win the CPU and the daemon takes what is left. Returns the nice value now in force.

    Called before the daemon starts any thread: on Linux the nice value is per thread and new
    threads inherit it. It only ever lowers the priority, which needs no privilege; a daemon
    started at a higher nice value keeps it.
    """
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > current:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError as err:  # e.g. a seccomp profile that forbids it: run anyway, and say so
            log.warning("Could not lower the daemon's CPU priority to nice %d: %s", nice, err)
            return current
        return nice
    return current


def run_daemon(cfg: TieredConfig, *, log_format: str = "text") -> int:
    """The ``tiered daemon`` entry point: run until SIGTERM/SIGINT, then drain."""
    configure_logging(log_format)
    nice = lower_cpu_priority(cfg.tiered.daemon_nice)
    log.info("Running at nice %d (tiered.daemon_nice: %d)", nice, cfg.tiered.daemon_nice)
    # `kill -USR1 <pid>` prints every thread's stack: stuck work is visible without a debugger.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        daemon = Daemon(cfg)

        def on_signal(signum: int, frame: object) -> None:
            log.info("Received %s", signal.Signals(signum).name)
            daemon.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        return daemon.run()
    except TieredError as err:
        print(f"tiered: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # what start-up meets on a path a user gave: say which, in a line
        where = f": {err.filename}" if err.filename else ""
        print(f"tiered: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2

"""The daemon's entry point: logging, CPU priority, signals, one line per start-up error."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys

from daemon.service import Daemon
from tiered import TieredConfig, TieredError
from tiered.sidecar import configure

log = logging.getLogger("daemon")


def configure_logging(fmt: str, *, verbose: bool = False, debug_loggers: tuple = ()) -> None:
    configure(fmt, verbose=verbose, debug_loggers=debug_loggers)


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


def run_daemon(
    cfg: TieredConfig,
    *,
    log_format: str = "text",
    verbose: bool = False,
    debug_loggers: tuple = (),
) -> int:
    """The ``tiered daemon`` entry point: run until SIGTERM/SIGINT, then drain."""
    configure_logging(log_format, verbose=verbose, debug_loggers=debug_loggers)
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

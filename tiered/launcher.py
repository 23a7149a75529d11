"""``tiered run``: the launcher that turns a terminal's Ctrl+C into a checkpoint.

A terminal sends Ctrl+C's SIGINT to its whole foreground process group, and a Python trainer
turns it into KeyboardInterrupt: nothing is saved. The launcher starts the trainer in a session
(and process group) of its own, so that only the launcher receives it, and then:

- the first SIGINT goes on to the trainer's group as SIGTERM, the preemption signal trainers
  understand (MaxText's ``enable_autocheckpoint``, ``tiered.CheckpointManager``); a second one
  stops the group at once with SIGKILL;
- SIGTERM (Kubernetes, Slurm) and SIGHUP (the terminal closed) go on as SIGTERM;
- a trainer still running ``grace`` seconds after the first stop signal is told so and stopped
  with SIGKILL: no stop depends on the trainer honouring SIGTERM (JAX's preemption notifier can
  leave a trainer running past it), and the daemon still promotes the newest local step;
- when no daemon holds this local directory's lock, it runs ``tiered daemon`` as its child for as
  long as the trainer runs, and stops it (SIGTERM: the daemon drains, promoting the preemption or
  final step) only after the trainer has exited; it then waits, with a progress line, until the
  daemon is done, within the daemon's shutdown grace plus a margin;
- it exits with the trainer's exit code (128 + N for a trainer killed by signal N), or 130 after
  a Ctrl+C.

No child outlives the launcher, whatever ends it: the trainer gets ``PR_SET_PDEATHSIG`` (Linux:
SIGTERM when the launcher dies), and a watchdog process, in a session of its own, holds the read
end of a pipe only the launcher writes: when the launcher dies (kill -9 included) the pipe
closes, and the watchdog sends SIGTERM and then SIGKILL to the trainer's group, and then SIGTERM
to the daemon, so that it still promotes what the trainer saved.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from tiered.errors import TieredError
from tiered.lock import DirectoryLock
from tiered.storage import LocalTier

if TYPE_CHECKING:
    from tiered.config import TieredConfig

PR_SET_PDEATHSIG = 1
DAEMON_START_SECONDS = 60.0
DRAIN_MARGIN_SECONDS = 30.0
PROGRESS_SECONDS = 5.0


def _die_with_parent(sig: int) -> Callable[[], None]:
    """A ``preexec_fn``: the kernel sends ``sig`` to this child when the launcher dies."""
    parent = os.getpid()

    def preexec() -> None:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return preexec


def exit_code(returncode: int) -> int:
    """A shell's exit status for a child's ``returncode`` (negative: killed by that signal)."""
    return 128 - returncode if returncode < 0 else returncode


def _killpg(pgid: int, sig: int) -> bool:
    """Signal a process group; False when it is gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a reused id of someone else's group: not ours
        return False
    return True


def _group_alive(pgid: int) -> bool:
    return _killpg(pgid, 0)


# -- the watchdog ---------------------------------------------------------------------------------


def _watch(read_fd: int, *, grace: float, drain: float) -> None:
    """In the watchdog process: read what the launcher tells it until the pipe closes; when it
    closes without "done", the launcher died: stop its children in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    trainer = daemon = None
    done = False
    with os.fdopen(read_fd, "r") as pipe:
        for line in pipe:
            word, _, value = line.strip().partition(" ")
            if word == "trainer":
                trainer = int(value)
            elif word == "daemon":
                daemon = int(value)
            elif word == "done":
                done = True
    if done:
        return
    if trainer is not None and _killpg(trainer, signal.SIGTERM):
        deadline = time.monotonic() + grace
        while _group_alive(trainer) and time.monotonic() < deadline:
            time.sleep(0.1)
        _killpg(trainer, signal.SIGKILL)
    if daemon is not None:
        with contextlib.suppress(OSError):
            os.kill(daemon, signal.SIGTERM)
            deadline = time.monotonic() + drain
            while time.monotonic() < deadline:
                os.kill(daemon, 0)
                time.sleep(0.2)
            os.kill(daemon, signal.SIGKILL)


def start_watchdog(*, grace: float, drain: float) -> int:
    """Fork the watchdog; returns the pipe's write end (the launcher keeps it open)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the watchdog
        try:
            os.close(write_fd)
            os.setsid()  # out of the terminal's process group: Ctrl+C is not for it
            # hold none of the launcher's files (a pipe a caller reads to its end, say)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, read_fd)
            os.closerange(read_fd + 1, os.sysconf("SC_OPEN_MAX"))
            # a grandchild of the launcher: no zombie once it exits
            if os.fork() != 0:
                os._exit(0)
            _watch(read_fd, grace=grace, drain=drain)
        finally:
            os._exit(0)
    os.close(read_fd)
    os.waitpid(pid, 0)  # the first child exits at once; its child is the watchdog
    return write_fd


# -- the launcher ---------------------------------------------------------------------------------


@dataclass
class Launch:
    """One ``tiered run``: what it was given."""

    command: Sequence[str]
    local_dir: os.PathLike[str] | str
    daemon_command: Sequence[str]
    grace: float = 120.0
    drain: float = 330.0
    """How long to wait for the daemon to drain once the trainer is gone."""
    out: TextIO = field(default_factory=lambda: sys.stderr)


class Launcher:
    def __init__(self, launch: Launch) -> None:
        self.launch = launch
        self.local = LocalTier(Path(launch.local_dir))
        self.trainer: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.interrupts = 0
        self.stop_sent_at: float | None = None
        self.killed = False
        self._pipe: int | None = None

    def say(self, text: str) -> None:
        self.launch.out.write(f"tiered: {text}\n")
        self.launch.out.flush()

    def _tell_watchdog(self, line: str) -> None:
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                os.write(self._pipe, f"{line}\n".encode())

    def newest_step(self) -> int | None:
        try:
            return max(self.local.committed_steps(), default=None)
        except OSError:
            return None

    # -- signals --

    def _on_signal(self, signum: int, frame: object) -> None:
        trainer = self.trainer
        if trainer is None or trainer.poll() is not None:
            if signum == signal.SIGINT:
                self.interrupts += 1
            self._stop_waiting(signum)
            return
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= 2:
                self._kill_trainer("stopping at once (SIGKILL)")
                return
            newest = self.newest_step()
            saved = f" (newest local step: {newest})" if newest is not None else ""
            self.say(f"saving the current step{saved}, press Ctrl+C again to stop at once")
        else:
            self.say(f"{signal.Signals(signum).name}: passing SIGTERM on to the trainer")
        if self.stop_sent_at is None:
            self.stop_sent_at = time.monotonic()
        _killpg(trainer.pid, signal.SIGTERM)

    def _stop_waiting(self, signum: int) -> None:
        """A signal while the daemon drains: a second one stops it (the local steps stay; the
        next daemon promotes them)."""
        if self.daemon is None or self.daemon.poll() is not None:
            return
        if signum == signal.SIGINT and self.interrupts < 2:
            self.say("still waiting for the daemon; press Ctrl+C again to stop waiting")
            return
        self.say("not waiting for the daemon: the next daemon promotes what is owed")
        self.daemon.kill()

    def _kill_trainer(self, why: str) -> None:
        assert self.trainer is not None
        newest = self.newest_step()
        self.say(why + (f"; the newest local step is {newest}" if newest is not None else ""))
        self.killed = True
        _killpg(self.trainer.pid, signal.SIGKILL)

    # -- the daemon --

    def _start_daemon(self) -> int | None:
        """Start ``tiered daemon`` unless one holds the lock; None when one serves us now,
        else the daemon's exit status when it could not start."""
        lock = DirectoryLock(self.local.tiered_dir)
        holder = lock.holder()
        if holder is not None:
            self.say(f"the daemon (pid {holder}) serves {self.local.root}")
            return None
        self.daemon = subprocess.Popen(
            list(self.launch.daemon_command),
            # the terminal's Ctrl+C is not for it; if the launcher dies, the watchdog stops it
            # after the trainer, so that it still promotes the trainer's last save
            start_new_session=True,
        )
        self._tell_watchdog(f"daemon {self.daemon.pid}")
        deadline = time.monotonic() + DAEMON_START_SECONDS
        while time.monotonic() < deadline:
            holder = lock.holder()
            if holder == self.daemon.pid:
                self.say(f"started the daemon (pid {holder}) for {self.local.root}")
                return None
            rc = self.daemon.poll()
            if rc is not None:
                self.daemon = None
                if lock.holder() is not None:  # another launcher's daemon won the race
                    self.say(f"the daemon (pid {lock.holder()}) serves {self.local.root}")
                    return None
                self.say(
                    f"the daemon could not start (exit {exit_code(rc)}); not starting the trainer"
                )
                return exit_code(rc) or 1
            time.sleep(0.05)
        self.say("the daemon did not take its lock in time; not starting the trainer")
        self.daemon.kill()
        self.daemon.wait()
        self.daemon = None
        return 1

    def _drain_daemon(self) -> bool:
        """Stop our daemon once the trainer is gone: it promotes what is owed first. True when
        it drained (exit 0)."""
        daemon = self.daemon
        if daemon is None:
            return True
        newest = self.newest_step()
        what = f"step {newest}" if newest is not None else "what is owed"
        self.say(f"waiting for {what} to be durable (the daemon drains)")
        daemon.send_signal(signal.SIGTERM)
        started = time.monotonic()
        shown = started
        while daemon.poll() is None:
            now = time.monotonic()
            if now - started > self.launch.drain:
                self.say(f"the daemon did not finish within {self.launch.drain:.0f} s; stopping it")
                daemon.kill()
                break
            if now - shown >= PROGRESS_SECONDS:
                shown = now
                self.say(f"still waiting for {what} to be durable ({now - started:.0f} s)")
            time.sleep(0.1)
        rc = daemon.wait()
        if rc == 0:
            self.say(f"{what} is durable" if newest is not None else "the daemon drained")
            return True
        self.say(
            f"{what} may not be durable yet (the daemon exited {exit_code(rc)}); the local step "
            "stays, and the next daemon promotes it"
        )
        return False

    # -- the run --

    def run(self) -> int:
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, self._on_signal) for s in handled}
        self._pipe = start_watchdog(grace=self.launch.grace, drain=self.launch.drain)
        try:
            failed = self._start_daemon()
            if failed is not None:
                return failed
            if self.interrupts:  # Ctrl+C while the daemon started
                self._drain_daemon()
                return 130
            self.trainer = subprocess.Popen(
                list(self.launch.command),
                start_new_session=True,  # only the launcher gets the terminal's Ctrl+C
                preexec_fn=_die_with_parent(signal.SIGTERM),
            )
            self._tell_watchdog(f"trainer {self.trainer.pid}")
            rc = self._wait_trainer()
            drained = self._drain_daemon()
            if self.interrupts:
                return 130
            code = exit_code(rc)
            return code if code or drained else 1
        finally:
            if self.trainer is not None and self.trainer.poll() is None:
                self.trainer.kill()
            if self.daemon is not None and self.daemon.poll() is None:
                self.daemon.kill()
            self._tell_watchdog("done")
            if self._pipe is not None:
                os.close(self._pipe)
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _wait_trainer(self) -> int:
        trainer = self.trainer
        assert trainer is not None
        while True:
            try:
                rc = trainer.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            sent = self.stop_sent_at
            if sent is not None and not self.killed and time.monotonic() - sent > self.launch.grace:
                self._kill_trainer(
                    f"the trainer did not stop within {self.launch.grace:.0f} s of SIGTERM; "
                    "stopping it (SIGKILL)"
                )
        # whatever the trainer left in its group (a data loader, a shell's child) goes with it
        _killpg(trainer.pid, signal.SIGKILL)
        return rc


def maxtext_config_of(command: Sequence[str]) -> tuple[str, list[str]] | None:
    """MaxText's YAML and ``key=value`` overrides on a MaxText command line (``python -m
    maxtext.trainers.pre_train.train config.yml k=v ...``), for the daemon to read as MaxText
    does; None when the command is not MaxText's."""
    for i, word in enumerate(command):
        if "maxtext" in word.lower():
            for j in range(i + 1, len(command)):
                if command[j].endswith((".yml", ".yaml")):
                    rest = command[j + 1 :]
                    return command[j], [w for w in rest if "=" in w and not w.startswith("-")]
            return None
    return None


def configs_for(
    command: Sequence[str],
    *,
    config: str | None,
    maxtext: str | None,
    overrides: Sequence[str],
) -> tuple[str | None, list[str], list[str]]:
    """(MaxText's YAML, its overrides, the daemon's config arguments) for ``tiered run``: as
    given, or read from a MaxText command line as MaxText reads it."""
    found = maxtext_config_of(command) if maxtext is None else None
    if found is not None:
        maxtext, overrides = found[0], [*found[1], *overrides]
    args = [
        *(["--config", config] if config else []),
        *(["--maxtext-config", maxtext] if maxtext else []),
        *overrides,
    ]
    return maxtext, list(overrides), args


def launch(
    cfg: TieredConfig,
    command: Sequence[str],
    *,
    daemon_args: Sequence[str],
    grace: float,
    verbose: bool = False,
) -> int:
    """``tiered run``: the trainer's exit status, once what it saved is durable."""
    if not command:
        raise TieredError("tiered run needs the trainer's command after --: tiered run -- CMD ...")
    tiered_cli = [sys.executable, "-m", "tiered.cli", "daemon"]
    return Launcher(
        Launch(
            command=command,
            local_dir=cfg.local_dir,
            daemon_command=[*tiered_cli, *daemon_args, *(["-v"] if verbose else [])],
            grace=grace,
            drain=cfg.tiered.shutdown_grace_seconds + DRAIN_MARGIN_SECONDS,
        )
    ).run()

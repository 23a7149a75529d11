"""`tiered run`: the launcher, with real processes (a tiny trainer script, the real daemon).

A terminal's Ctrl+C is SIGINT to its foreground process group: these tests start the launcher
in a group of its own and signal that group, as the terminal would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiered.lock import DirectoryLock

from conftest import ROOT, DaemonProc, subprocess_env, wait_for, write_config

TRAINER = str(ROOT / "tests" / "launcher_trainer.py")


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


class Run:
    """``tiered run --config FILE [ARGS] -- python launcher_trainer.py WORK [TRAINER ARGS]``."""

    def __init__(self, tmp_path: Path, *trainer_args: str, run_args: tuple[str, ...] = ()):
        self.work = tmp_path
        self.config, self.cfg = write_config(tmp_path, f"file://{tmp_path / 'durable'}")
        self.err = tmp_path / "launcher.err"
        launcher = [sys.executable, "-m", "tiered.cli", "run", "--config", str(self.config)]
        self.proc = subprocess.Popen(
            [*launcher, *run_args, "--", sys.executable, TRAINER, str(tmp_path), *trainer_args],
            cwd=ROOT,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=open(self.err, "wb"),  # noqa: SIM115
            start_new_session=True,  # the "terminal's" foreground group: the launcher alone
        )
        self.lock = DirectoryLock(self.cfg.local_dir / ".tiered")

    def trainer(self) -> dict[str, int]:
        path = self.work / "trainer.json"
        wait_for(path.exists, timeout=60, what="the trainer started")
        info: dict[str, int] = json.loads(path.read_text())
        return info

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.err.read_text()

    def durable(self) -> list[int]:
        root = self.work / "durable"
        if not root.exists():
            return []
        return sorted(
            int(p.name)
            for p in root.iterdir()
            if p.name.isdigit() and (p / "commit_success.txt").exists()
        )


@pytest.fixture
def runs():
    started: list[Run] = []
    yield started
    for run in started:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


def test_ctrl_c_saves_the_step_and_the_daemon_it_started_makes_it_durable(tmp_path, runs):
    run = Run(tmp_path)
    runs.append(run)
    info = run.trainer()
    # the trainer leads a session and group of its own: the terminal's SIGINT is not for it
    assert info["pgid"] == info["pid"] == info["sid"]
    assert info["sid"] != os.getsid(run.proc.pid)
    daemon = wait_for(run.lock.holder, timeout=30, what="the launcher's daemon")
    assert daemon != run.proc.pid
    run.ctrl_c()
    assert run.wait() == 130
    err = run.stderr()
    assert "press Ctrl+C again to stop at once" in err
    assert not (tmp_path / "sigint").exists(), "the trainer got the SIGINT"
    assert (tmp_path / "sigterm").exists(), "the trainer was not told to save"
    # durable when the launcher returns, and the daemon it started is gone
    assert run.durable() == [37], err
    assert "step 37 is durable" in err
    assert run.lock.holder() is None
    assert not alive(daemon)


def test_a_second_ctrl_c_stops_the_whole_group_at_once(tmp_path, runs):
    run = Run(tmp_path, "--ignore-term", "--grandchild")
    runs.append(run)
    info = run.trainer()
    wait_for(run.lock.holder, timeout=30, what="the launcher's daemon")
    run.ctrl_c()
    wait_for(lambda: (tmp_path / "sigterm").exists(), timeout=10, what="SIGTERM passed on")
    started = time.monotonic()
    run.ctrl_c()
    assert run.wait() == 130
    assert time.monotonic() - started < 20
    assert "stopping at once" in run.stderr()
    assert not alive(info["pid"])
    assert not alive(info["grandchild"]), "a process the trainer started was left behind"


def test_sigterm_is_passed_through_and_the_trainers_exit_status_returned(tmp_path, runs):
    run = Run(tmp_path, "--exit", "3")
    runs.append(run)
    run.trainer()
    wait_for(run.lock.holder, timeout=30, what="the launcher's daemon")
    run.proc.send_signal(signal.SIGTERM)  # Kubernetes signals the launcher alone
    assert run.wait() == 3
    assert (tmp_path / "sigterm").exists()
    assert run.durable() == [37]


def test_a_trainer_that_ignores_sigterm_is_stopped_after_the_grace(tmp_path, runs):
    run = Run(tmp_path, "--ignore-term", run_args=("--grace", "1"))
    runs.append(run)
    info = run.trainer()
    wait_for(run.lock.holder, timeout=30, what="the launcher's daemon")
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 128 + signal.SIGKILL
    assert "did not stop within 1 s" in run.stderr()
    assert not alive(info["pid"])


def test_no_daemon_is_started_when_one_serves_the_config(tmp_path, runs):
    config, cfg = write_config(tmp_path, f"file://{tmp_path / 'durable'}")
    daemon = DaemonProc(config, cfg)
    try:
        daemon.wait_ready()
        run = Run(tmp_path)
        runs.append(run)
        run.trainer()
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait() == 0
        assert f"the daemon (pid {daemon.proc.pid}) serves" in run.stderr()
        assert "started the daemon" not in run.stderr()
        assert daemon.proc.poll() is None, "the launcher stopped a daemon it did not start"
        wait_for(lambda: run.durable() == [37], timeout=30, what="the sidecar promotes step 37")
    finally:
        assert daemon.terminate() == 0


def test_kill_9_of_the_launcher_leaves_no_child_and_loses_no_step(tmp_path, runs):
    run = Run(tmp_path, "--grandchild")
    runs.append(run)
    info = run.trainer()
    daemon = wait_for(run.lock.holder, timeout=30, what="the launcher's daemon")
    run.proc.kill()
    run.wait()
    for pid in (info["pid"], info["grandchild"], daemon):
        wait_for(lambda pid=pid: not alive(pid), timeout=60, what=f"pid {pid} to end")
    # the trainer was told to save (SIGTERM), and the daemon promoted it before it went
    assert (tmp_path / "sigterm").exists()
    assert run.durable() == [37]


def test_run_without_a_command_is_a_one_line_error(tmp_path):
    config, _cfg = write_config(tmp_path, f"file://{tmp_path / 'durable'}")
    out = subprocess.run(
        [sys.executable, "-m", "tiered.cli", "run", "--config", str(config), "--"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "needs the trainer's command after --" in out.stderr


def test_the_native_example_under_tiered_run_loses_no_step_to_ctrl_c(tmp_path):
    """``tiered run -- python examples/train.py``: Ctrl+C to the group saves the step reached,
    it is durable when ``tiered run`` returns, and the same command resumes right after it."""
    config, cfg = write_config(
        tmp_path,
        f"file://{tmp_path / 'durable'}",
        local_checkpoint_period=200,
        checkpoint_period=1000,
    )
    example = [sys.executable, str(ROOT / "examples" / "train.py"), "--config", str(config)]
    command = [
        *[sys.executable, "-m", "tiered.cli", "run", "--config", str(config), "--"],
        *[*example, "--steps", "100000", "--step-time", "0.01"],
    ]
    lock = DirectoryLock(cfg.local_dir / ".tiered")

    def ctrl_c_after(started: str) -> tuple[str, str]:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert first.startswith(started), first
            time.sleep(1.0)  # some steps past the start
            os.killpg(proc.pid, signal.SIGINT)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, err
        return first + out, err

    out, err = ctrl_c_after("FRESH")
    stopped = [line for line in out.splitlines() if line.startswith("STOPPED")]
    assert stopped, out + err
    step = int(stopped[0].split("=")[1].split()[0])
    # durable when the launcher returns; the daemon it started is gone
    root = tmp_path / "durable"
    assert (root / str(step) / "commit_success.txt").exists(), err
    assert f"step {step} is durable" in err
    assert lock.holder() is None
    # the same command resumes right after it: not one step lost
    out, err = ctrl_c_after(f"RESUMED step={step} from=")

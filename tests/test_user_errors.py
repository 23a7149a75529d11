"""Every user error is one line naming the cause and what to change, exit 2, nothing touched:
the paths a user can give (``~``, relative, too long, a file where a directory belongs), the
status port, the lock, and the command line itself, fuzzed."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiered.cli import main

from conftest import ROOT, config_dict, subprocess_env


def run(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiered.cli", *argv],
        capture_output=True,
        text=True,
        env={**subprocess_env(), **(env or {})},
        cwd=ROOT,
        timeout=timeout,
    )


def config(tmp_path: Path, **overrides: object) -> Path:
    path = tmp_path / "c.yml"
    path.write_text(
        yaml.safe_dump(config_dict(tmp_path, f"file://{tmp_path}/durable", **overrides))
    )
    return path


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The error, in one line (the daemon's log may have said hello first, at INFO)."""
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = [ln for ln in out.stderr.splitlines() if " INFO " not in ln]
    assert len(lines) == 1 and lines[0].startswith("tiered: error: "), out.stderr
    assert "Traceback" not in out.stderr and len(lines[0]) < 600, out.stderr
    return lines[0]


def test_the_status_port_taken_names_the_address_and_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        c = config(tmp_path, tiered={"status_address": address})
        message = one_line(run("daemon", "--config", str(c)))
    assert address in message and "in use" in message and "tiered.status_address" in message


def test_a_lock_that_cannot_be_taken_is_one_line(tmp_path: Path) -> None:
    c = config(tmp_path)
    lock = tmp_path / "local" / ".tiered" / "daemon.lock"
    lock.mkdir(parents=True)  # in the way, as a read-only or foreign file would be
    message = one_line(run("daemon", "--config", str(c)))
    assert "cannot take the lock .tiered/daemon.lock" in message
    assert "local_checkpoint_directory" in message


def test_verify_of_a_step_that_is_not_there(tmp_path: Path) -> None:
    c = config(tmp_path)
    (tmp_path / "durable").mkdir()
    message = one_line(run("verify", "70", "--config", str(c)))
    assert "step 70 is not committed on file://" in message and "committed: none" in message


def test_home_relative_paths_are_expanded(tmp_path: Path) -> None:
    c = tmp_path / "c.yml"
    c.write_text(
        "local_checkpoint_directory: ~/ssd\ncheckpoint_dir: ~/durable\n"
        "local_checkpoint_period: 10\ncheckpoint_period: 50\n"
    )
    out = run("status", "--json", "--no-daemon", "--config", str(c), env={"HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert f'"local_dir": "{tmp_path}/ssd"' in out.stdout
    assert f'"durable_url": "file://{tmp_path}/durable"' in out.stdout
    assert not (ROOT / "~").exists()


@pytest.mark.parametrize(
    ("what", "setup"),
    [
        ("a file where the local directory belongs", "file"),
        ("a name longer than the filesystem allows", "long"),
    ],
)
def test_bad_local_paths_are_one_line_and_touch_nothing(
    tmp_path: Path, what: str, setup: str
) -> None:
    if setup == "file":
        local = tmp_path / "ssd"
        local.write_text("not a directory")
    else:
        local = tmp_path / ("x" * 300)
    c = config(tmp_path, local_checkpoint_directory=str(local))
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (("daemon",), ("status", "--no-daemon")):
        message = one_line(run(*argv, "--config", str(c)))
        assert str(local)[:40] in message or "name too long" in message, (what, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if setup == "file":
        assert local.read_text() == "not a directory"


VOCABULARY = st.sampled_from(
    [
        "status",
        "promote",
        "restore",
        "export",
        "verify",
        "prune",
        "jax-env",
        "--json",
        "--no-daemon",
        "--dry-run",
        "--step",
        "--tier",
        "local",
        "durable",
        "--item",
        "state",
        "--rank",
        "--nodes",
        "--format",
        "env",
        "sh",
        "--config",
        "--maxtext-config",
        "--wait-settled",
        "0",
        "1",
        "50",
        "-3",
        "x",
        "run_name=r",
        "=",
        "a=b=c",
        "--",
        "",
        "../../etc/passwd",
        "\x00",
        "é",
        "9" * 30,
        "--local-devices",
        "0,x",
    ]
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(words=st.lists(VOCABULARY, max_size=7))
def test_the_command_line_never_tracebacks(tmp_path: Path, words: list[str]) -> None:
    """Whatever the words, `tiered` (never the daemon here) answers with a status code and at
    most one error line."""
    c = config(tmp_path)
    argv = [w if w != "--config" else f"--config={c}" for w in words]
    if "daemon" in argv:
        return
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as exit_:  # argparse's --help and usage errors
            rc = int(exit_.code or 0)
    assert rc in (0, 1, 2, 3), (argv, rc, err.getvalue())
    if rc == 2:
        assert err.getvalue().count("\n") == 1, (argv, err.getvalue())
    assert "Traceback" not in err.getvalue()
    assert not (Path(os.getcwd()) / "~").exists()

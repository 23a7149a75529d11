"""docs/troubleshooting.md quotes what tiered prints: each entry's lines are produced here by the
real ``tiered`` command and matched (``<...>`` stands for what differs per run), or, for what a
test on this machine cannot cause (no credentials, a full disk, a node that never asks, a peer
with another secret), found in the source text of the messages."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiered.lock import DirectoryLock

from conftest import ROOT, free_port, subprocess_env

PAGE = ROOT / "docs" / "troubleshooting.md"


def entries() -> dict[int, list[str]]:
    """Entry number -> the lines of its code blocks."""
    out: dict[int, list[str]] = {}
    number = None
    in_block = False
    for line in PAGE.read_text().splitlines():
        heading = re.match(r"## (\d+)\. ", line)
        if heading:
            number = int(heading.group(1))
            out[number] = []
        elif line.startswith("```"):
            in_block = not in_block
        elif in_block and number is not None:
            out[number].append(line)
    return out


def pattern(doc_line: str) -> re.Pattern[str]:
    parts = re.split(r"<[^<>]*>", doc_line)
    return re.compile(".+?".join(re.escape(p) for p in parts))


def tiered(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tiered.cli", *args],
        capture_output=True,
        text=True,
        env={**subprocess_env(), **(env or {})},
        cwd=tmp_path,
        timeout=120,
    )
    return done.stdout + done.stderr


def assert_printed(number: int, output: str) -> None:
    lines = entries()[number]
    assert lines, f"entry {number} has no quoted output"
    printed = output.splitlines()
    for doc_line in lines:
        rx = pattern(doc_line)
        assert any(rx.fullmatch(p) for p in printed), (
            f"docs/troubleshooting.md entry {number} quotes\n  {doc_line}\nbut tiered printed\n"
            + "\n".join(f"  {p}" for p in printed)
        )


def base(tmp_path: Path, durable: str, **over: object) -> str:
    keys = {
        "local_checkpoint_directory": str(tmp_path / "local"),
        "checkpoint_dir": durable,
        "local_checkpoint_period": 10,
        "checkpoint_period": 50,
        **over,
    }
    return "".join(f"{k}: {v}\n" for k, v in keys.items())


def test_entry_1_no_credentials(tmp_path: Path) -> None:
    """No emulator, no credentials file, no gcloud login, and the metadata server (a node's
    service account) at a port where nothing listens: what a laptop without a login sees."""
    (tmp_path / "c.yml").write_text(base(tmp_path, "gs://some-bucket/run"))
    (tmp_path / "home").mkdir()
    env = {
        "HOME": str(tmp_path / "home"),
        "GCE_METADATA_HOST": f"127.0.0.1:{free_port()}",
        "GCE_METADATA_IP": f"127.0.0.1:{free_port()}",
        "STORAGE_EMULATOR_HOST": "",
        "GOOGLE_APPLICATION_CREDENTIALS": "",
        "CLOUDSDK_CONFIG": str(tmp_path / "home"),
    }
    assert_printed(1, tiered(tmp_path, "status", "--no-daemon", "--config", "c.yml", env=env))


def test_entry_2_a_missing_bucket(tmp_path: Path, gcs_emulator: object) -> None:
    (tmp_path / "c.yml").write_text(
        base(tmp_path, "gs://no-such-bucket/run") + "tiered:\n  storage_options: {token: anon}\n"
    )
    assert_printed(2, tiered(tmp_path, "status", "--no-daemon", "--config", "c.yml"))


def test_entry_3_a_store_that_does_not_answer(tmp_path: Path) -> None:
    (tmp_path / "c.yml").write_text(
        base(tmp_path, "gs://bucket/run") + "tiered:\n  storage_options: {token: anon}\n"
    )
    dead = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{free_port()}"}
    assert_printed(3, tiered(tmp_path, "status", "--no-daemon", "--config", "c.yml", env=dead))


def test_entries_4_5_6_8_config_and_restore(tmp_path: Path) -> None:
    durable = tmp_path / "durable"
    (tmp_path / "c.yml").write_text(
        base(tmp_path, durable, local_checkpoint_period=1000, checkpoint_period=2500)
    )
    assert_printed(4, tiered(tmp_path, "status", "--config", "c.yml"))
    (tmp_path / "c.yml").write_text(
        base(tmp_path, durable) + "teired:\n  local_max_to_keep: 3\n"
        "tiered:\n  local_max_to_kep: 3\n"
    )
    assert_printed(5, tiered(tmp_path, "status", "--config", "c.yml"))
    (tmp_path / "run.yml").write_text(
        f"local_checkpoint_directory: {tmp_path}/local\nrun_name: r\n"
    )
    assert_printed(6, tiered(tmp_path, "status", "--maxtext-config", "run.yml"))
    (tmp_path / "c.yml").write_text(base(tmp_path, f"file://{durable}"))
    assert_printed(8, tiered(tmp_path, "restore", "--config", "c.yml"))


def test_entries_7_and_10_the_daemon(tmp_path: Path) -> None:
    (tmp_path / "c.yml").write_text(base(tmp_path, f"file://{tmp_path}/durable"))
    assert_printed(10, tiered(tmp_path, "status", "--config", "c.yml"))
    (tmp_path / "local" / ".tiered").mkdir(parents=True)
    lock = DirectoryLock(tmp_path / "local" / ".tiered", what="tiered daemon")
    lock.acquire()
    try:
        started = time.monotonic()
        assert_printed(7, tiered(tmp_path, "daemon", "--config", "c.yml"))
        assert time.monotonic() - started < 60
    finally:
        lock.release()


def _source_text() -> str:
    """Every module's text, its string literals joined across lines as Python joins them."""
    text = "\n".join(
        p.read_text() for d in ("tiered", "daemon") for p in sorted((ROOT / d).rglob("*.py"))
    )
    return re.sub(r"\"\s*\n\s*\+?\s*f?\"", "", text)


@pytest.mark.parametrize("number", [9, 11, 12])
def test_entries_no_test_here_can_cause_quote_the_source(number: int) -> None:
    source = _source_text()
    lines = entries()[number]
    assert lines
    for doc_line in lines:
        for fragment in re.split(r"<[^<>]*>|%s", doc_line):
            fragment = fragment.strip(" :;,()[]")
            if len(fragment) >= 8:
                assert fragment in source, f"entry {number}: {fragment!r} is in no message"


def test_every_entry_is_checked() -> None:
    assert sorted(entries()) == list(range(1, 13))

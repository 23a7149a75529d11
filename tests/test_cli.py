"""The `tiered` command: real steps, real tiers, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tiered import DurableTier, LocalTier

from conftest import ROOT, subprocess_env, write_config
from helpers import Trainer, example_state


def tiered(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiered.cli", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=120,
    )


def test_promote_verify_status_restore_prune(tmp_path: Path) -> None:
    config_path, cfg = write_config(
        tmp_path, f"file://{tmp_path}/durable", max_num_checkpoints_to_keep=1
    )
    trainer = Trainer(cfg.local_dir)
    for step in (40, 50, 60, 100):
        trainer.save(step, example_state())
    trainer.close()
    c = str(config_path)
    assert tiered("promote", "50", "--config", c).returncode == 0
    out = tiered("verify", "50", "--config", c)
    assert out.returncode == 0 and "all match" in out.stdout
    status = json.loads(tiered("status", "--json", "--no-daemon", "--config", c).stdout)
    states = {s["step"]: s["state"] for s in status["steps"]}
    assert states == {40: "local", 50: "committed", 60: "local", 100: "due"}
    assert status["daemon"]["running"] is False
    table = tiered("status", "--config", c).stdout
    assert "committed" in table and "due" in table and "daemon   not running" in table

    dry = tiered("prune", "--dry-run", "--config", c)
    assert "would prune local step 40" in dry.stdout
    assert "local step 100" not in dry.stdout  # due: pinned
    assert LocalTier(cfg.local_dir).committed_steps() == [40, 50, 60, 100]
    assert tiered("prune", "--config", c).returncode == 0
    assert LocalTier(cfg.local_dir).committed_steps() == [60, 100]

    LocalTier(cfg.local_dir).delete_step(60)
    LocalTier(cfg.local_dir).delete_step(100)
    out = tiered("restore", "--config", c)
    assert out.returncode == 0, out.stderr
    assert LocalTier(cfg.local_dir).committed_steps() == [50]


def test_verify_reports_corruption_with_exit_3(tmp_path: Path) -> None:
    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    trainer = Trainer(cfg.local_dir)
    trainer.save(50, example_state())
    trainer.close()
    assert tiered("promote", "50", "--config", str(config_path)).returncode == 0
    durable = DurableTier(cfg.durable_url)
    manifest = durable.read_manifest(50)
    victim = sorted(manifest.files)[-1]
    path = Path(durable.object_path(50, victim))
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    out = tiered("verify", "50", "--config", str(config_path))
    assert out.returncode == 3
    assert out.stderr.startswith("tiered: verification failed:") and victim in out.stderr


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "local_checkpoint_directory: /tmp/x\ncheckpoint_dir: /tmp/y\n"
        "checkpoint_period: 15\nlocal_checkpoint_period: 10\n"
    )
    out = tiered("status", "--config", str(bad))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "checkpoint_period (15)" in out.stderr
    config_path, _ = write_config(tmp_path, f"file://{tmp_path}/durable")
    out = tiered("promote", "70", "--config", str(config_path))
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "step 70 is not a committed step" in out.stderr


def test_wait_settled_waits_for_preemption_steps(tmp_path: Path) -> None:
    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    trainer = Trainer(cfg.local_dir)
    trainer.save(37, example_state(), reason="preemption")
    trainer.close()
    c = str(config_path)
    busy = tiered("status", "--no-daemon", "--wait-settled", "1", "--config", c)
    assert busy.returncode == 1 and "still busy" in busy.stderr
    assert tiered("promote", "37", "--config", c).returncode == 0
    settled = tiered("status", "--no-daemon", "--wait-settled", "1", "--config", c)
    assert settled.returncode == 0, settled.stderr


def test_verify_catches_another_steps_ocdbt_file_of_the_same_size(tmp_path: Path) -> None:
    """Every OCDBT file has the same crc32c: only the manifest's xxh3 tells step 50's root
    database from step 40's, and `tiered verify` exits 3 naming it."""
    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    trainer = Trainer(cfg.local_dir)
    trainer.save(40, example_state(1))
    trainer.save(50, example_state(2))
    trainer.close()
    c = str(config_path)
    for step in ("40", "50"):
        assert tiered("promote", step, "--config", c).returncode == 0
    durable = DurableTier(cfg.durable_url)
    rel = next(r for r in durable.read_manifest(50).files if r.endswith("manifest.ocdbt"))
    theirs = Path(durable.object_path(40, rel)).read_bytes()
    assert len(theirs) == durable.read_manifest(50).files[rel].size
    Path(durable.object_path(50, rel)).write_bytes(theirs)
    out = tiered("verify", "50", "--config", c)
    assert out.returncode == 3 and f"{rel}: xxh3" in out.stderr
    assert tiered("verify", "40", "--config", c).returncode == 0


def test_python_m_daemon_is_tiered_daemon(tmp_path: Path) -> None:
    # Images run the sidecar as `python -m daemon`; it must take what `tiered daemon` takes.
    from conftest import run_module

    both = [run_module("daemon", "--help"), tiered("daemon", "--help")]
    for done in both:
        assert done.returncode == 0, done.stderr
        assert "--verbose" in done.stdout and "--debug-logger" in done.stdout
    missing = str(tmp_path / "nope.yml")
    errors = [
        run_module("daemon", "-v", "--config", missing),
        tiered("daemon", "-v", "--config", missing),
    ]
    assert [e.returncode for e in errors] == [2, 2]
    assert errors[0].stderr == errors[1].stderr and "nope.yml" in errors[0].stderr

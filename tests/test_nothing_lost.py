"""The ways tiered used to lose checkpoints, each run end to end: a real trainer (orbax saves of
real arrays), the real daemon in a subprocess, and the durable tier on a directory, the GCS
emulator and moto. Every case ends with every due step durable as a byte-exact copy of the
trainer's latest save of that step, or still local."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from tiered import CheckpointManager, DurableTier, LocalTier, promote_step
from tiered.layout import COMMIT_MARKER, DISPLACED_DIR, MANIFEST_NAME
from tiered.manifest import Manifest, build_manifest, iter_step_files

from conftest import ROOT, DaemonProc, run_module, subprocess_env, wait_for, write_config
from helpers import Trainer, assert_trees_equal, example_state


def distinct(n: int) -> Any:
    return jax.tree.map(lambda x: x + n if x.dtype != np.uint32 else x ^ n, example_state())


def copy_like_a_tool(durable: DurableTier, step_dir: Path, step: int) -> None:
    """What a copy tool (or plain orbax) leaves: every file and the marker, no tiered manifest."""
    files = [(rel, full) for rel, full in iter_step_files(step_dir) if rel != COMMIT_MARKER]
    for rel, full in [*files, (COMMIT_MARKER, step_dir / COMMIT_MARKER)]:
        durable.fs.put_file(str(full), durable.object_path(step, rel))


def identities(durable: DurableTier) -> dict[int, str | None]:
    durable.fs.invalidate_cache()
    return {d.step: d.identity for d in durable.scan() if d.committed}


def tiered_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_module("tiered.cli", *args, env=env)


def test_steps_saved_again_take_the_durable_place_and_nothing_is_lost(
    store: tuple[str, dict], tmp_path: Path
) -> None:
    """A marker-only step (left by a copy tool) and another run's step share numbers with the
    new run's steps. Neither is taken for a copy: each is moved aside whole, and the new bytes
    are uploaded in its place."""
    url, options = store
    config_path, cfg = write_config(tmp_path, url, tiered={"storage_options": options})
    durable = DurableTier(url, storage_options=options)
    old_dir = tmp_path / "first-run"
    old = Trainer(old_dir)
    old.save(50, distinct(1))
    old.save(100, distinct(2))
    old.close()
    copy_like_a_tool(durable, old_dir / "50", 50)
    promote_step(LocalTier(old_dir), durable, 100)
    first_100 = durable.read_manifest(100)

    new = {s: distinct(10 + s) for s in (50, 100, 110)}
    trainer = Trainer(cfg.local_dir)
    for step, state in new.items():
        trainer.save(step, state)
    trainer.close()
    local = LocalTier(cfg.local_dir)
    expected = {s: build_manifest(local.step_dir(s), step=s).identity for s in (50, 100)}
    assert identities(durable) == {50: None, 100: first_100.identity}

    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        wait_for(
            lambda: {s: i for s, i in identities(durable).items() if s in expected} == expected,
            timeout=90,
            what=daemon.log(),
        )
        for step in expected:
            durable.verify_step(step)
        wait_for(lambda: local.committed_steps() == [100, 110], what="local retention")
        status = json.loads(daemon.get("/status")[1])
        moved = {d["step"]: d["name"] for d in status["displaced"] if d["tier"] == "durable"}
        assert sorted(moved) == [50, 100]
        assert "Moved durable step 50 aside" in daemon.log()
    finally:
        assert daemon.terminate() == 0, daemon.log()

    # What was moved aside is whole: the first run's step still matches its own manifest, and
    # the copy tool's step still has every file and its marker.
    aside = f"{durable.root}/{DISPLACED_DIR}"
    kept = Manifest.from_json(durable.fs.cat_file(f"{aside}/{moved[100]}/{MANIFEST_NAME}"))
    assert kept.identity == first_100.identity
    for rel, entry in kept.files.items():
        assert durable.fs.info(f"{aside}/{moved[100]}/{rel}")["size"] == entry.size
    foreign = durable.fs.find(f"{aside}/{moved[50]}")
    assert len(foreign) == len(list(iter_step_files(old_dir / "50")))

    # The drain owed the run's newest step; a fresh node restores it, bit for bit.
    assert durable.committed_steps() == [50, 100, 110]
    shutil.rmtree(cfg.local_dir)
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        restored = mgr.restore(example_state())
        assert restored is not None and restored.step == 110
        assert_trees_equal(restored.state, new[110])
        mgr.fetch(50)
    assert build_manifest(local.step_dir(50), step=50).identity == expected[50]


def test_a_step_retention_would_drop_is_never_uploaded(tmp_path: Path) -> None:
    """Promote-then-prune: the durable tier already holds max_num_checkpoints_to_keep newer
    steps, so the older due step is skipped (and unpinned), never uploaded and deleted again."""
    url = f"file://{tmp_path}/durable"
    config_path, cfg = write_config(tmp_path, url, max_num_checkpoints_to_keep=2)
    durable = DurableTier(url)
    old = Trainer(tmp_path / "before")
    for step in (100, 150):
        old.save(step, distinct(step))
        promote_step(LocalTier(tmp_path / "before"), durable, step)
    old.close()
    trainer = Trainer(cfg.local_dir)
    for step in (50, 60, 160, 170):
        trainer.save(step, distinct(step))
    trainer.close()
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        wait_for(lambda: LocalTier(cfg.local_dir).committed_steps() == [160, 170], what="prune")

        def pruned() -> list[int]:
            status = json.loads(daemon.get("/status")[1])
            return [p["step"] for p in status["daemon"]["recently_pruned"]]

        wait_for(lambda: 50 in pruned(), what="step 50 pruned, not uploaded")
        time.sleep(2)  # several cycles: nothing comes back
        assert durable.committed_steps() == [100, 150]
    finally:
        assert daemon.terminate() == 0
    assert "Promoting step 50" not in daemon.log()
    # The drain promoted the run's newest step; retention then kept the newest two.
    assert durable.committed_steps() == [150, 170]


def test_skipped_steps_say_why_in_the_status(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/durable"
    config_path, _cfg = write_config(tmp_path, url, max_num_checkpoints_to_keep=1)
    old = Trainer(tmp_path / "before")
    old.save(100, distinct(100))
    promote_step(LocalTier(tmp_path / "before"), DurableTier(url), 100)
    old.close()
    trainer = Trainer(_cfg.local_dir)
    trainer.save(50, distinct(50))
    trainer.close()
    out = tiered_cli("status", "--json", "--no-daemon", "--config", str(config_path))
    step50 = next(s for s in json.loads(out.stdout)["steps"] if s["step"] == 50)
    assert step50["state"] == "skipped" and step50["why"].startswith("superseded")
    table = tiered_cli("status", "--config", str(config_path)).stdout
    assert "skipped" in table


def test_one_writer_per_tier(tmp_path: Path) -> None:
    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    trainer = Trainer(cfg.local_dir)
    trainer.save(50, distinct(50))
    trainer.close()
    c = str(config_path)
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        for args in (("promote", "50"), ("prune",)):
            out = tiered_cli(*args, "--config", c)
            assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
            assert f"(pid {daemon.proc.pid}) owns" in out.stderr
        # a restore that would download (the step is durable only now) is refused the same way
        wait_for(lambda: DurableTier(cfg.durable_url).committed_steps() == [50], what="promoted")
        LocalTier(cfg.local_dir).delete_step(50)
        out = tiered_cli("restore", "--config", c)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert f"(pid {daemon.proc.pid}) owns" in out.stderr
    finally:
        assert daemon.terminate() == 0
    # The other way round: a daemon started while `tiered promote` writes is refused.
    shutil.rmtree(tmp_path / "durable")
    again = Trainer(cfg.local_dir)
    again.save(50, distinct(50))
    again.close()
    promote = subprocess.Popen(
        [sys.executable, "-m", "tiered.cli", "promote", "50", "--config", c],
        env={**subprocess_env(), "TIERED_PAUSE": "after-manifest:6"},
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (cfg.local_dir / ".tiered" / "daemon.lock").exists(), what="the lock")
        time.sleep(0.5)
        second = run_module("daemon", "--config", c, timeout=60)
        assert second.returncode == 2
        assert f"another tiered promote (pid {promote.pid}) already uses" in second.stderr
    finally:
        assert promote.wait(60) == 0, promote.stderr.read() if promote.stderr else ""
    assert DurableTier(cfg.durable_url).committed_steps() == [50]


def test_a_removed_lock_is_taken_back_and_a_second_daemon_refused(tmp_path: Path) -> None:
    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    first = DaemonProc(config_path, cfg)
    try:
        first.wait_ready()
        shutil.rmtree(cfg.local_dir / ".tiered")
        lock = cfg.local_dir / ".tiered" / "daemon.lock"
        wait_for(lambda: lock.exists(), timeout=10, what=f"the lock taken back\n{first.log()}")
        second = run_module("daemon", "--config", str(config_path), timeout=60)
        assert second.returncode == 2
        assert f"another tiered daemon (pid {first.proc.pid}) already uses" in second.stderr
        # The first daemon carries on as before.
        trainer = Trainer(cfg.local_dir)
        trainer.save(50, distinct(50))
        trainer.close()
        wait_for(lambda: DurableTier(cfg.durable_url).committed_steps() == [50], what=first.log())
        assert "taking it again" in first.log()
    finally:
        assert first.terminate() == 0


def test_a_missing_bucket_fails_the_step_once_not_forever(
    tmp_path: Path, gcs_emulator: Any
) -> None:
    """A permanent error (the bucket was deleted) marks the step failed with the reason; it is
    not retried in a loop, and its local copy is kept."""
    import gcsfs

    from conftest import make_bucket

    bucket = make_bucket()
    config_path, cfg = write_config(tmp_path, f"gs://{bucket}/run")
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        gcsfs.GCSFileSystem(token="anon").rm(bucket, recursive=True)
        trainer = Trainer(cfg.local_dir)
        trainer.save(50, distinct(50))
        trainer.close()

        def failed() -> dict[str, str]:
            return json.loads(daemon.get("/status")[1])["daemon"]["failed"]

        wait_for(failed, timeout=60, what=daemon.log())
        assert "bucket does not exist" in failed()["50"]
        time.sleep(2)
        assert daemon.log().count("Promoting step 50") == 1
        status = json.loads(daemon.get("/status")[1])
        assert next(s for s in status["steps"] if s["step"] == 50)["state"] == "failed"
        assert LocalTier(cfg.local_dir).committed_steps() == [50]
    finally:
        daemon.terminate()


@pytest.mark.parametrize(
    ("err", "transient"),
    [
        (OSError(36, "File name too long"), False),  # ENAMETOOLONG: a name the filesystem rejects
        (PermissionError(13, "Permission denied"), False),
        (OSError(30, "Read-only file system"), False),
        (OSError(28, "No space left on device"), True),  # space can be freed: back off, retry
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (TimeoutError("timed out"), True),
        (ValueError("invalid bucket name"), False),
    ],
)
def test_foreign_errors_map_onto_one_tree(err: BaseException, transient: bool) -> None:
    from tiered import StorageError
    from tiered.errors import NotFound
    from tiered.storage import translate_errors

    with pytest.raises(StorageError) as info, translate_errors("writing x"):
        raise err
    assert info.value.transient is transient
    assert str(info.value).startswith("writing x: ") and "\n" not in str(info.value)
    with (
        pytest.raises(NotFound, match="the bucket does not exist"),
        translate_errors("writing x", missing="the bucket does not exist"),
    ):
        raise FileNotFoundError(2, "nope")

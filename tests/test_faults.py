"""Faults and hostile input: nothing lost, nothing leaked. The matrix is docs/reliability.md."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import yaml

from tiered import CheckpointManager, DurableTier, LocalTier, TieredConfig, promote_step

from conftest import (
    ROOT,
    S3_KEY,
    S3_SECRET,
    DaemonProc,
    s3_bucket,
    s3_storage_options,
    subprocess_env,
    wait_for,
    write_config,
)
from helpers import Trainer, assert_trees_equal, corrupt_largest_file, example_state


def durable_of(cfg: TieredConfig) -> DurableTier:
    return DurableTier(cfg.durable_url, storage_options=cfg.tiered.storage_options)


def distinct_state(step: int) -> Any:
    return jax.tree.map(lambda x: x + step if x.dtype != np.uint32 else x ^ step, example_state())


def check_invariants(cfg: TieredConfig, saved: dict[int, Any], due: list[int]) -> None:
    """What must hold after any crash and restart."""
    durable = durable_of(cfg)
    committed = durable.committed_steps()
    for step in committed:
        durable.verify_step(step)  # every committed durable step matches its manifest
    local = LocalTier(cfg.local_dir).committed_steps()
    for step in due:
        # due steps are durable, still local, or pruned by durable retention after a newer one
        superseded = any(c > step for c in committed)
        assert step in committed or step in local or superseded, f"due step {step} was lost"
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        restored = mgr.restore(example_state())
    newest = max(saved)
    assert restored is not None and restored.step == newest
    assert_trees_equal(restored.state, saved[newest])


# -- crashes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "backend"),
    [
        ("upload-file:3", "gs"),
        ("commit", "gs"),
        ("commit", "file"),
        ("prune-local", "file"),
        ("prune-durable", "file"),
    ],
)
def test_kill_9_daemon_then_restart_keeps_invariants(
    fault: str, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("gs_url") if backend == "gs" else f"file://{tmp_path}/durable"
    config_path, cfg = write_config(
        tmp_path, url, max_num_checkpoints_to_keep=1, tiered={"local_max_to_keep": 1}
    )
    saved = {step: distinct_state(step) for step in range(10, 120, 10)}
    trainer = Trainer(cfg.local_dir)
    for step, state in saved.items():
        trainer.save(step, state)
    trainer.close()
    if fault == "prune-durable":
        # The daemon uploads newest first, so step 50 reaches the durable tier only by hand;
        # committing 100 then prunes it.
        promote_step(LocalTier(cfg.local_dir), durable_of(cfg), 50)
    crashed = DaemonProc(config_path, cfg, env={"TIERED_FAULT": fault})
    assert crashed.proc.wait(60) == 137, crashed.log()
    crashed.kill()
    durable = durable_of(cfg)
    for step in durable.committed_steps():
        durable.verify_step(step)  # nothing half-written ever carries a commit marker
    check_invariants(cfg, saved, due=[50, 100])

    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        wait_for(lambda: durable.committed_steps() == [100], timeout=60, what=daemon.log())
        wait_for(lambda: LocalTier(cfg.local_dir).committed_steps() == [110], what="local prune")
        wait_for(lambda: [f.step for f in durable.scan()] == [100], what="partials cleaned")
    finally:
        assert daemon.terminate() == 0
    assert not any((cfg.local_dir / ".tiered" / "trash").iterdir())
    check_invariants(cfg, saved, due=[50, 100])


def test_kill_9_trainer_mid_save_leaves_tmp_that_nobody_mistakes(tmp_path: Path) -> None:
    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable", checkpoint_period=10)
    script = textwrap.dedent(f"""
        import os, signal
        import jax.numpy as jnp
        import tiered
        mgr = tiered.CheckpointManager({str(config_path)!r})
        mgr.save(10, {{"w": jnp.ones((1000,))}})
        mgr.wait_until_finished()
        mgr.save(20, {{"w": jnp.ones((60_000_000,))}})  # 240 MB, asynchronous
        import pathlib, time
        root = pathlib.Path({str(cfg.local_dir)!r})
        for _ in range(500):  # kill it once the save is under way (its tmp directory exists)
            if any(".orbax-checkpoint-tmp" in p.name for p in root.iterdir()):
                break
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), timeout=120)
    assert proc.returncode == -signal.SIGKILL
    tmp_dirs = [p for p in cfg.local_dir.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert tmp_dirs, "the kill should have interrupted the save of step 20"
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        wait_for(lambda: durable_of(cfg).committed_steps() == [10], what=daemon.log())
        assert all(p.exists() for p in tmp_dirs)  # the daemon never touches a save in progress
        with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
            restored = mgr.restore({"w": np.zeros((1000,), np.float32)})
            assert restored is not None and restored.step == 10
            assert mgr.save(20, {"w": np.full((1000,), 2.0, np.float32)})
        assert durable_of(cfg).committed_steps() == [10]
        assert LocalTier(cfg.local_dir).committed_steps() == [10, 20]
    finally:
        daemon.terminate()


# -- a flaky durable store ------------------------------------------------------------------------


@pytest.mark.slow
def test_flaky_store_retries_without_corruption(tmp_path: Path, gcs_emulator: Any) -> None:
    from faultproxy import FaultProxy

    from conftest import make_bucket

    bucket = make_bucket()
    with FaultProxy(
        os.environ["STORAGE_EMULATOR_HOST"], error=0.25, reset=0.1, latency=0.01
    ) as proxy:
        config_path, cfg = write_config(tmp_path, f"gs://{bucket}/run")
        daemon = DaemonProc(config_path, cfg, env={"STORAGE_EMULATOR_HOST": proxy.url})
        try:
            daemon.wait_ready()
            saved = {s: distinct_state(s) for s in (50, 100, 150)}
            trainer = Trainer(cfg.local_dir)
            for step, state in saved.items():
                trainer.save(step, state)
            trainer.close()
            durable = durable_of(cfg)  # straight to the emulator, not through the proxy
            wait_for(
                lambda: durable.committed_steps() == [50, 100, 150],
                timeout=180,
                what=daemon.log()[-3000:],
            )
            for step in saved:
                durable.verify_step(step)
            rss_kb = int(
                next(
                    line
                    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS")
                ).split()[1]
            )
            assert rss_kb < 300 * 1024
        finally:
            daemon.terminate()
    assert proxy.stats["error"] > 0 and proxy.stats["reset"] > 0


@pytest.mark.slow
def test_outage_shows_in_status_and_loses_nothing(tmp_path: Path) -> None:
    """The durable store refuses every request; due steps stay local and the status says why."""
    from faultproxy import FaultProxy

    with FaultProxy("http://127.0.0.1:9", error=1.0) as proxy:
        config_path, cfg = write_config(
            tmp_path,
            "gs://bucket/run",
            tiered={
                "local_max_to_keep": 1,
                "retry_attempts": 1,
                "storage_options": {"token": "anon", "endpoint_url": proxy.url},
            },
        )
        trainer = Trainer(cfg.local_dir)
        for step in (40, 50, 60, 70):
            trainer.save(step, example_state())
        trainer.close()
        cfg_dict = yaml.safe_load(config_path.read_text())
        daemon = DaemonProc(config_path, cfg)
        try:
            # The store refuses even the bucket check: the daemon stays up, alive but not ready,
            # says why in one line, and keeps every owed step.
            daemon.wait_ready()
            wait_for(lambda: daemon.get("/readyz")[0] == 503, timeout=150, what=daemon.log())
            wait_for(lambda: "does not answer" in daemon.log(), timeout=150, what=daemon.log())
            assert daemon.get("/healthz")[0] == 200 and daemon.proc.poll() is None
            assert "Traceback" not in daemon.log()
        finally:
            daemon.terminate()
        assert cfg_dict["tiered"]["storage_options"]["endpoint_url"] == proxy.url
    assert LocalTier(cfg.local_dir).committed_steps() == [50, 70]  # 50 is owed: kept


# -- a full local disk ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    mount = tmp_path / "ssd"
    mount.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_local_disk(small_disk: Path, tmp_path: Path, gcs_emulator: Any) -> None:
    from tiered import StorageError

    from conftest import make_bucket

    bucket = make_bucket()
    config_path, cfg = write_config(
        tmp_path,
        f"gs://{bucket}/run",
        local_checkpoint_directory=str(small_disk / "ckpt"),
        tiered={
            "local_max_to_keep": 2,
            "min_free_local_fraction": 0.5,
            "retry_attempts": 1,
            "retry_max_seconds": 60,
            # the store stays away, so a drain would wait out its whole grace for 50 and 70
            "shutdown_grace_seconds": 2,
        },
    )
    daemon = DaemonProc(config_path, cfg)
    daemon.wait_ready()
    # The durable tier goes away (its bucket is deleted): nothing due can be promoted, so the
    # due steps must stay while everything else is pruned.
    import gcsfs

    gcsfs.GCSFileSystem(token="anon").rm(bucket, recursive=True)
    # 6 MB per checkpoint of random floats (ones would compress to nothing)
    state = {"w": np.random.default_rng(0).standard_normal(1_500_000).astype(np.float32)}
    error: StorageError | None = None
    try:
        with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
            for step in range(10, 400, 10):
                try:
                    mgr.save(step, state)
                    mgr.wait_until_finished()
                except StorageError as err:
                    error = err
                    break
        assert error is not None, (
            f"the disk should have filled: {LocalTier(cfg.local_dir).committed_steps()} "
            f"{subprocess.run(['df', str(small_disk)], capture_output=True, text=True).stdout}"
            f"{daemon.log()[-3000:]}"
        )
        assert "is full (no space left on device)" in str(error)
        local = LocalTier(cfg.local_dir).committed_steps()
        assert {50, 100} <= set(local) or 50 in local  # due, not durable: never pruned
        # the daemon reacts on its next cycle: it says so, and frees what the rules allow
        wait_for(lambda: "Local disk pressure" in daemon.log(), what=daemon.log())
        wait_for(
            lambda: json.loads(daemon.get("/status")[1])["daemon"]["recently_pruned"],
            what="pruning",
        )
        status = json.loads(daemon.get("/status")[1])
        pruned = [p["step"] for p in status["daemon"]["recently_pruned"]]
        assert pruned and not {50, 100} & set(pruned)
    finally:
        daemon.terminate()


# -- corrupt and hostile data ---------------------------------------------------------------------


def test_bit_flip_before_promotion_is_caught(tmp_path: Path) -> None:
    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    trainer = Trainer(cfg.local_dir)
    trainer.save(50, example_state())
    trainer.close()
    daemon = DaemonProc(config_path, cfg, env={"TIERED_PAUSE": "after-manifest:4"})
    try:
        daemon.wait_ready()
        wait_for(lambda: "pausing" in daemon.log(), what="the daemon to build the manifest")
        manifest = LocalTier(cfg.local_dir).manifest(50)
        victim = max(manifest.files, key=lambda r: manifest.files[r].size)
        path = cfg.local_dir / "50" / victim
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
        wait_for(
            lambda: json.loads(daemon.get("/status")[1])["daemon"]["failed"],
            timeout=30,
            what=daemon.log(),
        )
        status = json.loads(daemon.get("/status")[1])
        assert "crc32c" in status["daemon"]["failed"]["50"]
        assert next(s for s in status["steps"] if s["step"] == 50)["state"] == "failed"
        assert durable_of(cfg).committed_steps() == []
        assert LocalTier(cfg.local_dir).committed_steps() == [50]  # kept for a human to inspect
    finally:
        daemon.terminate()


@pytest.mark.parametrize("mode", ["store", "verify_first"])
@pytest.mark.parametrize("damage", ["truncate", "lying-manifest"])
def test_damaged_durable_step_falls_back(
    damage: str, mode: str, tmp_path: Path, gs_url: str
) -> None:
    """Both restore modes catch a truncated object and a manifest that disagrees with the data:
    ``store`` sees the store's own crc32c differ from the manifest's and downloads instead."""
    _, cfg = write_config(tmp_path, gs_url, tiered={"durable_restore": mode})
    saved = {s: distinct_state(s) for s in (50, 100)}
    trainer = Trainer(cfg.local_dir)
    for step, state in saved.items():
        trainer.save(step, state)
    trainer.close()
    local, durable = LocalTier(cfg.local_dir), durable_of(cfg)
    for step in saved:
        promote_step(local, durable, step)
        local.delete_step(step)
    if damage == "truncate":
        manifest = durable.read_manifest(100)
        victim = max(manifest.files, key=lambda r: manifest.files[r].size)
        data = durable.fs.cat_file(durable.object_path(100, victim))
        durable.fs.pipe_file(durable.object_path(100, victim), data[: len(data) // 2])
    else:
        corrupt_largest_file(durable, 100)
        # ...and a manifest that lies to match: sizes right, checksum of the original file
        text = json.loads(durable.fs.cat_file(durable.object_path(100, "tiered-manifest.json")))
        first = sorted(text["files"])[0]
        text["files"][first]["crc32c"] = "AAAAAA=="
        durable.fs.pipe_file(
            durable.object_path(100, "tiered-manifest.json"), json.dumps(text).encode()
        )
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        restored = mgr.restore(example_state())
    assert restored is not None and restored.step == 50
    assert_trees_equal(restored.state, saved[50])


def test_symlink_out_of_step_is_refused_by_the_daemon(tmp_path: Path) -> None:
    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    trainer = Trainer(cfg.local_dir)
    trainer.save(50, example_state())
    trainer.close()
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY MATERIAL")
    (cfg.local_dir / "50" / "innocent").symlink_to(secret)
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        wait_for(
            lambda: json.loads(daemon.get("/status")[1])["daemon"]["failed"], what=daemon.log()
        )
        failed = json.loads(daemon.get("/status")[1])["daemon"]["failed"]["50"]
        assert "symlink points outside the step directory" in failed
    finally:
        daemon.terminate()
    durable = tmp_path / "durable"
    uploaded = [p for p in durable.rglob("*") if p.is_file()] if durable.exists() else []
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in uploaded)


def test_odd_file_names_round_trip(tmp_path: Path, durable_url: str) -> None:
    step_dir = tmp_path / "local" / "50"
    step_dir.mkdir(parents=True)
    names = ["a b.txt", "ünï#cödé?.bin", "per%cent", "quote'\"s", "sub dir/x+y=z", "-leading"]
    for i, name in enumerate(names):
        (step_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (step_dir / name).write_bytes(os.urandom(100 + i))
    (step_dir / "commit_success.txt").write_text("ok")
    opts = {"token": "anon"} if durable_url.startswith("gs://") else {}
    durable = DurableTier(durable_url, storage_options=opts)
    durable.upload_step(step_dir, step=50)
    assert sorted(durable.verify_step(50).files) == sorted(names)
    durable.download_step(50, tmp_path / "back")
    for name in names:
        assert (tmp_path / "back" / name).read_bytes() == (step_dir / name).read_bytes()


def test_hostile_step_names_are_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "local"
    root.mkdir()
    for name in ("-1", "00100", "1e3", "99999999999999999999999", " 7", "7 ", "x..", "\uff18"):
        (root / name).mkdir()
        (root / name / "commit_success.txt").write_text("ok")
    local = LocalTier(root)
    assert local.committed_steps() == []
    local.delete_step  # noqa: B018 - nothing above is a step, so nothing can be deleted


# -- security -------------------------------------------------------------------------------------


def test_no_credentials_in_logs_or_status_and_no_world_writable_files(
    tmp_path: Path, moto_server: str
) -> None:
    bucket = s3_bucket(moto_server)
    config_path, cfg = write_config(
        tmp_path,
        f"s3://{bucket}/run",
        tiered={"storage_options": s3_storage_options(moto_server)},
    )
    daemon = DaemonProc(config_path, cfg, env={"TIERED_LOG_FORMAT": "json"})
    try:
        daemon.wait_ready()
        trainer = Trainer(cfg.local_dir)
        trainer.save(50, example_state())
        trainer.close()
        durable = durable_of(cfg)
        wait_for(lambda: durable.committed_steps() == [50], what=daemon.log())
        durable.verify_step(50)
        status = daemon.get("/status")[1].decode()
        metrics = daemon.get("/metrics")[1].decode()
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "tiered.cli",
                "status",
                "--json",
                "--no-daemon",
                "--config",
                str(config_path),
            ],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            cwd=ROOT,
        )
    finally:
        daemon.terminate()
    files_text = "".join(
        p.read_text(errors="replace") for p in (cfg.local_dir / ".tiered").rglob("*") if p.is_file()
    )
    for text in (daemon.log(), status, metrics, cli.stdout, cli.stderr, files_text):
        assert S3_SECRET not in text and S3_KEY not in text
    for path in cfg.local_dir.rglob("*"):
        if not path.is_symlink():
            assert not path.stat().st_mode & stat.S_IWOTH, path


def test_http_server_binds_loopback_by_default() -> None:
    from tiered.config import TieredSettings

    host = TieredSettings().status_address.rpartition(":")[0]
    assert host in ("127.0.0.1", "localhost", "[::1]")


# -- time -----------------------------------------------------------------------------------------


def test_clock_jumps_do_not_stall_time_based_promotion() -> None:
    from tiered.policy import Rules, Snapshot, plan
    from tiered.types import DurableStep, LocalStep

    rules = Rules(durable_period=10**9, local_max_to_keep=2, backup_interval_seconds=600.0)

    def owed(local_times: dict[int, float], durable_time: float) -> list[int]:
        snap = Snapshot(
            now=0.0,
            local=tuple(
                LocalStep(step=s, committed=True, commit_time=t, identity=f"id{s}")
                for s, t in {100: durable_time, **local_times}.items()
            ),
            durable=(
                DurableStep(step=100, committed=True, identity="id100", commit_time=durable_time),
            ),
        )
        return sorted(u.step for u in plan(snap, rules).uploads)

    # the clock jumped back by hours: 110 was saved "before" the durable step 100
    assert owed({110: 500.0, 120: 700.0, 130: 1200.0}, 10_000.0) == [110, 130]
    assert owed({110: 10.0**7}, 0.0) == [110]  # a jump forward


def test_two_trainers_on_one_directory_are_refused(tmp_path: Path) -> None:
    from tiered import TieredError

    _, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    with (
        CheckpointManager(cfg, install_signal_handlers=False),
        pytest.raises(
            TieredError, match=rf"another tiered.CheckpointManager \(pid {os.getpid()}\)"
        ),
    ):
        CheckpointManager(cfg, install_signal_handlers=False)
    with CheckpointManager(cfg, install_signal_handlers=False):
        pass  # released on close: the next trainer gets it


def test_local_capacity_is_the_pod_limit_not_the_filesystem(tmp_path: Path) -> None:
    """An emptyDir sizeLimit is not what the filesystem reports free: with tiered.local_capacity
    set, the daemon measures its floor against it (and shrinks the local tier to the newest and
    pinned steps), long before the kubelet would evict the pod."""
    config_path, cfg = write_config(
        tmp_path,
        f"file://{tmp_path}/durable",
        checkpoint_period=1000,
        tiered={"local_max_to_keep": 3, "local_capacity": "2Mi", "min_free_local_fraction": 0.5},
    )
    assert cfg.tiered.local_capacity == 2 * 2**20
    trainer = Trainer(cfg.local_dir)
    state = {"w": np.random.default_rng(0).standard_normal(100_000).astype(np.float32)}  # 400 KB
    for step in (10, 20, 30):
        trainer.save(step, state)
    trainer.close()
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        wait_for(lambda: "Local disk pressure" in daemon.log(), what=daemon.log())
        wait_for(lambda: LocalTier(cfg.local_dir).committed_steps() == [30], what=daemon.log())
        # pruned to the newest step, the tier is back above its floor
        wait_for(lambda: "Local disk pressure over" in daemon.log(), what=daemon.log())
    finally:
        daemon.terminate()

"""The real daemon in a subprocess, beside real orbax saves, on a directory and the emulator."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiered import DurableTier, LocalTier
from tiered.manifest import build_manifest
from tiered.units import human_bytes

from conftest import ROOT, DaemonProc, run_module, subprocess_env, wait_for, write_config
from helpers import Trainer, assert_trees_equal, example_state, orbax_restore, orbax_save


def durable_of(cfg) -> DurableTier:
    return DurableTier(cfg.durable_url, storage_options=cfg.tiered.storage_options)


def test_promotes_exactly_the_durable_multiples_and_prunes(
    durable_url: str, tmp_path: Path
) -> None:
    config_path, cfg = write_config(
        tmp_path,
        durable_url,
        max_num_checkpoints_to_keep=2,
        tiered={"local_max_to_keep": 2, "keep_period": 100},
    )
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        state = example_state()
        saved = {}
        trainer = Trainer(cfg.local_dir)
        for step in range(0, 260, 10):  # a training loop saving every local period
            saved[step] = state
            trainer.save(step, state)
        trainer.close()
        durable = durable_of(cfg)
        # durable keeps the newest 2 multiples of 50 plus every multiple of keep_period (100);
        # step 0 (the initial state) is never due
        expected = [100, 200, 250]
        wait_for(
            lambda: durable.committed_steps() == expected,
            timeout=60,
            what=f"durable == {expected}: {daemon.log()[-2000:]}",
        )
        local = LocalTier(cfg.local_dir)
        wait_for(lambda: local.committed_steps() == [240, 250], timeout=30, what="local retention")
        for step in expected:
            durable.verify_step(step)
        # Plain orbax, pointed at the durable tier, restores the newest durable step bit-exact.
        if durable_url.startswith("file://"):
            restored = orbax_restore(durable_url[len("file://") :], 250, example_state(1))
            assert_trees_equal(restored, saved[250])
        code, body = daemon.get("/status")
        status = json.loads(body)
        assert code == 200 and status["schema"] == 2 and status["daemon"]["running"]
        assert status["latest"] == {"local": 250, "durable": 250, "restorable": 250}
    finally:
        assert daemon.terminate() == 0, daemon.log()


def check_metric_conventions(text: str) -> None:
    """What Prometheus users expect: counters end in _total, no _created series, base units
    as suffixes, every labelled series there from the start, the process collector on."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    ours = {n: f for n, f in families.items() if n.startswith("tiered_")}
    assert {"process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds"} <= set(
        families
    )
    assert not [ln for ln in text.splitlines() if "_created" in ln]
    for name, family in ours.items():
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), name
        if "bytes" in name or "seconds" in name:
            assert name.split("_")[-1] in ("bytes", "seconds"), f"{name}: unit not last"
    for name, label, values in (
        ("tiered_pruned_steps", "tier", {"local", "durable"}),
        ("tiered_errors", "kind", {"list", "transient", "permanent", "prune", "cycle", "peer"}),
        ("tiered_at_risk_steps", "event", {"crash", "preemption", "node"}),
    ):
        assert {s.labels[label] for s in ours[name].samples} == values, name
    promtool = shutil.which("promtool")
    if promtool:  # Prometheus' own linter, where it is installed (it is not on PyPI)
        done = subprocess.run(
            [promtool, "check", "metrics"], input=text.encode(), capture_output=True
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_http_endpoints(tmp_path: Path) -> None:
    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    daemon = DaemonProc(config_path, cfg, env={"TIERED_LOG_FORMAT": "json"})
    try:
        daemon.wait_ready()
        orbax_save(cfg.local_dir, 50, example_state())
        wait_for(lambda: durable_of(cfg).committed_steps() == [50], what="promotion")
        assert daemon.get("/healthz") == (200, b"alive\n")  # liveness: the loop runs
        assert daemon.get("/readyz") == (200, b"ok\n")  # readiness: the store answers
        status = json.loads(daemon.get("/status")[1])
        assert status["daemon"]["last_promotion"]["step"] == 50
        step50 = next(s for s in status["steps"] if s["step"] == 50)
        assert step50["tiers"] == ["local", "durable"] and step50["state"] == "committed"
        # per tier: steps, bytes (what is on disk) and free space; what is at risk now
        on_disk = sum(p.stat().st_size for p in (cfg.local_dir / "50").rglob("*") if p.is_file())
        assert status["tiers"]["local"]["steps"] == 1
        assert status["tiers"]["local"]["bytes"] == on_disk
        assert status["tiers"]["local"]["free_bytes"] > 0
        assert status["tiers"]["durable"]["steps"] == 1
        assert status["at_risk"]["preemption"] == {"steps": 0, "seconds": 0.0}
        assert status["at_risk"]["step_seconds"] is None  # one save: no step time yet
        # the daemon's log is JSON lines with the event's fields
        events = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
        promoted = next(e for e in events if e.get("event") == "promoted")
        assert promoted["step"] == 50 and promoted["tier"] == "durable"
        assert promoted["bytes"] > 0 and promoted["time"].endswith("+00:00")
        # the line users grep for: step, tier, duration, size (the size the event carries)
        line = re.match(
            r"Saved checkpoint at step 50 \(durable, ([\d.]+) s, (.+?)\) to ", promoted["message"]
        )
        assert line and line[2] == human_bytes(promoted["bytes"]), promoted["message"]
        metrics = daemon.get("/metrics")[1].decode()
        assert "tiered_promoted_steps_total 1.0" in metrics
        assert "tiered_backlog_steps 0.0" in metrics
        assert 'tiered_last_commit_timestamp_seconds{tier="durable"}' in metrics
        assert "tiered_upload_duration_seconds_count 1.0" in metrics
        check_metric_conventions(metrics)
        assert 'tiered_newest_step{tier="durable"} 50.0' in metrics
        assert 'tiered_tier_steps{tier="local"} 1.0' in metrics
        assert "tiered_ready 1.0" in metrics
        import urllib.request

        req = urllib.request.Request(f"http://{daemon.address}/status", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=5)
        assert info.value.code == 405
        # `tiered status` asks the running daemon
        out = subprocess.run(
            [sys.executable, "-m", "tiered.cli", "status", "--config", str(config_path)],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            cwd=ROOT,
        )
        assert out.returncode == 0 and "daemon   ok" in out.stdout and "committed" in out.stdout
        # Every thread, the upload workers included, runs below the trainer's priority.
        expected = max(cfg.tiered.daemon_nice, os.getpriority(os.PRIO_PROCESS, 0))
        assert cfg.tiered.daemon_nice == 10
        assert thread_nice_values(daemon.proc.pid) == {expected}
    finally:
        daemon.terminate()


def thread_nice_values(pid: int) -> set[int]:
    """The nice value of each of ``pid``'s threads (field 19 of /proc/PID/task/TID/stat)."""
    values = set()
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        after_name = stat.read_text().rsplit(")", 1)[1].split()
        values.add(int(after_name[16]))
    return values


def test_lower_cpu_priority_only_lowers() -> None:
    """Nice values are per thread on Linux: try it in a thread of its own."""
    import threading

    from daemon.main import lower_cpu_priority

    seen: dict[str, int] = {}
    before = os.getpriority(os.PRIO_PROCESS, 0)
    target = min(19, before + 5)

    def worker() -> None:
        seen["first"] = lower_cpu_priority(target)
        seen["again"] = lower_cpu_priority(before)  # never raises the priority back
        seen["off"] = lower_cpu_priority(0)
        seen["now"] = os.getpriority(os.PRIO_PROCESS, 0)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"first": target, "again": target, "off": target, "now": target}
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the caller's thread is untouched


def test_second_daemon_is_refused(tmp_path: Path) -> None:
    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    first = DaemonProc(config_path, cfg)
    try:
        first.wait_ready()
        second = run_module("daemon", "--config", str(config_path), timeout=60)
        assert second.returncode == 2
        assert f"another tiered daemon (pid {first.proc.pid}) already uses" in second.stderr
    finally:
        first.terminate()


def test_sigterm_drain_promotes_a_fresh_preemption_step(tmp_path: Path) -> None:
    config_path, cfg = write_config(
        tmp_path,
        f"file://{tmp_path}/durable",
        tiered={"rescan_seconds": 3600, "prune_interval_seconds": 3600},
    )
    daemon = DaemonProc(config_path, cfg)
    daemon.wait_ready()
    orbax_save(cfg.local_dir, 37, example_state(), reason="preemption")
    daemon.proc.terminate()  # at once: the drain must pick it up even if the loop has not
    assert daemon.proc.wait(60) == 0, daemon.log()
    assert durable_of(cfg).committed_steps() == [37]
    assert "Drained" in daemon.log()


def test_kill_9_mid_upload_then_restart_completes(durable_url: str, tmp_path: Path) -> None:
    config_path, cfg = write_config(tmp_path, durable_url)
    orbax_save(cfg.local_dir, 50, example_state())
    local_dir = cfg.local_dir / "50"
    manifest = build_manifest(local_dir, step=50)
    # Crash on purpose after the first file is uploaded, the way kill -9 would.
    crashed = DaemonProc(config_path, cfg, env={"TIERED_FAULT": "upload-file:2"})
    assert crashed.proc.wait(60) == 137, crashed.log()
    crashed.kill()
    durable = durable_of(cfg)
    assert durable.committed_steps() == []  # a partial upload is never a checkpoint
    assert [f.committed for f in durable.scan()] == [False]
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        wait_for(lambda: durable.committed_steps() == [50], what=daemon.log())
        assert durable.verify_step(50).files == manifest.files  # byte-for-byte the local step
        assert "files already there" in daemon.log()
    finally:
        daemon.terminate()


def test_a_store_down_from_the_start_degrades_the_daemon_and_it_catches_up(
    tmp_path: Path,
) -> None:
    """The store is away when the daemon starts: it serves its status and probes all along
    (alive, not ready), keeps every owed step local, `tiered status` answers in seconds with
    the local tier and one line about the store, and once the store is back it catches up."""
    import os
    import time

    from conftest import GcsEmulator, free_port

    emu = GcsEmulator(free_port())  # not started yet
    env = {"STORAGE_EMULATOR_HOST": emu.url}
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = emu.url
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # no 60 s gRPC probe here either
    bucket = "tiered-outage"
    config_path, cfg = write_config(
        tmp_path,
        f"gs://{bucket}/run",
        tiered={
            "local_max_to_keep": 1,
            "retry_attempts": 1,
            "retry_max_seconds": 2,
            "durable_timeout_seconds": 8,
            "storage_options": {"token": "anon"},
        },
    )
    trainer = Trainer(cfg.local_dir)
    for step in (50, 60, 70):
        trainer.save(step, example_state())
    trainer.close()
    daemon = DaemonProc(config_path, cfg, env=env)
    try:
        daemon.wait_ready()
        assert daemon.get("/healthz") == (200, b"alive\n")
        assert daemon.get("/readyz") == (503, b"waiting for the durable tier's first answer\n")
        wait_for(
            lambda: b"the durable tier does not answer" in daemon.get("/readyz")[1],
            timeout=120,
            what=daemon.log(),
        )
        assert daemon.get("/readyz")[0] == 503
        status = json.loads(daemon.get("/status")[1])
        assert status["durable_error"] and status["daemon"]["health"] == "unhealthy"
        assert status["daemon"]["last_error_resolved"] is False
        assert "tiered_ready 0.0" in daemon.get("/metrics")[1].decode()
        assert daemon.get("/metrics")[0] == 200
        local = LocalTier(cfg.local_dir)
        assert local.committed_steps() == [50, 70]  # 50 is owed: kept; 60 is not: pruned
        started = time.monotonic()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tiered.cli",
                "status",
                "--no-daemon",
                "--config",
                str(config_path),
            ],
            capture_output=True,
            text=True,
            env={**subprocess_env(), **env},
            cwd=ROOT,
            timeout=60,
        )
        # Non-zero for scripts: the durable tier was not read, and its counts are not shown.
        assert out.returncode == 1 and time.monotonic() - started < 15
        durable_line = next(x for x in out.stdout.splitlines() if x.startswith("durable "))
        assert (
            "unreachable: " in durable_line
            and "steps," not in durable_line
            and "Traceback" not in out.stderr
        )
        assert "50" in out.stdout and "due" in out.stdout
        assert daemon.log().count("Traceback") == 0
        assert daemon.get("/healthz")[0] == 200  # alive throughout: a restart would not help
        # A daemon that cannot reach the store cannot make a preemption step durable either:
        # the status says so, instead of "preemption nothing".
        risk = json.loads(daemon.get("/status")[1])["at_risk"]
        assert risk["preemption"] == risk["node"], risk
        assert risk["notes"]["preemption"].startswith("the daemon cannot promote it now: "), risk

        emu.start()
        make_bucket_named(bucket)
        durable = durable_of(cfg)
        wait_for(lambda: durable.committed_steps() == [50], timeout=120, what=daemon.log())
        wait_for(lambda: local.committed_steps() == [70], timeout=30, what="catch-up prune")
        wait_for(lambda: daemon.get("/readyz") == (200, b"ok\n"), timeout=30, what="ready")
        assert "answers again" in daemon.log()
        live = json.loads(daemon.get("/status")[1])["daemon"]
        assert live["last_error"] and live["last_error_resolved"] is True  # said, and over
        # The metrics follow the daemon's next listing of the durable tier, a cycle later.
        wanted = ("tiered_ready 1.0", 'tiered_newest_step{tier="durable"} 50.0')
        wait_for(
            lambda: all(w in daemon.get("/metrics")[1].decode() for w in wanted),
            timeout=30,
            what=f"metrics {wanted}",
        )
    finally:
        daemon.terminate()
        emu.stop()
        if old is not None:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        else:  # else the session's emulator fixture would take this stopped one for its own
            os.environ.pop("STORAGE_EMULATOR_HOST", None)


def make_bucket_named(name: str) -> bool:
    """The in-memory emulator forgets buckets when restarted; recreate ours."""
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon")
    fs.invalidate_cache()
    fs.mkdir(name)
    return True


def test_daemon_never_imports_jax_and_stays_small(tmp_path: Path) -> None:
    config_path, _cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    code = (
        "import sys\n"
        "from tiered import load_config\n"
        "from daemon.service import Daemon\n"
        f"d = Daemon(load_config({str(config_path)!r}))\n"
        "d.start(); d.cycle(force_rescan=True); d.close()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'orbax', 'flax'))\n"
        "print('IMPORTED', bad)\n"
        # VmRSS, not ru_maxrss: Linux carries ru_maxrss across exec from the (big) pytest parent
        "rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]\n"
        "print('RSS_MB', int(rss) / 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert "IMPORTED []" in out.stdout, out.stdout + out.stderr
    rss = float(out.stdout.split("RSS_MB")[1])
    assert rss < 150, rss


def test_the_at_risk_metric_and_tiered_status_say_the_same(tmp_path: Path) -> None:
    """The daemon's tiered_at_risk_steps came from its own call, without the rule `tiered
    status` applies: a trainer (no lock to ask) long past its next save has stopped, and a
    crash costs nothing more. The metric kept growing by the second."""
    from prometheus_client.parser import text_string_to_metric_families

    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    daemon = DaemonProc(config_path, cfg)
    try:
        daemon.wait_ready()
        orbax_save(cfg.local_dir, 10, example_state())
        orbax_save(cfg.local_dir, 20, example_state())
        time.sleep(3)  # the step time is the spacing of the two saves: far past 2 periods now

        def metric() -> dict[str, float]:
            text = daemon.get("/metrics")[1].decode()
            family = next(
                f for f in text_string_to_metric_families(text) if f.name == "tiered_at_risk_steps"
            )
            return {s.labels["event"]: s.value for s in family.samples}

        wait_for(lambda: metric().get("crash") == 0, timeout=30, what=str(metric()))
        status = json.loads(daemon.get("/status")[1])
        assert status["at_risk"]["crash"]["steps"] == 0 == metric()["crash"]
        assert metric()["node"] == status["at_risk"]["node"]["steps"]
    finally:
        assert daemon.terminate() == 0, daemon.log()

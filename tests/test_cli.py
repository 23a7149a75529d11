"""The `tiered` command: real steps, real tiers, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiered import DurableTier, LocalTier

from conftest import ROOT, make_bucket, s3_bucket, s3_storage_options, subprocess_env, write_config
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


def test_status_of_an_unreachable_durable_tier_names_the_cause_and_exits_non_zero(
    tmp_path: Path,
) -> None:
    from conftest import free_port

    config_path, _cfg = write_config(tmp_path, "gs://nobucket/run")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    done = subprocess.run(
        [
            *(sys.executable, "-m", "tiered.cli", "status", "--no-daemon"),
            *("--timeout", "3", "--config", str(config_path)),
        ],
        capture_output=True,
        text=True,
        env={**subprocess_env(), "STORAGE_EMULATOR_HOST": dead},
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    durable = next(line for line in done.stdout.splitlines() if line.startswith("durable "))
    assert "unreachable: Cannot connect to host 127.0.0.1" in durable
    # the knob it names is the one that set the wait (the config's is the daemon's)
    assert durable.endswith("(no answer within 3 s, tiered status --timeout)"), durable
    assert "0 steps, 0 B" not in durable  # a tier that was not read has no counts
    assert "losing this node unknown (the durable tier was not read)" in done.stdout


def test_an_unanswered_store_call_names_missing_credentials_in_one_line(
    capsys: object,
) -> None:
    import logging
    import time as _time

    import pytest

    from tiered import StorageError
    from tiered.reach import within

    def client_without_credentials() -> None:
        # What google-auth logs (three times) on a machine with no credentials.
        for attempt in (1, 2, 3):
            logging.getLogger("google.auth.compute_engine._metadata").warning(
                "Compute Engine Metadata server unavailable on attempt %d of 3", attempt
            )
        _time.sleep(1.0)

    with pytest.raises(StorageError) as info:
        within(0.3, client_without_credentials)
    assert str(info.value).startswith("unreachable: no credentials found")
    _time.sleep(1.5)  # the call ends and gives the loggers back as they were
    assert logging.getLogger("google.auth").propagate
    assert "Metadata server unavailable" not in capsys.readouterr().err  # type: ignore[attr-defined]


def test_status_with_no_daemon_does_not_promise_a_preemption_loses_nothing(
    tmp_path: Path,
) -> None:
    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    trainer = Trainer(cfg.local_dir)
    for step in (10, 20, 30):
        trainer.save(step, example_state())
    trainer.close()
    out = tiered("status", "--no-daemon", "--config", str(config_path))
    risk = next(line for line in out.stdout.splitlines() if line.startswith("at risk"))
    assert "preemption or Ctrl+C nothing" not in risk
    assert "no daemon running to promote the preemption step" in risk


@pytest.mark.parametrize("backend", ["gs", "s3"])
def test_status_of_a_missing_bucket_says_so_instead_of_zero_steps(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """A bucket that does not exist listed as an empty tier: "0 steps, 0 B", exit 0, while
    every upload would fail. A missing prefix in a bucket that exists is a new run: empty."""
    from tiered import status
    from tiered.errors import StorageError

    if backend == "gs":
        request.getfixturevalue("gcs_emulator")
        url, options, good = "gs://no-such-bucket-tiered/run", {"token": "anon"}, make_bucket()
    else:
        endpoint = request.getfixturevalue("moto_server")
        options = s3_storage_options(endpoint)
        url, good = "s3://no-such-bucket-tiered/run", s3_bucket(endpoint)
    config_path, _ = write_config(tmp_path, url, tiered={"storage_options": options})
    rc, out = run_status(config_path)
    durable = next(line for line in out.splitlines() if line.startswith("durable "))
    assert rc == 1 and "bucket 'no-such-bucket-tiered' does not exist" in durable, out
    assert "steps," not in durable  # no counts for a tier that was not read
    # the same bucket name made real, the prefix still absent: a fresh run, no error
    config_path, cfg = write_config(
        tmp_path, f"{backend}://{good}/fresh/run", tiered={"storage_options": options}
    )
    assert status(cfg).durable_error is None
    rc, out = run_status(config_path)
    assert rc == 0 and "0 steps, 0 B" in next(
        line for line in out.splitlines() if line.startswith("durable ")
    ), out
    # the daemon's listing says the same (it used to see an empty tier and wait for steps)
    from tiered.tiers import open_tiers

    _, missing = write_config(tmp_path, url, tiered={"storage_options": options})
    with pytest.raises(StorageError, match="does not exist"):
        open_tiers(missing)[1].scan()


def run_status(config_path: Path) -> tuple[int, str]:
    done = tiered("status", "--no-daemon", "--timeout", "20", "--config", str(config_path))
    return done.returncode, done.stdout + done.stderr


def test_restore_verify_and_export_follow_the_planner_and_either_tier(tmp_path: Path) -> None:
    """`tiered restore` takes the planner's choice, not max(durable steps); a step the planner
    would never restore is refused with the reason; `verify` and `export` work on a step only
    the local tier holds."""
    import orbax.checkpoint as ocp

    from helpers import assert_trees_equal

    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    c = str(config_path)
    trainer = Trainer(cfg.local_dir)
    state = example_state(3)
    for step in (50, 60):
        trainer.save(step, state)
    trainer.close()
    assert tiered("promote", "50", "--config", c).returncode == 0
    # 60 is newer and local only: a restore uses it, so nothing is downloaded
    out = tiered("restore", "--config", c)
    assert out.returncode == 0 and "step 60 is on the local tier already" in out.stdout, out
    # a durable step that never committed, and one that is not tiered's: refused, with why
    durable = DurableTier(cfg.durable_url)
    (Path(durable.root) / "70").mkdir(parents=True)
    (Path(durable.root) / "70" / "file").write_text("x")
    out = tiered("restore", "--step", "70", "--config", c)
    assert out.returncode == 2 and "never committed (an interrupted upload)" in out.stderr
    assert "(restorable: [60, 50])" in out.stderr
    out = tiered("restore", "--step", "40", "--config", c)
    assert out.returncode == 2 and "step 40 is not on" in out.stderr
    # verify: the local-only step, wherever it is by default, and the durable one
    out = tiered("verify", "60", "--config", c)
    assert out.returncode == 0 and "no manifest was kept for this step yet" in out.stdout, out
    out = tiered("verify", "60", "--config", c)
    assert out.returncode == 0 and "all match" in out.stdout and str(cfg.local_dir) in out.stdout
    out = tiered("verify", "60", "--tier", "durable", "--config", c)
    assert out.returncode == 2 and "it is on the local tier: --tier local" in out.stderr
    out = tiered("verify", "50", "--tier", "local", "--config", c)
    assert out.returncode == 0 and "all match" in out.stdout
    # export the local-only step: plain orbax restores it to the saved arrays
    dest = tmp_path / "exported"
    out = tiered("export", "60", str(dest), "--config", c)
    assert out.returncode == 0, out.stderr
    assert_trees_equal(ocp.StandardCheckpointer().restore(dest / "default", state), state)
    # a step of neither tier holds is a clear error
    out = tiered("restore", "--step", "70", "--config", c)
    assert "restorable" in out.stderr

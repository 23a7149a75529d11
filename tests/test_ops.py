"""Operating it: what is at risk now, the period advice, logs a pipeline can read."""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiered.logs import configure, fields
from tiered.risk import advise, at_risk, overhead, step_seconds, young_daly
from tiered.types import DurableStep, LocalStep

from conftest import write_config


def local_steps(*pairs: tuple[int, float]) -> list[LocalStep]:
    return [LocalStep(step=s, committed=True, commit_time=t, size=100) for s, t in pairs]


def test_what_each_interruption_would_cost_now() -> None:
    """Saves every 1000 steps, 200 s apart: 0.2 s per step. At t=1100 the newest local step
    (3000, t=1000) is 100 s old, so the trainer is near step 3500; the newest durable step is
    0, saved at t=600... (worked by hand below)."""
    local = local_steps((1000, 600.0), (2000, 800.0), (3000, 1000.0))
    durable = [DurableStep(step=1000, committed=True, identity="a", commit_time=610.0)]
    assert step_seconds(local) == pytest.approx(0.2)
    risk = at_risk(local, durable, now=1100.0, saves_on_signal=True)
    # the trainer is at about 3000 + 100 / 0.2 = 3500
    assert (risk["crash"].steps, risk["crash"].seconds) == (500, pytest.approx(100.0))
    assert (risk["preemption"].steps, risk["preemption"].seconds) == (0, 0.0)
    # the node's disk holds everything after durable step 1000: 3500 - 1000 = 2500 steps
    assert (risk["node"].steps, risk["node"].seconds) == (2500, pytest.approx(500.0))
    # MaxText's multi-tier path writes nothing on SIGTERM: a preemption costs a crash's worth
    mtc = at_risk(local, durable, now=1100.0, saves_on_signal=False)
    assert mtc["preemption"] == mtc["crash"]
    # with one save there is no step time yet: the steps are unknown, the age is not
    alone = at_risk(local[:1], [], now=700.0, saves_on_signal=True)
    assert alone["crash"].steps is None and alone["crash"].seconds == pytest.approx(100.0)
    # with step 3000 copied to this node's peers, losing the node costs what a crash does
    peered = at_risk(local, durable, now=1100.0, saves_on_signal=True, replicated=3000)
    assert peered["node"] == peered["crash"]
    # a copy older than the durable step changes nothing
    old = at_risk(local, durable, now=1100.0, saves_on_signal=True, replicated=500)
    assert old["node"] == risk["node"]


def test_young_daly_worked_example() -> None:
    """A save blocks 0.5 s, interruptions come every 6 h (21,600 s), a step takes 0.2 s.
    T = sqrt(2 * 0.5 * 21600) = sqrt(21600) = 146.97 s = 734.8 steps, so 735 steps (147.0 s).
    Lost: 0.5 / 147 + 147 / (2 * 21600) = 0.003401 + 0.003403 = 0.680 % of the run.
    At the current 1000 steps (200 s): 0.5 / 200 + 200 / 43200 = 0.0025 + 0.00463 = 0.713 %."""
    assert young_daly(0.5, 21600) == pytest.approx(146.969, abs=1e-3)
    advice = advise(cost_seconds=0.5, mtbf_seconds=21600, step_seconds=0.2, current_steps=1000)
    assert advice.period_steps == 735
    assert advice.overhead == pytest.approx(0.5 / 147 + 147 / 43200)
    assert advice.overhead == pytest.approx(0.006804, abs=1e-6)
    assert advice.current_overhead == pytest.approx(0.0025 + 200 / 43200)
    assert advice.loss_per_interruption_seconds == pytest.approx(73.5)
    # the optimum is a minimum: a period either side loses more
    for other in (600, 900):
        assert overhead(other * 0.2, 0.5, 21600) > advice.overhead
    # the durable period is a multiple of the local one: 4 s uploads, a node lost every 7 days
    durable = advise(
        cost_seconds=4,
        mtbf_seconds=7 * 86400,
        step_seconds=0.2,
        current_steps=5000,
        multiple_of=735,
    )
    # sqrt(2 * 4 * 604800) = 2199.6 s = 10998 steps = 14.96 local periods, so 15 x 735
    assert math.isclose(young_daly(4, 604800), 2199.6, rel_tol=1e-4)
    assert durable.period_steps == 15 * 735


def test_tiered_advise_uses_this_runs_measurements(tmp_path: Path) -> None:
    import jax.numpy as jnp

    from tiered import CheckpointManager

    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        for step in (10, 20, 30):
            mgr.save(step, {"w": jnp.arange(1000.0) + step})
            mgr.wait_until_finished()
            time.sleep(0.3)
    stats = json.loads((cfg.local_dir / ".tiered" / "trainer-stats.json").read_text())
    assert len(stats["save_blocking_seconds"]) == 3
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tiered.cli",
            "advise",
            "--config",
            str(config_path),
            "--mtbf",
            "6h",
            "--upload-seconds",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "median of 3" in out.stdout and "every 6.0h" in out.stdout
    from tiered import status

    per_step = status(cfg).at_risk["step_seconds"]
    assert f"{per_step:.3f} s per step" in out.stdout
    cost = sorted(stats["save_blocking_seconds"])[1]
    expected = advise(
        cost_seconds=cost, mtbf_seconds=21600, step_seconds=per_step, current_steps=10
    )
    assert re.search(rf"advised\s+{expected.period_steps} steps", out.stdout), out.stdout
    assert "local_checkpoint_period" in out.stdout and "checkpoint_period" in out.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "tiered.cli", "advise", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "--mtbf 6h" in missing.stderr


def test_json_log_lines_carry_time_zone_and_fields(capsys: pytest.CaptureFixture) -> None:
    configure("json")
    logging.getLogger("tiered.tiers").info(
        "Promoted step %d",
        50,
        extra=fields("promoted", step=50, tier="durable", bytes=7, seconds=1.5),
    )
    logging.getLogger("botocore.credentials").debug("access key AKIA...")  # quiet
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["time"])
    assert line | {"time": None} == {
        "time": None,
        "level": "INFO",
        "logger": "tiered.tiers",
        "message": "Promoted step 50",
        "event": "promoted",
        "step": 50,
        "tier": "durable",
        "bytes": 7,
        "seconds": 1.5,
    }


def test_libraries_stay_quiet_at_debug_unless_named(capsys: pytest.CaptureFixture) -> None:
    configure("text", verbose=True)
    logging.getLogger("botocore.credentials").debug("access key AKIA-SECRET")
    logging.getLogger("tiered.x").debug("ours")
    err = capsys.readouterr().err
    assert "ours" in err and "AKIA" not in err
    configure("text", verbose=True, debug_loggers=["botocore"])
    logging.getLogger("botocore.credentials").debug("now asked for")
    assert "now asked for" in capsys.readouterr().err
    configure("text")  # leave the root logger as the other tests expect it


def test_version_and_verbose_on_every_command(tmp_path: Path) -> None:
    config_path, _ = write_config(tmp_path, f"file://{tmp_path}/durable")
    version = subprocess.run(
        [sys.executable, "-m", "tiered.cli", "--version"], capture_output=True, text=True
    )
    import tiered

    assert version.stdout.strip() == f"tiered {tiered.__version__}"
    for where in (["-v", "status"], ["status", "-v"]):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tiered.cli",
                *where,
                "--config",
                str(config_path),
                "--no-daemon",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr


def test_a_finished_run_has_nothing_left_to_lose_locally() -> None:
    local = local_steps((1000, 600.0), (2000, 800.0))
    final = [*local, LocalStep(step=2500, committed=True, commit_time=900.0, reason="final")]
    done = at_risk(final, [], now=5000.0, saves_on_signal=True)
    assert done["crash"] == done["preemption"]
    assert done["crash"].steps == 0
    assert done["node"].steps == 2500  # still only on this node's disk: nothing is durable
    gone = at_risk(local, [], now=5000.0, saves_on_signal=True, trainer_running=False)
    assert gone["crash"].steps == 0  # the trainer's lock is free: it is not training


@pytest.mark.parametrize(
    ("autocheckpoint", "line"),
    [
        pytest.param(
            True,
            "crash 500 steps (~100s); preemption nothing; Ctrl+C under tiered run nothing, "
            "else 500 steps (~100s);",
            id="enable_autocheckpoint",
        ),
        pytest.param(
            False,
            "crash 500 steps (~100s); preemption or Ctrl+C 500 steps (~100s) (MaxText without "
            "enable_autocheckpoint saves nothing on SIGTERM);",
            id="MaxText's default",
        ),
    ],
)
def test_status_tells_maxtexts_truth_at_risk(tmp_path: Path, autocheckpoint: bool, line: str):
    """MaxText saves on SIGTERM only with enable_autocheckpoint, and a Ctrl+C reaches it as
    SIGTERM only under `tiered run` (otherwise it is a KeyboardInterrupt: a crash)."""
    from tiered.policy import Snapshot
    from tiered.report import build_status, render_table

    _, cfg = write_config(
        tmp_path,
        f"file://{tmp_path}/durable",
        enable_multi_tier_checkpointing=True,
        enable_autocheckpoint=autocheckpoint,
        local_checkpoint_period=1000,
        checkpoint_period=5000,
    )
    local = tuple(local_steps((1000, 600.0), (2000, 800.0), (3000, 1000.0)))
    daemon = {"running": True, "health": "ok"}  # a daemon there to promote the stop save
    status = build_status(cfg, snapshot=Snapshot(now=1100.0, local=local), live=daemon)
    risk = next(x for x in render_table(status).splitlines() if x.startswith("at risk"))
    assert line in risk


def _advise(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tiered.cli", "advise", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_tiered_advise_before_a_run_exists_takes_the_figures_given() -> None:
    out = _advise(
        "--step-seconds", "0.2", "--save-seconds", "0.5", "--upload-seconds", "4",
        "--mtbf", "6h", "--node-mtbf", "7d", "--local-period", "1000",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    # the worked example above: 735 steps; the durable period 15 x 735 (no config needed)
    assert re.search(r"advised\s+735 steps", out.stdout), out.stdout
    assert re.search(rf"advised\s+{15 * 735} steps", out.stdout), out.stdout
    assert "0.200 s per step (given)" in out.stdout
    nothing = _advise("--step-seconds", "0.2", "--mtbf", "6h")
    assert nothing.returncode == 2 and "--save-seconds" in nothing.stderr
    no_step = _advise("--save-seconds", "1", "--mtbf", "6h")
    assert no_step.returncode == 2 and "--step-seconds" in no_step.stderr
    bad = _advise("--step-seconds", "-1", "--save-seconds", "1", "--mtbf", "6h")
    assert bad.returncode == 2 and "--step-seconds must be a positive" in bad.stderr


def test_tiered_advise_never_prints_more_than_the_whole_run_lost() -> None:
    # Plausible input that printed "198.42% of the run lost": 30 s saves, 10 min uploads,
    # an interruption an hour, 2 s steps, the default periods (1000 and 5000 steps).
    out = _advise(
        "--step-seconds", "2", "--save-seconds", "30", "--upload-seconds", "600", "--mtbf", "1h"
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    shares = [float(x) for x in re.findall(r"([\d.]+)% of the run lost", out.stdout)]
    assert len(shares) == 4 and all(0 < s < 100 for s in shares), out.stdout
    # 5000 steps of 2 s is 10,000 s, longer than the hour between interruptions: said
    assert "longer than the time between interruptions" in out.stdout
    # the share is the first-order waste over wall time: x / (1 + x)
    from tiered.advice import share_lost

    waste = overhead(5000 * 2.0, 600.0, 3600.0)
    assert waste > 1 and f"{share_lost(waste) * 100:.2f}% of the run lost" in out.stdout


def test_a_transfer_off_a_terminal_logs_its_progress_every_few_seconds() -> None:
    """The daemon, a trainer's fresh-node restore and a piped `tiered restore` show no bar:
    one line every five seconds (bytes, rate, time left), and one when done."""
    from tiered.progress import LogProgress

    now = [100.0]
    lines: list[str] = []

    class Log:
        def info(self, fmt: str, *args: object) -> None:
            lines.append(fmt % args)

    shown = LogProgress("restoring step 5000", logger=Log(), clock=lambda: now[0])  # type: ignore[arg-type]
    for t, done in ((1, 100e6), (4.9, 490e6), (5.0, 500e6), (7, 700e6), (10.0, 1000e6)):
        now[0] = 100.0 + t
        shown(int(done), int(4e9))
    assert lines == [
        "restoring step 5000: 500.0 MB of 4.0 GB, 100 MB/s, 35s left",
        "restoring step 5000: 1.0 GB of 4.0 GB, 100 MB/s, 30s left",
    ]
    now[0] = 140.0
    shown(int(4e9), int(4e9))
    assert lines[-1] == "restoring step 5000: 4.0 GB of 4.0 GB, 100 MB/s"
    shown(int(4e9), int(4e9))  # once done, said once
    assert len(lines) == 3


def test_tiered_restore_in_a_pipe_logs_its_progress(tmp_path: Path) -> None:
    config_path, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    import jax.numpy as jnp

    from tiered import CheckpointManager

    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        mgr.save(50, {"w": jnp.arange(1000.0)})
        mgr.wait_until_finished()
    c = str(config_path)
    run = [sys.executable, "-m", "tiered.cli"]
    done = subprocess.run([*run, "promote", "50", "--config", c], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "promoting step 50: " in done.stderr and " of " in done.stderr, done.stderr
    import shutil

    shutil.rmtree(cfg.local_dir / "50")
    done = subprocess.run([*run, "restore", "--config", c], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stderr.splitlines() if x.startswith("restoring step 50: "))
    assert re.fullmatch(
        r"restoring step 50: [\d.]+ [KM]?B of [\d.]+ [KM]?B, [\d.]+ [KMG]?B/s", line
    )


def test_tiered_advise_prints_the_goodput_of_both_settings() -> None:
    """The forecast the goodput bench checks its measurements against, for the periods now and
    advised, so a user sees what the advice is worth in the share of accelerator time."""
    from tiered.advice import goodput_of

    out = _advise(
        "--step-seconds", "0.2", "--save-seconds", "0.5", "--upload-seconds", "4",
        "--mtbf", "6h", "--node-mtbf", "7d", "--restart-seconds", "60",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    figures = dict(per_step=0.2, save=0.5, upload=4.0, mtbf=21600.0, node_mtbf=604800.0)
    now = goodput_of((1000, 5000), restart=60.0, **figures)
    advised = goodput_of((735, 15 * 735), restart=60.0, **figures)
    assert f"now      {now * 100:.2f}%; advised {advised * 100:.2f}%" in out.stdout, out.stdout
    assert 0 < advised < 1 and 0 < now < 1

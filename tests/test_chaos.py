"""The chaos soak (``make test-faults``): the daemon and the trainer killed with -9 at random
moments, several seeds, a few dozen kills in all; then the invariants:

- every committed durable step verifies against its manifest, and holds exactly what the
  trainer saved at that step;
- every step the trainer committed that is owed to the durable tier (a multiple of the durable
  period) is durable, still local, or superseded under retention by a newer durable step;
- the newest checkpoint restores bit-exact.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tiered import CheckpointManager, DurableTier, LocalTier

from conftest import ROOT, DaemonProc, subprocess_env, wait_for, write_config
from helpers import orbax_restore

sys.path.insert(0, str(Path(__file__).parent))
from chaos_trainer import state_at

KILLS_PER_SEED = 12


class TrainerProc:
    def __init__(self, config: Path, log: Path) -> None:
        self.log_path = log
        self._starts = self._count_starts()
        self._log = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "chaos_trainer.py"),
                str(config),
                "100000",
                "0.01",
            ],
            cwd=ROOT,
            env=subprocess_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _count_starts(self) -> int:
        if not self.log_path.exists():
            return 0
        return len(re.findall(r"^(RESTORED|FRESH)", self.log_path.read_text(), re.MULTILINE))

    def wait_running(self) -> None:
        """Until this run has restored: its SIGTERM handler is in place from then on."""
        wait_for(lambda: self._count_starts() > self._starts, timeout=60, what="the trainer")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._log.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        rc = self.proc.wait(120)
        self._log.close()
        return rc


def committed_by_trainer(log: Path) -> set[int]:
    return {int(m) for m in re.findall(r"COMMITTED step=(\d+)", log.read_text(errors="replace"))}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("backend", ["file", "gs"])
def test_random_kills_lose_nothing(
    seed: int, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    rng = random.Random(seed)
    url = request.getfixturevalue("gs_url") if backend == "gs" else f"file://{tmp_path}/durable"
    config_path, cfg = write_config(
        tmp_path,
        url,
        max_num_checkpoints_to_keep=3,
        async_checkpointing=False,
        tiered={"local_max_to_keep": 2, "keep_period": 200, "shutdown_grace_seconds": 60},
    )
    trainer_log = tmp_path / "trainer.log"
    daemon = DaemonProc(config_path, cfg)
    daemon.wait_ready()
    trainer = TrainerProc(config_path, trainer_log)
    logs = []
    try:
        for _ in range(KILLS_PER_SEED):
            time.sleep(rng.uniform(0.3, 2.5))
            if rng.random() < 0.5:
                trainer.kill()
                trainer = TrainerProc(config_path, trainer_log)
            else:
                daemon.kill()
                logs.append(daemon.log())
                daemon = DaemonProc(config_path, cfg)
                daemon.wait_ready()
        trainer.wait_running()
        time.sleep(0.5)
        assert trainer.stop() == 0, trainer_log.read_text()[-3000:]
    finally:
        trainer.kill()
        assert daemon.terminate(timeout=120) in (0, 1)
        logs.append(daemon.log())
    text = trainer_log.read_text()
    assert "ok=False" not in text, text[-3000:]

    durable = DurableTier(cfg.durable_url, storage_options=cfg.tiered.storage_options)
    committed = durable.committed_steps()
    assert committed, "the soak should have made steps durable"
    for step in committed:
        durable.verify_step(step)
    local = LocalTier(cfg.local_dir).committed_steps()
    saved = committed_by_trainer(trainer_log)
    owed = sorted(s for s in saved if s > 0 and s % cfg.durable_period == 0)
    assert owed, "the soak should have reached a durable step"
    for step in owed:
        superseded = sum(c > step for c in committed) >= 3 and step % 200 != 0
        assert step in committed or step in local or superseded, (
            f"owed step {step} was lost: durable {committed}, local {local}\n" + logs[-1][-3000:]
        )
    check = tmp_path / "check"
    for step in committed:  # each durable step holds exactly what the trainer saved then
        durable.download_step(step, check / str(step))
        restored = orbax_restore(str(check), step, state_at(0))
        assert np.array_equal(restored["w"], state_at(step)["w"]), step
    with CheckpointManager(cfg, install_signal_handlers=False) as mgr:
        newest = mgr.restore(state_at(0))
    assert newest is not None and newest.step == max(saved | set(committed))
    assert np.array_equal(newest.state["w"], state_at(newest.step)["w"])

"""`make test-maxtext`: the real MaxText trainer, unmodified, against the real daemon.

    .venv/bin/python tests/maxtext_e2e.py --maxtext-python .venv-maxtext/bin/python

MaxText (``maxtext[tpu]==0.2.5``, Python 3.12, on the CPU) trains a tiny model on synthetic data
with ``enable_multi_tier_checkpointing: true``, from ``configs/maxtext_mtc.yml`` as shipped plus
MaxText's own ``key=value`` overrides; its environment for ``jax.distributed`` comes from
``tiered jax-env``. The daemon reads the same MaxText file and overrides, and its own settings
from a second file. Each check prints one line; the script exits non-zero at the first failure.

1. configs/maxtext_mtc.yml holds only keys MaxText knows;
2. a fresh start: the durable steps are the backup-interval multiples, plus the run's last
   step (off period, reason-less) once the run is over;
3. kill -9 mid-run, then resume: MaxText restores the newest local step the daemon offers;
   kill -9 loses at most one local period;
4. SIGTERM mid local period (``enable_autocheckpoint: true``): MaxText saves the step it reached,
   the daemon promotes it at once as a preemption step, and the next run resumes right after it;
   then Ctrl+C (SIGINT to the process group) on ``tiered run -- python -m maxtext...`` with no
   daemon started by hand: the step reached is durable when ``tiered run`` returns, and the same
   command resumes right after it;
5. a fresh node (the local tier wiped): MaxText restores the newest durable step, downloaded
   and verified by the daemon;
6. `tiered export STEP DIR --item state`, then a new MaxText run with load_full_state_path=DIR
   continues from that step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIERED = [sys.executable, "-m", "tiered.cli"]
LOCAL_PERIOD, BACKUP = 5, 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check(ok: bool, what: str, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        if detail:
            print(detail[-6000:], flush=True)
        sys.exit(1)


class Durable:
    """The durable tier's committed steps and manifests: a directory, or a bucket on the GCS
    emulator (``--durable gs``), read as a user would check them."""

    def __init__(self, out: str) -> None:
        self.url = f"{out}/tiny/checkpoints"
        self.gs = out.startswith("gs://")

    def _fs(self):  # type: ignore[no-untyped-def]
        import fsspec

        return fsspec.filesystem("gs", token="anon") if self.gs else fsspec.filesystem("file")

    def _root(self) -> str:
        return self.url.removeprefix("gs://")

    def steps(self) -> list[int]:
        fs = self._fs()
        fs.invalidate_cache()
        try:
            names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(self._root())]
        except FileNotFoundError:
            return []
        return sorted(
            int(n)
            for n in names
            if n.isdigit() and fs.exists(f"{self._root()}/{n}/commit_success.txt")
        )

    def manifest(self, step: int) -> dict:
        return json.loads(self._fs().cat_file(f"{self._root()}/{step}/tiered-manifest.json"))


def start_emulator(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The GCS emulator (tests/gcs_emulator.py) on a free port, and a bucket on it; the daemon,
    ``tiered`` and the MaxText trainer all reach it through the environment set here."""
    import urllib.request

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "gcs_emulator.py"), "start", "--host=127.0.0.1",
         f"--port={port}", "--in-memory"],
        stdout=open(work / "emulator.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError as err:
            if getattr(err, "code", None):
                break  # it answers (an HTTP error is an answer)
            time.sleep(0.1)
    os.environ.update(
        STORAGE_EMULATOR_HOST=url,
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
        TENSORSTORE_GCS_HTTP_URL=url,
    )
    import gcsfs

    gcsfs.GCSFileSystem(token="anon").mkdir("tiered-maxtext")
    return proc, "gs://tiered-maxtext/out"


class Run:
    def __init__(self, work: Path, maxtext_python: str, out: str | None = None) -> None:
        self.work = work
        self.python = maxtext_python
        self.local = work / "local"
        self.out = out or str(work / "out")
        self.status = f"127.0.0.1:{free_port()}"
        self.coordinator = f"127.0.0.1:{free_port()}"
        self.tiered_yml = work / "tiered.yml"
        self.tiered_yml.write_text(
            "tiered:\n"
            "  local_max_to_keep: 3\n"
            f"  status_address: {self.status}\n"
            "  write_jax_init_info: true\n"
            f"  coordinator_address: {self.coordinator}\n"
            "  rescan_seconds: 2\n"
            "  shutdown_grace_seconds: 60\n"
            + ("  storage_options: {token: anon}\n" if self.out.startswith("gs://") else "")
        )
        self.overrides = [
            "run_name=tiny",
            f"base_output_directory={self.out}",
            f"local_checkpoint_directory={self.local}",
            f"local_checkpoint_period={LOCAL_PERIOD}",
            f"multi_tier_checkpointing_backup_interval_steps={BACKUP}",
        ]
        self.config_args = [
            "--maxtext-config",
            str(ROOT / "configs" / "maxtext_mtc.yml"),
            "--config",
            str(self.tiered_yml),
            *self.overrides,
        ]
        self.durable = Durable(self.out)
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_log = work / "daemon.log"
        self.runs = 0

    # -- the daemon ---

    def start_daemon(self, *extra: str) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        log = open(self.daemon_log, "ab")  # noqa: SIM115
        self.daemon = subprocess.Popen(
            [*TIERED, "daemon", *self.config_args, *extra],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for _ in range(300):
            if self.status_json() is not None:
                return
            time.sleep(0.1)
        check(False, "the daemon answers", self.daemon_log.read_text())

    def stop_daemon(self) -> int:
        assert self.daemon is not None
        self.daemon.terminate()
        rc = self.daemon.wait(120)
        self.daemon = None
        return rc

    def status_json(self) -> dict | None:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.status}/status", timeout=2) as resp:
                return json.loads(resp.read())
        except OSError:
            return None

    def durable_steps(self) -> list[int]:
        return self.durable.steps()

    def local_steps(self) -> list[int]:
        return sorted(
            int(p.name)
            for p in self.local.iterdir()
            if p.name.isdigit() and (p / "commit_success.txt").exists()
        )

    def wait(self, predicate, what: str, timeout: float = 90) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        check(False, what, self.daemon_log.read_text())

    # -- MaxText ---

    def jax_env(self) -> dict[str, str]:
        out = subprocess.run(
            [*TIERED, "jax-env", "--format", "env", *self.config_args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def maxtext(self, steps: int, *extra: str, overrides: list[str] | None = None) -> list[str]:
        return [
            self.python,
            "-m",
            "maxtext.trainers.pre_train.train",
            str(ROOT / "configs" / "maxtext_mtc.yml"),
            *(self.overrides if overrides is None else overrides),
            "model_name=gpt3-52k",
            "dataset_type=synthetic",
            "per_device_batch_size=1",
            "max_target_length=64",
            "enable_goodput_recording=false",
            "enable_tensorboard=false",  # MaxText's own event files: not what is tested here
            f"steps={steps}",
            *extra,
        ]

    def start_trainer(self, steps: int, *extra: str, **kw) -> tuple[subprocess.Popen[str], Path]:  # type: ignore[no-untyped-def]
        self.runs += 1
        log = self.work / f"maxtext-{self.runs}.log"
        env = {**os.environ, "JAX_PLATFORMS": "cpu", **self.jax_env()}
        proc = subprocess.Popen(
            self.maxtext(steps, *extra, **kw),
            cwd=self.work,
            env=env,
            stdout=open(log, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            text=True,
        )
        return proc, log

    def start_launcher(self, steps: int) -> tuple[subprocess.Popen[str], Path]:
        """``tiered run --config tiered.yml -- python -m maxtext... config.yml k=v``, in a
        session of its own (the terminal's foreground group: the launcher alone)."""
        self.runs += 1
        log = self.work / f"tiered-run-{self.runs}.log"
        env = {**os.environ, "JAX_PLATFORMS": "cpu", **self.jax_env()}
        proc = subprocess.Popen(
            [
                *[*TIERED, "run", "--config", str(self.tiered_yml), "--grace", "30", "--"],
                *self.maxtext(steps),
            ],
            cwd=self.work,
            env={**env, "PYTHONPATH": str(ROOT)},
            stdout=open(log, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        return proc, log

    def train(self, steps: int, *extra: str, **kw) -> Path:  # type: ignore[no-untyped-def]
        proc, log = self.start_trainer(steps, *extra, **kw)
        rc = proc.wait(900)
        check(rc == 0, f"MaxText trains to step {steps - 1}", log.read_text())
        return log


def completed_step(log: Path, default: int | None = None) -> int:
    found = re.findall(r"completed step: (\d+),", log.read_text())
    if not found and default is not None:
        return default
    return int(found[-1])


def preemption_step(log: Path) -> int | None:
    """The step MaxText stopped at on SIGTERM: its preemption sync point (the metrics line of
    that step is never logged: they are logged one step late)."""
    found = re.findall(r"Reached preemption sync point, step=(\d+)", log.read_text())
    return int(found[-1]) if found else None


def wait_mid_period(log: Path) -> None:
    """Until the trainer is between two local saves (a stop there is not a periodic step)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and completed_step(log, 0) % LOCAL_PERIOD not in (2, 3):
        time.sleep(0.02)


def wait_or_kill(proc: subprocess.Popen, timeout: float) -> int | None:
    """The exit status; None (after SIGKILL to its group) when it went on past ``timeout``."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a group leader (tiered run): all of it
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait()
        return None


def restored_step(log: Path) -> int | None:
    found = re.findall(r"Found a restore directory at step (\d+)", log.read_text())
    return int(found[-1]) if found else None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--maxtext-python", required=True)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--durable",
        choices=("file", "gs"),
        default="file",
        help="the durable tier: a directory, or a bucket on the GCS emulator",
    )
    args = parser.parse_args()
    args.maxtext_python = os.path.abspath(args.maxtext_python)  # the trainer runs elsewhere
    work = Path(tempfile.mkdtemp(prefix="tiered-maxtext-"))
    emulator, out = start_emulator(work) if args.durable == "gs" else (None, None)
    run = Run(work, args.maxtext_python, out)
    print(f"durable tier: {run.durable.url}", flush=True)
    print(f"work directory: {work}", flush=True)
    try:
        # 1. the shipped MaxText file holds only MaxText's keys
        keys = subprocess.run(
            [
                args.maxtext_python,
                "-c",
                "import yaml, maxtext, pathlib; p = pathlib.Path(maxtext.__file__).parent; "
                "print(' '.join(yaml.safe_load(open(p / 'configs' / 'base.yml'))))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        import yaml

        ours = set(yaml.safe_load((ROOT / "configs" / "maxtext_mtc.yml").read_text()))
        ours.discard("base_config")  # MaxText's own include key, not a setting
        check(ours <= set(keys), f"configs/maxtext_mtc.yml holds only MaxText keys ({len(ours)})")

        # 2. fresh start: multiples of the backup interval, then the last step once it is over
        # the daemon reads MaxText's `steps` as the trainer does: its last step is final
        run.start_daemon("steps=23")
        log = run.train(23)
        check(
            "told the client to start fresh" in run.daemon_log.read_text()
            and restored_step(log) is None,
            "MaxText started fresh",
        )
        run.wait(lambda: run.durable_steps() == [10, 20, 22], "durable holds 10, 20 and 22")
        manifest = run.durable.manifest(22)
        check(manifest["reason"] == "final", "the last step (22) went up as final")
        status = run.status_json() or {}
        reasons = {s["step"]: s["reason"] for s in status.get("steps", [])}
        check(reasons.get(20) == "periodic", f"status shows real reasons: {reasons}")

        # 3. kill -9 mid-run, then resume from the newest local step: at most one local period
        proc, log = run.start_trainer(100_000)
        run.wait(lambda: max(run.local_steps(), default=0) >= 60, "the run passes step 60", 300)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        reached = completed_step(log)
        newest = max(run.local_steps())
        # the save after `newest` may have been in flight (async): it is lost with the process
        in_flight = any(run.local.glob(f"{newest + LOCAL_PERIOD}.orbax-checkpoint-tmp*"))
        check(
            reached - newest <= LOCAL_PERIOD or (in_flight and reached - newest < 2 * LOCAL_PERIOD),
            f"kill -9 after step {reached} lost {reached - newest} steps (local period "
            f"{LOCAL_PERIOD}; newest local step {newest}; the next save in flight: {in_flight})",
        )
        log = run.train(newest + 8)
        check(restored_step(log) == newest, f"after kill -9, MaxText resumed from {newest}")

        # 4. SIGTERM mid-period: enable_autocheckpoint saves the step reached; the daemon
        # promotes it at once as a preemption step; the next run resumes right after it.
        # JAX's sync point is the step after the last one reported, and orbax's save-finalize
        # thread reports its (older) step too: a SIGTERM caught while that report is the
        # newest sets a sync point the loop has passed, and MaxText trains on. Up to three
        # tries; each ignored SIGTERM must be that race, and is counted.
        ignored = 0
        for _ in range(3):
            proc, log = run.start_trainer(100_000)
            floor = max(run.local_steps(), default=0) + 20
            run.wait(lambda log=log, f=floor: completed_step(log, 0) >= f, "the run goes on", 300)
            wait_mid_period(log)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = wait_or_kill(proc, 60)
            text = log.read_text()
            if rc is None:
                ignored += 1
                sync = re.findall(r"Preemption sync counter is set: (\d+)", text)
                check(
                    bool(sync) and "SIGTERM caught" in text,
                    f"MaxText ignored a SIGTERM it caught (sync point {sync[-1:]})",
                    text[-6000:],
                )
                print(
                    f"note SIGTERM ignored: sync point {sync[-1]} was behind the loop", flush=True
                )
                continue
            took = time.monotonic() - sent
            check(rc == 0, f"MaxText exits 0 on SIGTERM ({took:.1f} s)", text)
            check("Job received termination signal" in text, "MaxText stopped on SIGTERM", text)
            stopped = preemption_step(log)
            last = max(run.local_steps())
            check(
                last == stopped and stopped > completed_step(log),
                f"SIGTERM at step {stopped} saved it (newest local {last}; the last step "
                f"logged {completed_step(log)})",
            )
            started = time.monotonic()
            run.wait(lambda last=last: last in run.durable_steps(), f"step {last} is durable")
            durable_after = time.monotonic() - started
            manifest = run.durable.manifest(last)
            if last % LOCAL_PERIOD:
                check(
                    manifest["reason"] == "preemption",
                    f"step {last} went up as preemption ({durable_after:.1f} s after exit)",
                )
            else:  # the sync point fell on a periodic save: nothing tells them apart
                print(f"note step {last} is on the local period: {manifest['reason']}", flush=True)
            break
        else:
            check(False, f"MaxText saved on none of 3 SIGTERMs ({ignored} ignored)")
        print(f"note SIGTERMs ignored before one saved: {ignored}", flush=True)
        log = run.train(last + 3)
        check(restored_step(log) == last, f"after SIGTERM, MaxText resumed from {last}")
        check(run.stop_daemon() == 0, "the daemon drains and exits 0")

        # 4b. Ctrl+C on `tiered run -- python -m maxtext...` with no daemon: durable on return;
        # a trainer that ignores the SIGTERM is stopped after the grace, and its newest local
        # step is durable on return all the same: at most one local period lost
        for attempt in ("fresh", "again"):
            proc, log = run.start_launcher(100_000)
            run.wait(
                lambda log=log, last=last: completed_step(log, 0) >= last + 20,
                "tiered run trains",
                300,
            )
            wait_mid_period(log)
            sent = time.monotonic()
            os.killpg(proc.pid, signal.SIGINT)  # as the terminal sends Ctrl+C
            rc = wait_or_kill(proc, 300)
            text = log.read_text()
            took = time.monotonic() - sent
            check(rc == 130, f"tiered run exits 130 after Ctrl+C ({took:.1f} s)", text)
            if attempt == "again":
                check(restored_step(log) == last, f"the same command resumed from {last}", text)
            stopped = preemption_step(log) or completed_step(log) + 1
            durable = run.durable_steps()
            newest = max(durable)
            if "did not stop within" in text:
                print(
                    f"note Ctrl+C ({attempt}): the SIGTERM was ignored; grace ran out", flush=True
                )
                # as after kill -9: the save after `newest` may have been in flight (async)
                in_flight = f"asynchronous checkpoint save for step {newest + LOCAL_PERIOD}" in text
                lost = stopped - newest
                check(
                    (lost <= LOCAL_PERIOD or (in_flight and lost < 2 * LOCAL_PERIOD))
                    and f"step {newest} is durable" in text,
                    f"Ctrl+C ({attempt}), trainer killed after the grace at step {stopped}: "
                    f"step {newest} durable on return ({lost} steps lost; the next save in "
                    f"flight: {in_flight})",
                    text,
                )
            else:
                check(
                    newest == stopped and f"step {stopped} is durable" in text,
                    f"Ctrl+C ({attempt}) after step {stopped}: durable when tiered run returned "
                    f"({took:.1f} s)",
                    text,
                )
            last = newest
        run.daemon = None

        # 5. a fresh node: the newest durable step, downloaded and verified
        shutil.rmtree(run.local)
        run.start_daemon()
        newest_durable = max(run.durable_steps())
        log = run.train(newest_durable + 3)
        check(
            restored_step(log) == newest_durable,
            f"a fresh node restored durable step {newest_durable}",
            log.read_text(),
        )
        check(
            f"Fetched step {newest_durable}" in run.daemon_log.read_text(),
            "the daemon fetched it, verified",
        )
        check(run.stop_daemon() == 0, "the daemon drains and exits 0")

        # 6. load_full_state_path from `tiered export --item state`
        exported = work / "exported-state"
        out = subprocess.run(
            [
                *TIERED,
                "export",
                str(newest_durable),
                str(exported),
                "--item",
                "state",
                *run.config_args,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        check(out.returncode == 0, "tiered export --item state", out.stderr)
        other = [
            "run_name=reader",
            f"base_output_directory={work / 'reader'}",
            "enable_multi_tier_checkpointing=false",
            f"load_full_state_path={exported}",
            "skip_jax_distributed_system=true",
        ]
        log = run.train(newest_durable + 3, overrides=other)
        text = log.read_text()
        check(
            f"completed step: {newest_durable + 1}," in text,
            f"load_full_state_path continued from step {newest_durable}",
            text,
        )
    finally:
        if run.daemon is not None:
            run.daemon.kill()
        if emulator is not None:
            emulator.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("make test-maxtext: every check passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

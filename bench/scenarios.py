"""The scenarios. Each returns a JSON-able dict with raw samples, medians and ratios."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    config_mapping,
    daemon,
    drop_bucket,
    free_port,
    gcs_emulator,
    median,
    new_bucket,
    proc_cpu_seconds,
    proc_rss_mb,
    random_state,
    settle,
    slowdown_summary,
    state_bytes,
    write_config,
)
from tiered.layout import COMMIT_MARKER


def _compute_step(target_ms: float) -> Callable[[], None]:
    """A jitted matmul chain calibrated to take about ``target_ms`` on this machine."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((256, 256), jnp.float32) / 256

    @jax.jit
    def one(a: jax.Array) -> jax.Array:
        for _ in range(8):
            a = jnp.tanh(a @ a)
        return a

    one(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(20):
        one(x).block_until_ready()
    per = (time.perf_counter() - t0) / 20
    reps = max(1, round(target_ms / 1000 / per))

    def step() -> None:
        a = x
        for _ in range(reps):
            a = one(a)
        a.block_until_ready()

    return step


# -- 1. training stall ---------------------------------------------------------------------------


def training_stall(
    *, size_mb: int, reps: int, steps: int, local_period: int, step_ms: float, work: Path
) -> dict[str, Any]:
    import jax
    import orbax.checkpoint as ocp

    import tiered
    from tiered.config import TieredSettings

    durable_period = 5 * local_period
    state = random_state(size_mb)
    compute = _compute_step(step_ms)
    # tiered as configured by default, and with tiered.local_compression the other way, so the
    # table shows what zstd on every local save costs the training loop.
    default_zstd = TieredSettings().local_compression
    other = "tiered_no_zstd" if default_zstd else "tiered_zstd"
    tiered_settings = {"tiered": {}, other: {"local_compression": not default_zstd}}
    # orbax's local async save with each compression setting, so each tiered row has a
    # reference that differs from it only in being tiered (zstd alone is most of a save's CPU).
    setups = [
        "none",
        "orbax_durable_every_local",
        "orbax_durable_every_durable",
        "orbax_local_async",
        "orbax_local_async_no_zstd",
        *tiered_settings,
    ]
    reference = {
        "tiered": "orbax_local_async" if default_zstd else "orbax_local_async_no_zstd",
        other: "orbax_local_async_no_zstd" if default_zstd else "orbax_local_async",
    }
    samples: dict[str, list[dict[str, float]]] = {s: [] for s in setups}

    def run(setup: str, rep: int) -> dict[str, float]:
        base = work / f"stall-{setup}-{rep}"
        blocking: list[float] = []
        bucket = new_bucket()
        settle()

        def loop(save: Callable[[int], None] | None, finish: Callable[[], None]) -> float:
            t0 = time.perf_counter()
            for step in range(1, steps + 1):
                compute()
                if save is not None:
                    s0 = time.perf_counter()
                    save(step)
                    blocking.append(time.perf_counter() - s0)
            finish()
            return time.perf_counter() - t0

        if setup == "none":
            wall = loop(None, lambda: None)
        elif setup.startswith("orbax"):
            registry = None
            if setup.startswith("orbax_local_async"):
                directory, period = str(base / "local"), local_period
                if setup == "orbax_local_async_no_zstd":  # tiered's local handler, in orbax
                    handler = ocp.PyTreeCheckpointHandler(
                        use_ocdbt=True, use_zarr3=True, use_compression=False
                    )
                    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
                    registry.add(None, ocp.args.PyTreeSave, handler)
            else:
                directory = f"gs://{bucket}/orbax"
                period = local_period if setup == "orbax_durable_every_local" else durable_period
            mgr = ocp.CheckpointManager(
                directory,
                options=ocp.CheckpointManagerOptions(
                    save_interval_steps=period,
                    enable_async_checkpointing=True,
                    create=True,
                    # a local directory keeps what tiered's local tier keeps (local_max_to_keep
                    # 2): a file deleted before writeback never reaches the disk, so keeping
                    # every step would make the baseline write more than tiered does
                    max_to_keep=2 if setup.startswith("orbax_local_async") else None,
                ),
                handler_registry=registry,
            )
            save_args = ocp.args.PyTreeSave if registry is not None else ocp.args.StandardSave
            wall = loop(lambda s: mgr.save(s, args=save_args(state)), mgr.wait_until_finished)
            mgr.close()
        else:
            cfg = write_config(
                base.with_suffix(".yml"),
                config_mapping(
                    base / "local",
                    f"gs://{bucket}/tiered",
                    checkpoint_period=durable_period,
                    local_checkpoint_period=local_period,
                    tiered={"local_max_to_keep": 2, **tiered_settings[setup]},
                ),
            )
            base.mkdir(parents=True, exist_ok=True)
            with daemon(cfg):
                mgr = tiered.CheckpointManager(cfg, install_signal_handlers=False)
                wall = loop(lambda s: mgr.save(s, state), mgr.wait_until_finished)
                mgr.close()
        shutil.rmtree(base, ignore_errors=True)
        drop_bucket(bucket)
        saves = [b for b in blocking if b > 0.001] or [0.0]
        return {
            "round": rep,
            "wall_s": wall,
            "save_block_median_s": median(saves),
            "save_block_total_s": sum(blocking),
            "saves": len(saves),
        }

    failures: list[str] = []
    for rep in range(reps):
        for setup in setups:  # interleaved: every setup once per round
            # A fresh emulator per run: under GiB-scale tensorstore writes it degrades over
            # time (bench/NOTES.md), and one run must not inherit another's state.
            try:
                with gcs_emulator():
                    samples[setup].append(run(setup, rep))
            except Exception as err:  # a baseline failing on the emulator is recorded, not fatal
                failures.append(f"{setup} round {rep}: {type(err).__name__}: {str(err)[:200]}")
    walls = {s: median([x["wall_s"] for x in samples[s]]) for s in setups}
    # Overhead is paired by round: each run against the "none" run of its own round, then the
    # median. On a shared 2-core machine the background load drifts between rounds, and pairing
    # cancels what a round's runs share.
    overhead = {s: median(_paired(samples, s)) for s in setups}
    risk = {
        "none": steps,
        "orbax_durable_every_local": local_period,
        "orbax_durable_every_durable": durable_period,
        "orbax_local_async": local_period,
        "orbax_local_async_no_zstd": local_period,
        **{s: local_period for s in tiered_settings},
    }
    return {
        "params": {
            "device": jax.devices()[0].platform,
            "size_mb": size_mb,
            "bytes": state_bytes(state),
            "steps": steps,
            "local_period": local_period,
            "durable_period": durable_period,
            "step_ms": step_ms,
            "reps": reps,
        },
        "samples": samples,
        "median_wall_s": walls,
        "overhead_s": overhead,
        "median_save_block_s": {
            s: median([x["save_block_median_s"] for x in samples[s]]) for s in setups
        },
        "steps_at_risk_on_crash": risk,
        "failed_runs": failures,
        "reference": reference,
        "ratios": {
            # the headline: tiered as configured against orbax saving with the same compression
            "tiered_vs_orbax_local_async_overhead": ratio(
                overhead["tiered"], overhead[reference["tiered"]]
            ),
            f"{other}_vs_orbax_local_async_overhead": ratio(
                overhead[other], overhead[reference[other]]
            ),
            "orbax_every_local_vs_tiered_overhead": ratio(
                overhead["orbax_durable_every_local"], overhead["tiered"]
            ),
        },
        "bars": {
            "tiered within 1.1x of orbax local async (overhead)": 1.1,
            "orbax every local period to durable at least 5x tiered (overhead)": 5.0,
        },
    }


def _paired(samples: dict[str, list[dict[str, float]]], setup: str) -> list[float]:
    """``setup``'s wall time minus that of the "none" run in the same round, for each round
    where both ran."""
    by_round = {x["round"]: x["wall_s"] for x in samples["none"]}
    return [x["wall_s"] - by_round[x["round"]] for x in samples[setup] if x["round"] in by_round]


def ratio(a: float, b: float) -> float:
    floor = 0.05  # seconds: below this an overhead is noise, and a ratio of noise means nothing
    return max(a, floor) / max(b, floor)


# -- 2. promotion throughput ----------------------------------------------------------------------


def promotion_throughput(
    *, size_mb: int, reps: int, backend: str, work: Path, latency: bool = True
) -> dict[str, Any]:
    import fsspec

    from bench.common import save_state_locally
    from tiered import DurableTier

    local = work / f"promote-local-{backend}"
    step_dir = save_state_locally(local, 100, random_state(size_mb))
    total = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
    if backend == "gs":
        root = f"gs://{new_bucket()}"
        opts: dict[str, Any] = {"token": "anon"}
    else:
        root = f"file://{work}/promote-durable"
        opts = {}
    fs, _ = fsspec.core.url_to_fs(root, **opts)
    # On file:// both copies are timed until the bytes are on disk: tiered fsyncs every file
    # before it commits a step, while a bare put returns with them still in the page cache.
    # On gs:// a put returns once the server has the object.
    on_disk = settle if backend == "file" else (lambda: None)
    raw, ours = [], []
    for rep in range(reps):
        target = f"{root}/raw-{rep}/100".partition("://")[2]
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        settle()
        t0 = time.perf_counter()
        fs.put(str(step_dir), target, recursive=True)
        on_disk()
        raw.append(total / 1e6 / (time.perf_counter() - t0))
        tier = DurableTier(f"{root}/tiered-{rep}", storage_options=opts)
        settle()
        t0 = time.perf_counter()
        tier.upload_step(step_dir, step=100)  # manifest, upload, verify, commit
        on_disk()
        ours.append(total / 1e6 / (time.perf_counter() - t0))
    latencies = detection_latency(work=work, reps=max(5, reps)) if latency else []
    return {
        "params": {"size_mb": size_mb, "bytes": total, "backend": backend, "reps": reps},
        "raw_put_mb_s": raw,
        "tiered_mb_s": ours,
        "median": {"raw_put_mb_s": median(raw), "tiered_mb_s": median(ours)},
        "ratios": {"tiered_vs_raw_throughput": median(ours) / median(raw)},
        "detection_latency_s": latencies,
        "median_detection_latency_s": median(latencies),
        "bars": {
            "tiered at least 0.9x raw put (checksums included)": 0.9,
            "median detection-to-upload latency under 1 s": 1.0,
        },
    }


def detection_latency(*, work: Path, reps: int) -> list[float]:
    """From orbax's commit (its rename into place) to the daemon starting the upload."""
    from bench.common import save_state_locally

    local = work / "latency-local"
    cfg = write_config(
        work / "latency.yml",
        config_mapping(
            local,
            f"file://{work}/latency-durable",
            checkpoint_period=10,
            local_checkpoint_period=10,
            tiered={"rescan_seconds": 30, "local_max_to_keep": 100},
        ),
    )
    state = random_state(1)
    out = []
    with daemon(cfg):
        for i in range(reps):
            step = 10 * (i + 1)
            save_state_locally(local, step, state)
            time.sleep(1.0)
        time.sleep(1.0)
    log = cfg.with_suffix(".daemon.log").read_text()
    for i in range(reps):
        step = 10 * (i + 1)
        meta = json.loads((local / str(step) / "_CHECKPOINT_METADATA").read_text())
        committed = meta["commit_timestamp_nsecs"] / 1e9
        m = re.search(rf"^(\S+ \S+) INFO daemon: Promoting step {step} ", log, re.M)
        if m:
            started = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append(max(0.0, started - committed))
    shutil.rmtree(local, ignore_errors=True)
    return out


# -- 3. fresh-node restore ------------------------------------------------------------------------


def fresh_node_restore(*, size_mb: int, reps: int, work: Path) -> dict[str, Any]:
    import jax
    import orbax.checkpoint as ocp

    import tiered
    from bench.common import save_state_locally
    from tiered import DurableTier, LocalTier

    state = random_state(size_mb)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    bucket = new_bucket()
    durable_url = f"gs://{bucket}/run"
    seed_local = work / "restore-seed"
    step_dir = save_state_locally(seed_local, 500, state)
    DurableTier(durable_url, storage_options={"token": "anon"}).upload_step(step_dir, step=500)
    shutil.rmtree(seed_local)
    times: dict[str, list[float]] = {
        "orbax_direct": [],
        "tiered_store": [],
        "tiered_verify_first": [],
    }
    filled: list[float] = []

    def run_direct(rep: int) -> None:
        settle()
        t0 = time.perf_counter()
        with ocp.CheckpointManager(durable_url) as mgr:
            restored = mgr.restore(500, args=ocp.args.StandardRestore(abstract))
        jax.block_until_ready(restored)
        times["orbax_direct"].append(time.perf_counter() - t0)

    def run_tiered(mode: str, rep: int) -> None:
        local = work / f"restore-node-{rep}"
        cfg = tiered.config_from_mapping(
            config_mapping(
                local,
                durable_url,
                checkpoint_period=500,
                local_checkpoint_period=500,
                tiered={"durable_restore": mode},
            ),
            env={},
        )
        settle()
        t0 = time.perf_counter()
        mgr = tiered.CheckpointManager(cfg, install_signal_handlers=False)
        result = mgr.restore(abstract)
        assert result is not None and result.step == 500
        jax.block_until_ready(result.state)
        times[f"tiered_{mode}"].append(time.perf_counter() - t0)  # the trainer can go on here
        mgr.close()  # waits for the local copy, in store mode filled in the background
        if mode == "store":
            filled.append(time.perf_counter() - t0)
        assert LocalTier(local).committed_steps() == [500]
        shutil.rmtree(local)

    runs = [
        run_direct,
        lambda rep: run_tiered("store", rep),
        lambda rep: run_tiered("verify_first", rep),
    ]
    for rep in range(reps):
        # Rotate which goes first: whichever runs after another starts with the memory and page
        # cache it left behind (tiered's local load took 0.8-1.3 s on its own, and 0.8-1.7 s
        # right after an orbax-direct restore).
        for run in runs[rep % 3 :] + runs[: rep % 3]:
            run(rep)
    medians = {k: median(v) for k, v in times.items()}
    return {
        "params": {
            "size_mb": size_mb,
            "bytes": state_bytes(state),
            "reps": reps,
            "order": "rotated: each system goes first in every third round",
        },
        "times_s": times,
        "local_copy_filled_s": filled,
        "median": {**medians, "local_copy_filled_s": median(filled)},
        "ratios": {
            "tiered_store_vs_orbax_direct_time": medians["tiered_store"] / medians["orbax_direct"],
            "tiered_verify_first_vs_orbax_direct_time": (
                medians["tiered_verify_first"] / medians["orbax_direct"]
            ),
        },
        "bars": {"tiered (default mode) at most 1.1x orbax restoring from the durable tier": 1.1},
    }


# -- 4. interference ------------------------------------------------------------------------------


def interference(
    *, size_mb: int, reps: int, step_ms: float, work: Path, durable_period: int = 500
) -> dict[str, Any]:
    """Compute steps timed while the real daemon uploads one periodic step, against the same
    steps with nothing uploading: with the defaults (no cap: paced to the durable period of
    ``durable_period`` steps of this step time, which the step's metadata records as
    ``tiered.CheckpointManager`` does), capped at 50 MB/s, and unpaced. Also the durable lag:
    from the upload's start to its commit."""
    from bench.common import save_state_locally

    compute = _compute_step(step_ms)
    warm = [_timed(compute) for _ in range(10)]
    per_step = median(warm)
    step = durable_period
    local = work / "interfere-local"
    save_state_locally(
        local,
        step,
        random_state(size_mb),
        custom_metadata={"tiered": {"reason": "periodic", "seconds_per_step": per_step}},
    )
    setups: dict[str, dict[str, Any]] = {
        "default": {},
        "capped_400mbps": {"upload_bandwidth_mb_per_s": 50.0, "transfer_pacing": None},
        "uncapped": {"transfer_pacing": None},
    }
    results: dict[str, dict[str, list[float]]] = {}
    lag: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for label, extra in setups.items():
        idle: list[float] = []
        busy: list[float] = []
        lags, cpus = [], []
        for rep in range(reps):
            durable = work / f"interfere-durable-{label}-{rep}"
            cfg = write_config(
                work / f"interfere-{label}-{rep}.yml",
                config_mapping(
                    local,
                    f"file://{durable}",
                    checkpoint_period=durable_period,
                    local_checkpoint_period=durable_period,
                    tiered={"local_max_to_keep": 10, **extra},
                ),
            )
            settle()
            # The real daemon, as deployed (nice included): it finds the step due on start.
            with daemon(cfg, wait=False) as proc:
                # measure from the upload's start (the daemon's start-up is not the upload)
                while proc.poll() is None and not (durable / str(step)).exists():
                    time.sleep(0.01)
                started, cpu0 = time.perf_counter(), proc_cpu_seconds(proc.pid)
                paused = 0.0
                # Busy and idle steps alternate in blocks of five, the daemon stopped (SIGSTOP)
                # for the idle ones: both see the same neighbours on a shared machine.
                while proc.poll() is None and not (durable / str(step) / COMMIT_MARKER).exists():
                    busy += [_timed(compute) for _ in range(5)]
                    proc.send_signal(signal.SIGSTOP)
                    t0 = time.perf_counter()
                    idle += [_timed(compute) for _ in range(5)]
                    paused += time.perf_counter() - t0
                    proc.send_signal(signal.SIGCONT)
                # A paced or capped upload's token bucket fills while the daemon is stopped
                # (up to a second's worth): its progress follows the clock, so its lag is the
                # wall time; an unpaced one stands still while stopped.
                paced = extra.get("transfer_pacing", 0.5) or extra.get("upload_bandwidth_mb_per_s")
                lags.append(time.perf_counter() - started - (0.0 if paced else paused))
                cpus.append(proc_cpu_seconds(proc.pid) - cpu0)
            shutil.rmtree(durable, ignore_errors=True)
        results[label] = {"idle_step_s": idle, "busy_step_s": busy}
        lag[label], cpu[label] = lags, cpus
    summary = slowdown_summary(results)
    nbytes = sum(f.stat().st_size for f in (local / str(step)).rglob("*") if f.is_file())
    horizon = durable_period * per_step
    return {
        "params": {
            "size_mb": size_mb,
            "step_ms": step_ms,
            "reps": reps,
            "durable_period": durable_period,
            "recorded_seconds_per_step": per_step,
            "step_bytes": nbytes,
        },
        "samples": results,
        "summary": summary,
        "durable_lag_s": lag,
        "durable_lag_median_s": {k: median(v) for k, v in lag.items()},
        "daemon_cpu_s": cpu,
        "pacing": {
            "seconds_to_next_durable_step": horizon,
            "expected_upload_s": nbytes / max(2e6, nbytes / (horizon * 0.5)),
        },
        "bars": {"step time while uploading at most 1.05x idle": 1.05},
    }


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- 5. daemon footprint --------------------------------------------------------------------------


def footprint(
    *, work: Path, steps: int = 50, files: int = 1000, seconds: float = 30.0, memory_mb: int = 2048
) -> dict[str, Any]:
    local = work / "footprint-local"
    for i in range(steps):
        step_dir = local / str(i * 10 + 1)  # not multiples of the durable period: nothing due
        (step_dir / "d").mkdir(parents=True)
        for j in range(files):
            (step_dir / "d" / f"f{j}").write_bytes(b"x" * 512)
        (step_dir / "commit_success.txt").write_text("ok")
    cfg = write_config(
        work / "footprint.yml",
        config_mapping(
            local,
            f"file://{work}/footprint-durable",
            checkpoint_period=10_000,
            local_checkpoint_period=10,
            tiered={"local_max_to_keep": steps + 10, "rescan_seconds": 30},
        ),
    )
    with daemon(cfg) as proc:
        time.sleep(5)  # settle: first scan, imports
        c0, t0 = proc_cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        cpu = (proc_cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
        rss = proc_rss_mb(proc.pid)
    shutil.rmtree(local, ignore_errors=True)
    return {
        "params": {"steps": steps, "files_per_step": files, "seconds": seconds},
        "idle_cpu_percent": cpu * 100,
        "rss_mb": rss,
        "bars": {"idle CPU under 1%": 1.0, "RSS under 150 MB": 150.0},
        "memory": memory(size_mb=memory_mb, work=work) if memory_mb else None,
    }


def memory(*, size_mb: int, work: Path) -> dict[str, Any]:
    """Peak resident memory of ``tiered promote``, ``verify`` and ``restore`` of a step with one
    file of ``size_mb``, on each backend, beside one plain fsspec ``put_file`` / ``get_file`` of
    the same file with the client's defaults. Each figure is the process's own ``VmHWM``
    (``bench/peak.py``)."""
    from bench.common import moto_server, new_s3_bucket, s3_options

    local = work / "memory-local"
    step = local / "50"
    step.mkdir(parents=True)
    with open(step / "weights.bin", "wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(1 << 20))
    (step / "commit_success.txt").write_text("ok")
    rows: dict[str, dict[str, float]] = {}

    def peak(*argv: str) -> float:
        out = work / "peak.txt"
        done = subprocess.run(
            [sys.executable, "-m", "bench.peak", str(out), *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr[-2000:]}")
        return float(out.read_text())

    with moto_server() as endpoint:
        stores = {
            "file": (f"file://{work}/memory-durable", {}),
            "gs": (f"gs://{new_bucket()}/run", {"token": "anon"}),
            "s3": (f"s3://{new_s3_bucket(endpoint)}/run", s3_options(endpoint)),
        }
        for name, (url, options) in stores.items():
            cfg = write_config(
                work / f"memory-{name}.yml",
                config_mapping(local, url, tiered={"storage_options": options}),
            )
            c = str(cfg)
            row = {"tiered_promote": peak("tiered.cli", "promote", "50", "--config", c)}
            row["tiered_verify"] = peak("tiered.cli", "verify", "50", "--config", c)
            moved = work / "memory-moved"
            shutil.move(step, moved)
            row["tiered_restore"] = peak("tiered.cli", "restore", "--step", "50", "--config", c)
            shutil.rmtree(step)
            shutil.move(moved, step)
            remote = f"{url.removeprefix('file://')}/baseline.bin"
            opts = json.dumps(options)
            row["fsspec_put"] = peak(
                "bench.fscopy", "put", str(step / "weights.bin"), remote, url, opts
            )
            row["fsspec_get"] = peak(
                "bench.fscopy", "get", remote, str(work / "back.bin"), url, opts
            )
            (work / "back.bin").unlink()
            rows[name] = row
    shutil.rmtree(local, ignore_errors=True)
    return {
        "params": {"size_mb": size_mb},
        "peak_rss_mb": rows,
        "bars": {"tiered commands under 200 MB": 200.0},
    }


# -- 6. the physical limit: bench/physical.py -----------------------------------------------------


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tiered-bench-", dir="/var/tmp"))


# -- 7. scaling across processes ------------------------------------------------------------------


def _run_job(
    config: Path,
    env_for: Callable[[int], dict[str, str]],
    nodes: int,
    *,
    per_node_mb: int,
    step: int,
) -> list[dict[str, Any]]:
    """One multi-process JAX job (``bench/mp_job.py``); one JSON result per process."""
    import os

    from bench.common import ROOT

    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.mp_job",
                str(config),
                str(r),
                str(nodes),
                str(port),
                str(per_node_mb),
                str(step),
            ],
            cwd=ROOT,
            env={**os.environ, "JAX_PLATFORMS": "cpu", **env_for(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(nodes)
    ]
    results = []
    for r, p in enumerate(procs):
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"process {r} of {nodes} failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def scaling(
    *, per_node_mb: int, reps: int, work: Path, counts: tuple[int, ...] = (1, 2, 4)
) -> dict[str, Any]:
    """Weak scaling: N processes, each with its own local directory, daemon and part of the
    state. Measures the local save, each node's part upload, the time from the last local
    commit to the durable commit, and a restore where one node was replaced (empty disk)."""
    import contextlib
    import urllib.request

    from tiered import DurableTier

    runs: dict[str, list[dict[str, Any]]] = {str(n): [] for n in counts}
    for rep in range(reps):
        for n in counts:
            bucket = new_bucket()
            url = f"gs://{bucket}/run"
            base = work / f"scale-{n}-{rep}"
            locals_ = [base / f"node{r}" for r in range(n)]
            status = [f"127.0.0.1:{free_port()}" for _ in range(n)]
            mapping = config_mapping(
                base / "unused",
                url,
                checkpoint_period=50,
                local_checkpoint_period=50,
                tiered={"rescan_seconds": 1, "local_max_to_keep": 2},
            )
            base.mkdir(parents=True)
            config = write_config(base / "config.yml", mapping)

            def env_for(
                r: int, n: int = n, locals_: list[Path] = locals_, status: list[str] = status
            ) -> dict[str, str]:
                return {
                    "TIERED_NODE_RANK": str(r),
                    "TIERED_NUM_NODES": str(n),
                    "TIERED_LOCAL_CHECKPOINT_DIRECTORY": str(locals_[r]),
                    "TIERED_STATUS_ADDRESS": status[r],
                }

            durable = DurableTier(url, storage_options={"token": "anon"})

            def wait_committed(step: int, durable: DurableTier = durable, n: int = n) -> float:
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    durable.fs.invalidate_cache()
                    if step in durable.committed_steps():
                        return time.time()
                    time.sleep(0.05)
                raise RuntimeError(f"step {step} never committed with {n} nodes")

            def last_promotion(r: int, status: list[str] = status) -> dict[str, Any]:
                with urllib.request.urlopen(f"http://{status[r]}/status", timeout=5) as resp:
                    return json.loads(resp.read())["daemon"]["last_promotion"] or {}

            row: dict[str, Any] = {"nodes": n}
            with contextlib.ExitStack() as stack:
                for r in range(n):
                    locals_[r].mkdir(parents=True)
                    stack.enter_context(
                        daemon(write_config(base / f"config{r}.yml", mapping), env=env_for(r))
                    )
                first = _run_job(config, env_for, n, per_node_mb=per_node_mb, step=50)
                committed_at = wait_committed(50)
                row["agree_fresh_s"] = max(x["restore_s"] for x in first)
                row["local_save_s"] = max(x["save_s"] for x in first)
                row["save_to_durable_s"] = committed_at - max(x["saved_at"] for x in first)
                parts = [last_promotion(r) for r in range(n)]
                row["part_upload_s"] = [p.get("seconds") for p in parts]
                row["part_bytes"] = [p.get("bytes") for p in parts]
            # The last node is replaced by an empty machine; every process restores.
            shutil.rmtree(locals_[-1])
            with contextlib.ExitStack() as stack:
                for r in range(n):
                    locals_[r].mkdir(parents=True, exist_ok=True)
                    stack.enter_context(
                        daemon(write_config(base / f"config{r}.yml", mapping), env=env_for(r))
                    )
                second = _run_job(config, env_for, n, per_node_mb=per_node_mb, step=100)
            assert all(x["restored"] == 50 for x in second), second
            row["restore_replaced_s"] = second[-1]["restore_s"]
            row["restore_others_s"] = max(x["restore_s"] for x in second[:-1]) if n > 1 else None
            row["sources"] = [x["source"] for x in second]
            runs[str(n)].append(row)
            drop_bucket(bucket)
            shutil.rmtree(base, ignore_errors=True)
            print(f"   {n} node(s), rep {rep}: {row}", flush=True)

    def med(n: int, key: str) -> float | None:
        values = [r[key] for r in runs[str(n)] if r.get(key) is not None]
        return median(values) if values else None

    summary = {
        str(n): {
            "state_mb": per_node_mb * n,
            "agree_fresh_s": med(n, "agree_fresh_s"),
            "local_save_s": med(n, "local_save_s"),
            "part_upload_s": median([s for r in runs[str(n)] for s in r["part_upload_s"] if s]),
            "save_to_durable_s": med(n, "save_to_durable_s"),
            "restore_replaced_s": med(n, "restore_replaced_s"),
            "restore_others_s": med(n, "restore_others_s"),
        }
        for n in counts
    }
    return {
        "params": {"per_node_mb": per_node_mb, "reps": reps, "counts": list(counts)},
        "runs": runs,
        "median": summary,
    }

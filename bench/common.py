"""Shared pieces of the benchmarks: servers, states, timing, results."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def gcs_emulator(*, on_disk: bool = False, served_log: Path | None = None) -> Iterator[str]:
    """gcp-storage-emulator on loopback, through the launcher that fixes its multipart parsing.

    In memory: its on-disk mode breaks tensorstore's conditional writes ("Malformed
    StorageGeneration" on some object names), so the baselines could not run. Buckets are
    dropped after each run (``drop_bucket``) to keep its memory bounded. With ``served_log``,
    the emulator appends each object download to it (bucket, name, bytes: see
    ``tests/gcs_emulator.py``)."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="tiered-bench-gcs-")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "gcs_emulator.py"),
            "start",
            "--host=127.0.0.1",
            f"--port={port}",
            "-q",
            *([] if on_disk else ["--in-memory"]),
        ],
        cwd=workdir,
        env={**os.environ, **({"GCS_EMULATOR_SERVED_LOG": str(served_log)} if served_log else {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_http(f"{url}/storage/v1/b", proc)
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        subprocess.run(["rm", "-rf", workdir], check=False)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        import fsspec

        for cls in list(fsspec.registry.values()):
            cls.clear_instance_cache()


def _wait_http(url: str, proc: subprocess.Popen) -> None:
    """Until a server just started answers at ``url`` (any HTTP status counts), for 30 s."""
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on loopback; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_http(url, proc)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


S3_CREDENTIALS = {"key": "bench", "secret": "bench"}


def s3_options(endpoint: str) -> dict[str, Any]:
    return {
        **S3_CREDENTIALS,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }


def new_s3_bucket(endpoint: str) -> str:
    import boto3

    name = f"bench-{uuid.uuid4().hex[:10]}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    ).create_bucket(Bucket=name)
    return name


def new_bucket() -> str:
    import gcsfs

    name = f"bench-{uuid.uuid4().hex[:10]}"
    gcsfs.GCSFileSystem(token="anon").mkdir(name)
    return name


def drop_bucket(name: str) -> None:
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon")
    fs.invalidate_cache()
    with suppress(FileNotFoundError):
        fs.rm(name, recursive=True)
    fs.invalidate_cache()


def random_state(size_mb: int, *, parts: int = 8, seed: int = 0) -> dict[str, Any]:
    """About ``size_mb`` MB of random float32 in ``parts`` arrays (random: nothing compresses)."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    per = max(1, size_mb * 1_000_000 // 4 // parts)
    return {f"p{i}": jnp.asarray(rng.standard_normal(per, dtype=np.float32)) for i in range(parts)}


def state_bytes(state: dict[str, Any]) -> int:
    return sum(int(v.size) * v.dtype.itemsize for v in state.values())


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def slowdown_summary(results: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Per setup: the median step idle and while busy, their ratio, how many busy samples."""
    return {
        label: {
            "median_idle_s": median(r["idle_step_s"]),
            "median_busy_s": median(r["busy_step_s"]),
            "slowdown": median(r["busy_step_s"]) / median(r["idle_step_s"]),
            "busy_samples": len(r["busy_step_s"]),
        }
        for label, r in results.items()
    }


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
    }


def save_result(scenario: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {
        "scenario": scenario,
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "machine": machine(),
        **data,
    }
    path = RESULTS / f"{scenario}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def config_mapping(local: Path, durable: str, **extra: Any) -> dict[str, Any]:
    tiered = {
        "status_address": f"127.0.0.1:{free_port()}",
        "rescan_seconds": 2,
        "prune_interval_seconds": 1,
        "shutdown_grace_seconds": 300,
    }
    if durable.startswith("gs://"):
        tiered["storage_options"] = {"token": "anon"}
    tiered.update(extra.pop("tiered", {}))
    return {
        "run_name": "bench",
        "checkpoint_dir": durable,
        "local_checkpoint_directory": str(local),
        "tiered": tiered,
        **extra,
    }


def write_config(path: Path, mapping: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(mapping))
    return path


@contextmanager
def daemon(
    config_path: Path, *, env: dict[str, str] | None = None, wait: bool = True
) -> Iterator[subprocess.Popen]:
    """The real daemon (``python -m daemon``) for the duration of the block."""
    log = open(config_path.with_suffix(".daemon.log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(config_path)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        if wait:
            time.sleep(1.5)
        yield proc
    finally:
        proc.terminate()
        proc.wait(600)
        log.close()


def settle() -> None:
    """Write back dirty pages before a timed run, so it does not pay for the previous run's
    writes (1 GB of them can take seconds to reach this machine's disk)."""
    os.sync()


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def save_state_locally(
    local: Path,
    step: int,
    state: dict[str, Any],
    *,
    custom_metadata: dict[str, Any] | None = None,
    orbax_file_size: bool = False,
    timings: dict[str, float] | None = None,
) -> Path:
    """A real orbax step on local disk, waited for, in the format tiered's local saves use by
    default (``tiered.orbax_api.local_pytree_handler``: OCDBT, zarr3, zstd and data file size as
    ``tiered.local_compression`` and ``tiered.local_data_file_size`` default). With
    ``orbax_file_size`` the data files are orbax's default size instead (2 GiB), as before
    tiered set its own. ``timings`` gets ``save_return_s``, how long ``save()`` blocked."""
    import orbax.checkpoint as ocp

    from tiered.config import TieredSettings
    from tiered.orbax_api import local_pytree_handler

    settings = TieredSettings()
    if orbax_file_size:
        handler = ocp.PyTreeCheckpointHandler(
            use_ocdbt=True, use_zarr3=True, use_compression=settings.local_compression
        )
    else:
        handler = local_pytree_handler(settings)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(None, ocp.args.PyTreeSave, handler)
    options = ocp.CheckpointManagerOptions(create=True)
    with ocp.CheckpointManager(str(local), options=options, handler_registry=registry) as m:
        t0 = time.perf_counter()
        m.save(
            step,
            args=ocp.args.PyTreeSave(state),
            force=True,
            custom_metadata=custom_metadata or {},
        )
        if timings is not None:
            timings["save_return_s"] = time.perf_counter() - t0
        m.wait_until_finished()
    return local / str(step)

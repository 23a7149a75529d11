"""Shared fixtures: real storage servers on loopback, configs, and subprocess helpers.

The GCS emulator (gcp-storage-emulator) is started once per session on a free port; if
``STORAGE_EMULATOR_HOST`` is already set, the same tests run against that server instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from tiered import TieredConfig, config_from_mapping

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, *, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class GcsEmulator:
    """A gcp-storage-emulator process that can be stopped and started again (same port)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.served_log = Path(tempfile.gettempdir()) / f"gcs-served-{port}-{os.getpid()}.log"

    def served(self, bucket: str) -> dict[str, int]:
        """Bytes of each object of ``bucket`` the emulator has served so far."""
        out: dict[str, int] = {}
        with contextlib.suppress(FileNotFoundError), open(self.served_log) as f:
            for line in f:
                b, name, size = line.rstrip("\n").split("\t")
                if b == bucket:
                    out[name] = out.get(name, 0) + int(size)
        return out

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "gcs_emulator.py"),
                "start",
                "--host=127.0.0.1",
                f"--port={self.port}",
                "--in-memory",
            ],
            env={**os.environ, "GCS_EMULATOR_SERVED_LOG": str(self.served_log)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(f"{self.url}/storage/v1/b")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator | None]:
    existing = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    if existing:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", existing)
        yield None
        return
    emu = GcsEmulator(free_port())
    emu.start()
    os.environ["STORAGE_EMULATOR_HOST"] = emu.url
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = emu.url
    try:
        yield emu
    finally:
        emu.stop()
        emu.served_log.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _clear_fsspec_cache() -> Iterator[None]:
    yield
    for cls in list(fsspec.registry.values()):
        cls.clear_instance_cache()


def make_bucket() -> str:
    import gcsfs

    name = f"b-{uuid.uuid4().hex[:12]}"
    gcsfs.GCSFileSystem(token="anon").mkdir(name)
    return name


@pytest.fixture(params=["file", "gs"])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The durable tier, once as a plain directory and once on the GCS emulator."""
    if request.param == "file":
        return f"file://{tmp_path}/durable"
    request.getfixturevalue("gcs_emulator")
    return f"gs://{make_bucket()}/run/checkpoints"


@pytest.fixture(params=["file", "gs"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """A durable URL and its storage options: a plain directory, then a bucket of the GCS
    emulator (the dedup's and the restore in part's store tests)."""
    if request.param == "file":
        return f"file://{tmp_path}/durable", {}
    request.getfixturevalue("gcs_emulator")
    return f"gs://{make_bucket()}/run", {"token": "anon"}


@pytest.fixture(params=["file", "gs", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """(durable URL, storage options) on each real backend: a directory, the GCS emulator and
    moto's S3 server."""
    if request.param == "file":
        return f"file://{tmp_path}/durable", {}
    if request.param == "gs":
        request.getfixturevalue("gcs_emulator")
        return f"gs://{make_bucket()}/run/checkpoints", {"token": "anon"}
    endpoint = request.getfixturevalue("moto_server")
    return f"s3://{s3_bucket(endpoint)}/run/checkpoints", s3_storage_options(endpoint)


@pytest.fixture
def gs_url(gcs_emulator: GcsEmulator | None) -> str:
    return f"gs://{make_bucket()}/run/checkpoints"


def config_dict(tmp_path: Path, durable_url: str, **overrides: Any) -> dict[str, Any]:
    tiered_section = {
        "status_address": f"127.0.0.1:{free_port()}",
        "rescan_seconds": 1,
        "prune_interval_seconds": 0.5,
        "retry_initial_seconds": 0.1,
        "retry_max_seconds": 1,
        "shutdown_grace_seconds": 30,
    }
    if durable_url.startswith("gs://"):
        tiered_section["storage_options"] = {"token": "anon"}
    tiered_section.update(overrides.pop("tiered", {}))
    data: dict[str, Any] = {
        "run_name": "test",
        "checkpoint_dir": durable_url,
        "local_checkpoint_directory": str(tmp_path / "local"),
        "local_checkpoint_period": 10,
        "checkpoint_period": 50,
        "tiered": tiered_section,
    }
    data.update(overrides)
    return data


def write_config(tmp_path: Path, durable_url: str, **overrides: Any) -> tuple[Path, TieredConfig]:
    import yaml

    data = config_dict(tmp_path, durable_url, **overrides)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    return path, config_from_mapping(data, env={})


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` from the repository root, to completion, output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env={**subprocess_env(), **(env or {})},
        cwd=ROOT,
        timeout=timeout,
    )


class DaemonProc:
    """The real daemon in a subprocess: ``python -m daemon --config FILE``."""

    def __init__(self, config_path: Path, cfg: TieredConfig, *, env: dict[str, str] | None = None):
        self.cfg = cfg
        self.log_path = config_path.parent / f"daemon-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--config", str(config_path)],
            cwd=ROOT,
            env={**subprocess_env(), **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.address = cfg.tiered.status_address

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                urllib.request.urlopen(f"http://{self.address}/healthz", timeout=1).read()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"daemon not ready:\n{self.log()}")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://{self.address}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def wait_for(predicate: Any, *, timeout: float = 30, interval: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's S3 server on a free port; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


S3_KEY = "AKIATIEREDTESTKEY"
S3_SECRET = "tiered-test-secret-do-not-log"


def s3_bucket(endpoint: str) -> str:
    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
    ).create_bucket(Bucket=name)
    return name


def s3_storage_options(endpoint: str) -> dict[str, Any]:
    return {
        "key": S3_KEY,
        "secret": S3_SECRET,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }

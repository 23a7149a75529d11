"""docs/configuration.md is written from the settings model: a field without a docstring, or a
committed page that no longer matches the model, fails here (the page had drifted by hand:
``/healthz`` for ``/readyz``, ``durable_timeout_seconds`` missing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tiered.config import TieredConfig, TieredSettings
from tiered.config_docs import attribute_docstrings

from conftest import ROOT, subprocess_env


def test_the_configuration_reference_is_the_model(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tiered.config_docs", "--check"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    page = (ROOT / "docs" / "configuration.md").read_text()
    documented = {**attribute_docstrings(TieredConfig), **attribute_docstrings(TieredSettings)}
    for name in (*TieredConfig.model_fields, *TieredSettings.model_fields):
        if name != "tiered":
            assert f"| `{name}` |" in page and f"`TIERED_{name.upper()}`" in page
            assert name in documented, f"{name} has no docstring in tiered/config.py"
    assert "`/readyz` turns 503 once promotion has failed" in page
    assert "| `durable_timeout_seconds` |" in page
    stale = tmp_path / "configuration.md"
    stale.write_text(page.replace("durable_timeout_seconds", "durable_timeout"))
    check = [sys.executable, "-m", "tiered.config_docs", "--check", "--path", str(stale)]
    done = subprocess.run(check, capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert done.returncode == 1 and "is stale" in done.stderr


def test_the_pages_error_example_is_what_the_cli_prints(tmp_path: Path) -> None:
    c = tmp_path / "c.yml"
    c.write_text(
        f"local_checkpoint_directory: {tmp_path}/local\ncheckpoint_dir: {tmp_path}/durable\n"
        "local_checkpoint_period: 10\ncheckpoint_period: 50\n"
        "tiered:\n  local_max_to_kep: 3\n  upload_concurency: 4\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "tiered.cli", "status", "--no-daemon", "--config", str(c)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 2
    printed = done.stderr.replace(str(c), "c.yml").strip().splitlines()
    page = (ROOT / "docs" / "configuration.md").read_text()
    for line in printed:
        assert line in page, line

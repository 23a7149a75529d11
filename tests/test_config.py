from __future__ import annotations

from pathlib import Path

import pytest

from tiered import ConfigError, config_from_mapping, load_config

ROOT = Path(__file__).resolve().parent.parent
BASE = {
    "run_name": "r",
    "base_output_directory": "gs://bucket/runs",
    "local_checkpoint_directory": "/tmp/local",
}


def cfg(env: dict[str, str] | None = None, **over: object):
    return config_from_mapping({**BASE, **over}, env=env or {})


def test_defaults_follow_maxtext_and_design() -> None:
    c = cfg()
    assert c.durable_url == "gs://bucket/runs/r/checkpoints"
    assert c.checkpoint_period == 5000 and c.local_checkpoint_period == 1000
    assert c.durable_period == 5000
    assert c.local_dir == Path("/tmp/local")


def test_shipped_configs_load() -> None:
    for name in ("demo.yml", "latency_network.yml"):
        load_config(ROOT / "configs" / name, env={})
    mtc = load_config(
        ROOT / "configs" / "tiered_maxtext.yml",
        maxtext=ROOT / "configs" / "maxtext_mtc.yml",
        overrides=["run_name=r"],
        env={},
    )
    assert mtc.speaks_mtc and mtc.durable_url == "gs://my-training-bucket/runs/r/checkpoints"
    c = load_config(ROOT / "configs" / "latency_network.yml", env={})
    assert (c.local_checkpoint_period, c.durable_period) == (1000, 5000)
    assert c.durable_url.startswith("gs://")


def test_unknown_top_level_keys_are_ignored() -> None:
    c = cfg(per_device_batch_size=8, steps=200000, model_name="llama3-8b")
    assert c.run_name == "r"


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            {"checkpoint_period": 2500, "local_checkpoint_period": 1000},
            "checkpoint_period (2500) is not a multiple of local_checkpoint_period (1000)",
        ),
        ({"checkpoint_period": 0}, "checkpoint_period must be a positive number of steps"),
        ({"local_checkpoint_period": -5}, "local_checkpoint_period must be a positive"),
        (
            {
                "multi_tier_checkpointing_backup_interval_steps": 3000,
                "multi_tier_checkpointing_backup_interval_minutes": 30,
            },
            "both set: choose one",
        ),
        (
            {"multi_tier_checkpointing_backup_interval_steps": 1500},
            "multi_tier_checkpointing_backup_interval_steps (1500) is not a multiple of "
            "local_checkpoint_period",
        ),
        ({"local_checkpoint_directory": ""}, "local_checkpoint_directory is not set"),
        ({"local_checkpoint_directory": "gs://b/x"}, "local_checkpoint_directory must be a local"),
        ({"checkpoint_dir": "ftpx://host/x"}, "unsupported URL scheme 'ftpx://'"),
        ({"base_output_directory": "", "checkpoint_dir": ""}, "checkpoint_dir is not set"),
        ({"max_num_checkpoints_to_keep": 0}, "max_num_checkpoints_to_keep must be at least 1"),
        ({"tiered": {"keep_period": 7000}}, "tiered.keep_period (7000) is not a multiple"),
        ({"tiered": {"local_max_to_keep": 0}}, "tiered.local_max_to_keep"),
        ({"tiered": {"status_address": "nope"}}, "expected HOST:PORT"),
        ({"checkpoint_period": "often"}, "checkpoint_period"),
        ({"tiered": ["not", "a", "mapping"]}, "tiered: must be a mapping"),
        ({"multi_tier_checkpointing_backup_interval_minutes": float("nan")}, "a finite number"),
    ],
)
def test_config_errors_name_the_key(over: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg(**over)
    assert message in str(info.value)


def test_unsupported_scheme_lists_installed_protocols() -> None:
    with pytest.raises(ConfigError, match=r"installed fsspec protocols: .*file.*gs"):
        cfg(checkpoint_dir="ftpx://host/x")


def test_unknown_tiered_key_suggests_nearest() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown key tiered.local_max_to_kep; did you mean "
        r"'local_max_to_keep'\?",
    ):
        cfg(tiered={"local_max_to_kep": 3})


def test_env_overrides_file_values() -> None:
    c = cfg(
        env={
            "TIERED_CHECKPOINT_PERIOD": "10000",
            "TIERED_LOCAL_MAX_TO_KEEP": "4",
            "TIERED_ENABLE_MULTI_TIER_CHECKPOINTING": "true",
            "OTHER": "x",
        }
    )
    assert c.checkpoint_period == 10000
    assert c.tiered.local_max_to_keep == 4
    assert c.enable_multi_tier_checkpointing is True


def test_env_override_is_validated_too() -> None:
    with pytest.raises(ConfigError, match="checkpoint_period"):
        cfg(env={"TIERED_CHECKPOINT_PERIOD": "1500"})


def test_backup_interval_steps_is_the_durable_period() -> None:
    c = cfg(multi_tier_checkpointing_backup_interval_steps=3000)
    assert c.durable_period == 3000


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yml"
    p.write_text("run_name: x\ncheckpoint_period: [1, 2\nlocal: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yml: malformed YAML at line \d+"):
        load_config(p, env={})


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yml", env={})
    p = tmp_path / "list.yml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(p, env={})


def test_plain_paths_become_file_urls(tmp_path: Path) -> None:
    c = cfg(checkpoint_dir=str(tmp_path / "d"))
    assert c.durable_url == f"file://{tmp_path}/d"


def test_readme_yaml_example_is_a_valid_config() -> None:
    """The README's YAML is what users copy first: it must load, with the values it shows."""
    import re
    import textwrap

    import yaml

    blocks = [
        textwrap.dedent(b)
        for b in re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    ]
    quick, flags = blocks[0], blocks[1]
    cfg = config_from_mapping(yaml.safe_load(quick), env={})  # the quickstart's, as is
    assert cfg.durable_url == "gs://my-bucket/runs/first/checkpoints"
    assert cfg.durable_period == 5 * cfg.local_checkpoint_period
    cfg = config_from_mapping(yaml.safe_load(flags), env={})
    assert cfg.checkpoint_period == 5000 and cfg.local_checkpoint_period == 1000
    assert cfg.tiered.daemon_nice == 10 and cfg.tiered.upload_bandwidth_mb_per_s == 50
    assert cfg.tiered.local_compression is False


def test_readme_quickstart_installs_what_exists() -> None:
    """The quickstart's pip line names this package and extras it declares, and its commands
    are subcommands the CLI has."""
    import re

    import tomllib

    from tiered.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quickstart") : readme.index("## From a checkout")]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installs = re.findall(r"pip install '([\w-]+)\[([\w,]+)\]'", quick)
    assert installs, quick
    for name, extras in installs:
        assert name == project["name"]
        assert set(extras.split(",")) <= set(project["optional-dependencies"])
    for extra in re.findall(r"\[(\w+(?:,\w+)*)\] (?:for|alone)", quick):
        assert set(extra.split(",")) <= set(project["optional-dependencies"])
    parser = build_parser()
    commands = re.findall(r"^\s*tiered (\w[\w-]*) ", quick, re.M)
    assert {"daemon", "status"} <= set(commands)
    for command in commands:
        parser.parse_args([command, "--config", "x"])  # a subcommand the CLI has


@pytest.mark.parametrize(
    ("local", "durable", "why"),
    [
        ("{t}/ckpt", "{t}/ckpt", "are the same directory"),
        ("{t}/ckpt", "file://{t}/ckpt/", "are the same directory"),
        ("{t}/ckpt", "{t}/ckpt/durable", "the durable tier is inside the local one"),
        ("{t}/durable/local", "{t}/durable", "the local tier is inside the durable one"),
        ("{t}/link", "{t}/real", "are the same directory"),  # one is a symlink to the other
    ],
)
def test_overlapping_tiers_are_refused_naming_both_keys(
    tmp_path: Path, local: str, durable: str, why: str
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    mapping = {
        "local_checkpoint_directory": local.format(t=tmp_path),
        "checkpoint_dir": durable.format(t=tmp_path),
    }
    with pytest.raises(ConfigError) as info:
        config_from_mapping(mapping, env={})
    message = str(info.value)
    assert "local_checkpoint_directory" in message and "checkpoint_dir" in message
    assert why in message and "\n" not in message


def test_a_derived_durable_directory_inside_the_local_one_is_refused(tmp_path: Path) -> None:
    mapping = {
        "local_checkpoint_directory": str(tmp_path),
        "base_output_directory": str(tmp_path / "out"),
        "run_name": "r",
    }
    with pytest.raises(
        ConfigError, match=r"checkpoint_dir \(from base_output_directory and run_name\)"
    ):
        config_from_mapping(mapping, env={})
    # Neighbours are fine.
    mapping["base_output_directory"] = str(tmp_path.parent / f"{tmp_path.name}-out")
    config_from_mapping(mapping, env={})


# -- MaxText's file and tiered's own ---------------------------------------------------------


def test_maxtext_file_overrides_and_a_tiered_file_make_one_config(tmp_path: Path) -> None:
    (tmp_path / "base.yml").write_text("checkpoint_period: 10000\nlocal_checkpoint_period: 20\n")
    maxtext = tmp_path / "run.yml"
    maxtext.write_text(
        "base_config: base.yml\nrun_name: from-file\nbase_output_directory: gs://b/runs\n"
        "local_checkpoint_directory: /local\nenable_multi_tier_checkpointing: true\n"
        "per_device_batch_size: 1\n"
    )
    ours = tmp_path / "tiered.yml"
    ours.write_text("tiered:\n  local_max_to_keep: 4\n")
    c = load_config(
        ours, maxtext=maxtext, overrides=["run_name=from-cli", "local_checkpoint_period=10"], env={}
    )
    assert c.run_name == "from-cli" and c.durable_url == "gs://b/runs/from-cli/checkpoints"
    assert (c.checkpoint_period, c.local_checkpoint_period) == (10000, 10)
    assert c.tiered.local_max_to_keep == 4 and c.speaks_mtc
    # tiered's file is optional
    assert load_config(maxtext=maxtext, env={}).tiered.local_max_to_keep == 2
    # and the environment still wins
    assert load_config(maxtext=maxtext, env={"TIERED_RUN_NAME": "env"}).run_name == "env"


@pytest.mark.parametrize(
    ("maxtext", "ours", "overrides", "message"),
    [
        ("run_name: r\ntiered:\n  local_max_to_keep: 3\n", None, [], "makes MaxText refuse it"),
        ("run_name: r\n", "run_name: x\ntiered: {}\n", [], "holds only the tiered: section"),
        ("run_name: r\n", None, ["run_name"], "expected key=value"),
        ("base_config: run.yml\n", None, [], "loops back"),
    ],
)
def test_maxtext_split_mistakes_are_one_line(
    tmp_path: Path, maxtext: str, ours: str | None, overrides: list[str], message: str
) -> None:
    (tmp_path / "run.yml").write_text(maxtext + "local_checkpoint_directory: /l\n")
    path = None
    if ours is not None:
        path = tmp_path / "tiered.yml"
        path.write_text(ours)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, maxtext=tmp_path / "run.yml", overrides=overrides, env={})
    assert "\n" not in str(info.value)


def test_overrides_need_the_maxtext_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="go with --maxtext-config"):
        load_config(ROOT / "configs" / "demo.yml", overrides=["run_name=x"], env={})
    with pytest.raises(ConfigError, match="give --config"):
        load_config(env={})


def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yml"
    bad.write_bytes("run_name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text") as info:
        load_config(bad, env={})
    assert "\n" not in str(info.value)


def test_a_near_miss_of_a_checkpointing_key_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    with caplog.at_level(logging.WARNING):
        cfg(local_checkpoint_perod=10, per_device_batch_size=8)
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "'local_checkpoint_perod'" in m and "'local_checkpoint_period'" in m for m in messages
    )
    assert not any("per_device_batch_size" in m for m in messages)


def test_the_shipped_maxtext_file_holds_only_maxtext_keys() -> None:
    """configs/maxtext_mtc.yml goes to MaxText as is: checked against MaxText's own list of
    keys (its base.yml) where maxtext is installed (make test-maxtext runs this too), and
    against the keys tiered reads everywhere."""
    import yaml

    from tiered.config import TieredConfig
    from tiered.config_files import _maxtext_package_config

    ours = yaml.safe_load((ROOT / "configs" / "maxtext_mtc.yml").read_text())
    assert "tiered" not in ours
    assert set(ours) - {"base_config"} <= set(TieredConfig.model_fields) - {"tiered"}
    base = _maxtext_package_config("base.yml")
    if base is None:
        pytest.skip("maxtext is not installed here (make test-maxtext checks it)")
    assert set(ours) - {"base_config"} <= set(yaml.safe_load(base.read_text()))
    side = yaml.safe_load((ROOT / "configs" / "tiered_maxtext.yml").read_text())
    assert set(side) == {"tiered"}


def test_the_megabit_bandwidth_key_is_refused_with_the_conversion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="upload_bandwidth_mb_per_s") as err:
        config_from_mapping(
            {
                "checkpoint_dir": f"{tmp_path}/d",
                "local_checkpoint_directory": f"{tmp_path}/l",
                "tiered": {"upload_bandwidth_mbps": 400},
            },
            env={},
        )
    assert "400 Mbit/s is 50" in str(err.value)


def _cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    import subprocess
    import sys

    from conftest import subprocess_env

    done = subprocess.run(
        [sys.executable, "-m", "tiered.cli", "status", "--no-daemon", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**subprocess_env(), **(env or {})},
        timeout=60,
    )
    return done.returncode, done.stderr


def _write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return name


TOP = "checkpoint_dir: file:///tmp/never/d\nlocal_checkpoint_directory: /tmp/never/l\n"


def test_a_misspelt_tiered_section_is_an_error_naming_it(tmp_path: Path) -> None:
    name = _write(tmp_path, "c.yml", TOP + "teired:\n  upload_concurrency: 4\n")
    rc, err = _cli(tmp_path, "--config", name)
    assert rc == 2
    assert "c.yml:3: 'teired' is not a section tiered reads; did you mean 'tiered:'?" in err


def test_every_bad_key_and_value_of_a_file_is_reported_at_once_with_its_line(
    tmp_path: Path,
) -> None:
    text = TOP + "tiered:\n  local_max_to_kep: 2\n  upload_concurency: 4\n  status_address: 5\n"
    rc, err = _cli(tmp_path, "--config", _write(tmp_path, "c.yml", text))
    assert rc == 2
    assert "c.yml: 3 problems" in err
    assert "c.yml:4: unknown key tiered.local_max_to_kep; did you mean 'local_max_to_keep'?" in err
    assert (
        "c.yml:5: unknown key tiered.upload_concurency; did you mean 'upload_concurrency'?" in err
    )
    assert "c.yml:6: tiered.status_address:" in err


def test_a_value_from_the_environment_is_blamed_on_the_variable(tmp_path: Path) -> None:
    name = _write(tmp_path, "c.yml", TOP)
    rc, err = _cli(tmp_path, "--config", name, env={"TIERED_CHECKPOINT_PERIOD": "abc"})
    assert rc == 2
    assert "TIERED_CHECKPOINT_PERIOD=abc: checkpoint_period:" in err
    assert "c.yml: checkpoint_period" not in err


def test_a_maxtext_override_is_blamed_on_the_override_and_no_checkpoint_dir_advice(
    tmp_path: Path,
) -> None:
    name = _write(tmp_path, "m.yml", "local_checkpoint_directory: /tmp/never/l\nrun_name: r\n")
    rc, err = _cli(tmp_path, "--maxtext-config", name, "checkpoint_period=xyz")
    assert rc == 2 and "override checkpoint_period=xyz: checkpoint_period:" in err
    rc, err = _cli(tmp_path, "--maxtext-config", name)
    assert rc == 2
    assert "set base_output_directory in MaxText's config" in err
    assert "set checkpoint_dir" not in err

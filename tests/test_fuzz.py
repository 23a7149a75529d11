"""Property tests: the config loader and the layout parsers never crash on hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.mtc import ReplicatorConfigError, parse_replicator_yaml
from tiered import ConfigError, config_from_mapping
from tiered.layout import MAX_STEP, parse_restore, parse_step, restore_name, step_name

yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30)
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=8,
)
config_keys = st.sampled_from(
    [
        "run_name",
        "base_output_directory",
        "checkpoint_dir",
        "checkpoint_period",
        "local_checkpoint_directory",
        "local_checkpoint_period",
        "max_num_checkpoints_to_keep",
        "multi_tier_checkpointing_backup_interval_steps",
        "multi_tier_checkpointing_backup_interval_minutes",
        "tiered",
        "enable_checkpointing",
    ]
) | st.text(max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(config_keys, yaml_values, max_size=8))
def test_config_loader_only_raises_config_error(raw: dict) -> None:
    try:
        cfg = config_from_mapping(raw, env={})
    except ConfigError as err:
        assert str(err)  # one precise message
        return
    assert cfg.durable_period % cfg.local_checkpoint_period == 0
    assert cfg.local_checkpoint_directory


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_parse_step_accepts_only_canonical_names(name: str) -> None:
    ref = parse_step(name)
    if ref is not None:
        assert 0 <= ref.step <= MAX_STEP
        assert step_name(ref.step) == name  # canonical: round-trips exactly


@given(st.integers(min_value=0, max_value=MAX_STEP))
def test_step_names_round_trip(step: int) -> None:
    ref = parse_step(step_name(step))
    assert ref is not None and ref.step == step


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parse_restore_never_crashes(name: str) -> None:
    ref = parse_restore(name)
    if ref is not None:
        assert restore_name(ref.job, ref.step, node=ref.node, worker=ref.worker) == name


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_replicator_yaml_parser_only_raises_its_own_error(text: str) -> None:
    try:
        parse_replicator_yaml(text, local_period=10)
    except ReplicatorConfigError as err:
        assert str(err)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("job-name: [unterminated", "not valid YAML"),
        ("- a list", "must be a mapping"),
        ("job-name: j\nnodes: 1\nnode-rank: 0\n", "exactly one of"),
        ("job-name: j\nnodes: 1\nnode-rank: 0\nbackup-interval-steps: -5\n", ">= 1"),
        ("job-name: j\nnodes: 0\nnode-rank: 0\nbackup-interval-steps: 5\n", "nodes must be"),
        ("job-name: ''\nnodes: 1\nnode-rank: 0\nbackup-interval-steps: 5\n", "job-name"),
        ("job-name: ../x\nnodes: 1\nnode-rank: 0\nbackup-interval-steps: 5\n", "job-name"),
        (
            "job-name: j\nnodes: 1\nnode-rank: 0\nbackup-interval-minutes: 1\n"
            "backup-interval-steps: 5\n",
            "exactly one of",
        ),
        (
            "job-name: j\nnodes: 2\nnode-rank: 0\npeer-ranks: [7]\nbackup-interval-steps: 5\n",
            "peer-ranks",
        ),
        (
            "job-name: j\nframework: pytorch\nnodes: 1\nnode-rank: 0\nbackup-interval-steps: 5\n",
            "framework",
        ),
    ],
)
def test_garbage_replicator_yaml_is_fatal_with_reason(text: str, reason: str) -> None:
    with pytest.raises(ReplicatorConfigError, match=reason.replace("[", r"\[")):
        parse_replicator_yaml(text, local_period=10)


def test_recoverable_replicator_problems_are_warnings() -> None:
    cfg = parse_replicator_yaml(
        "job-name: j\nnodes: 1\nnode-rank: 0\nbackup-interval-steps: 15\nextra: 1\n",
        local_period=10,
    )
    assert cfg.backup_interval_steps == 15
    assert any("not a multiple" in w for w in cfg.warnings)
    assert any("unknown key 'extra'" in w for w in cfg.warnings)

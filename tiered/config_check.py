"""A mapping (a parsed YAML file, the environment) made into a ``TieredConfig``: every problem
of the keys and values reported at once, each under where its value came from, then the
cross-field rules, each naming the key to change.

Above ``tiered.config``, which holds the settings model alone.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tiered.config import ENV_PREFIX, TieredConfig, TieredSettings
from tiered.config_problems import (
    Key,
    Problems,
    describe,
    env_origins,
    misspelt_section,
    near_miss,
    nearest,
)
from tiered.errors import ConfigError
from tiered.urls import PROTOCOL_PACKAGES, installed_protocols

log = logging.getLogger("tiered.config")


def parse_scalar(value: str) -> Any:
    try:
        return yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        return value


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    top_keys = set(TieredConfig.model_fields) - {"tiered"}
    section_keys = set(TieredSettings.model_fields)
    section = dict(raw.get("tiered") or {})
    out = dict(raw)
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key in top_keys:
            out[key] = parse_scalar(value)
        elif key in section_keys:
            section[key] = parse_scalar(value)
    if section:
        out["tiered"] = section
    return out


# Keys that changed meaning: refused with what to write instead, never reinterpreted.
_RENAMED = {
    "upload_bandwidth_mbps": "was in megabits per second; it is now "
    "tiered.upload_bandwidth_mb_per_s, in megabytes per second as the logs print them "
    "(divide by 8: 400 Mbit/s is 50)",
}


def config_from_mapping(
    raw: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    source: str = "config",
    origins: Mapping[Key, str] | None = None,
    maxtext: bool = False,
) -> TieredConfig:
    """Validate a mapping (a parsed YAML file) plus environment overrides. Every problem of
    the keys and values is reported at once, each under where its value came from (``origins``:
    ``file:line`` of each key, or an override; the environment's variables are found here); a
    cross-field rule is checked once the values themselves are valid. ``maxtext``: the keys
    came from MaxText's own config, so a fix names MaxText's keys."""
    environ = env if env is not None else {}
    top_keys = set(TieredConfig.model_fields) - {"tiered"}
    section_keys = set(TieredSettings.model_fields)
    problems = Problems(
        source,
        {**(origins or {}), **env_origins(environ, ENV_PREFIX, top_keys, section_keys)},
    )
    data = dict(raw)
    section = data.get("tiered")
    if section is not None and not isinstance(section, dict):
        problems.add(("tiered",), f"tiered: must be a mapping, got {describe(section)}")
        raise ConfigError(problems.render())
    for key, value in data.items():
        if misspelt_section(key, value):
            problems.add(
                (str(key),),
                f"{key!r} is not a section tiered reads; did you mean 'tiered:'? (the "
                f"{'setting' if len(value) == 1 else f'{len(value)} settings'} under it would "
                "be ignored)",
            )
    if isinstance(section, dict):
        for key in section:
            if key in _RENAMED:
                problems.add(("tiered", str(key)), f"tiered.{key} {_RENAMED[key]}")
            elif key not in section_keys:
                problems.add(
                    ("tiered", str(key)),
                    f"unknown key tiered.{key}{nearest(str(key), section_keys)}",
                )
    for key in data:
        near = near_miss(str(key), top_keys)
        if near is not None:
            log.warning(
                "%s: %r is not a key tiered knows, and is one edit away from %r: a typo? "
                "(it is ignored)",
                problems.where((str(key),)),
                key,
                near,
            )
    data = _apply_env(data, environ)
    known = {k: v for k, v in data.items() if k in TieredConfig.model_fields}
    if isinstance(known.get("tiered"), dict):
        known["tiered"] = {k: v for k, v in known["tiered"].items() if k in section_keys}
    try:
        cfg = TieredConfig.model_validate(known)
    except ValidationError as err:
        problems.add_validation(err)
        raise ConfigError(problems.render()) from None
    if problems.found:
        raise ConfigError(problems.render())
    try:
        check_consistency(cfg, maxtext=maxtext)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


def check_consistency(cfg: TieredConfig, *, maxtext: bool = False) -> None:
    """Cross-field rules. Each failure names the key to change."""
    if not cfg.local_checkpoint_directory:
        raise ConfigError(
            "local_checkpoint_directory is not set: tiered needs a node-local directory "
            "(SSD or RAM disk) for the fast tier"
        )
    local_scheme = cfg.local_checkpoint_directory.partition("://")[0]
    if "://" in cfg.local_checkpoint_directory and local_scheme != "file":
        raise ConfigError(
            f"local_checkpoint_directory must be a local path, got "
            f"{cfg.local_checkpoint_directory!r}"
        )
    if not cfg.checkpoint_dir and not (cfg.base_output_directory and cfg.run_name):
        # MaxText refuses a checkpoint_dir key: its durable directory is always derived.
        missing = " and ".join(
            k for k in ("base_output_directory", "run_name") if not getattr(cfg, k)
        )
        raise ConfigError(
            f"the durable directory cannot be derived: set {missing} in MaxText's config "
            f"(or as {missing.split(' and ')[0]}=... on its command line); MaxText writes "
            "checkpoints to <base_output_directory>/<run_name>/checkpoints"
            if maxtext
            else "checkpoint_dir is not set, and it cannot be derived: set checkpoint_dir, or "
            "both base_output_directory and run_name"
        )
    for key in ("checkpoint_period", "local_checkpoint_period"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key} must be a positive number of steps, got {getattr(cfg, key)}")
    steps = cfg.multi_tier_checkpointing_backup_interval_steps
    minutes = cfg.multi_tier_checkpointing_backup_interval_minutes
    if steps is not None and steps < 0:
        raise ConfigError(
            f"multi_tier_checkpointing_backup_interval_steps must be positive, got {steps}"
        )
    if minutes is not None and not math.isfinite(minutes):
        raise ConfigError(
            f"multi_tier_checkpointing_backup_interval_minutes must be a finite number, got "
            f"{minutes}"
        )
    if minutes is not None and minutes < 0:
        raise ConfigError(
            f"multi_tier_checkpointing_backup_interval_minutes must be positive, got {minutes}"
        )
    if steps and minutes:
        raise ConfigError(
            "multi_tier_checkpointing_backup_interval_steps and "
            "multi_tier_checkpointing_backup_interval_minutes are both set: choose one"
        )
    period_key = "multi_tier_checkpointing_backup_interval_steps" if steps else "checkpoint_period"
    if cfg.durable_period % cfg.local_checkpoint_period:
        raise ConfigError(
            f"{period_key} ({cfg.durable_period}) is not a multiple of local_checkpoint_period "
            f"({cfg.local_checkpoint_period}): the steps it names would never exist locally"
        )
    keep_period = cfg.tiered.keep_period
    if keep_period is not None and keep_period % cfg.durable_period:
        raise ConfigError(
            f"tiered.keep_period ({keep_period}) is not a multiple of {period_key} "
            f"({cfg.durable_period}): the steps it keeps would never be durable"
        )
    keep = cfg.max_num_checkpoints_to_keep
    if keep is not None and keep < 1:
        raise ConfigError(f"max_num_checkpoints_to_keep must be at least 1 or null, got {keep}")
    if cfg.tiered.node_rank >= cfg.tiered.num_nodes:
        raise ConfigError(
            f"tiered.node_rank ({cfg.tiered.node_rank}) must be below tiered.num_nodes "
            f"({cfg.tiered.num_nodes})"
        )
    check_tiers_apart(cfg)
    check_peers(cfg)
    scheme = cfg.durable_url.partition("://")[0]
    installed = installed_protocols()
    if scheme not in installed:
        hint = PROTOCOL_PACKAGES.get(scheme)
        extra = f" (install {hint})" if hint else ""
        raise ConfigError(
            f"checkpoint_dir {cfg.durable_url!r}: unsupported URL scheme {scheme + '://'!r}"
            f"{extra}; installed fsspec protocols: {', '.join(installed)}"
        )


def check_peers(cfg: TieredConfig) -> None:
    t = cfg.tiered
    if not cfg.peering:
        return
    if not t.peer_secret_file:
        raise ConfigError(
            "tiered.peer_addresses is set but tiered.peer_secret_file is not: peers must "
            "authenticate with a shared secret (mount one from a Kubernetes Secret)"
        )
    nodes = t.num_nodes
    if isinstance(t.peer_addresses, list) and nodes > 1 and len(t.peer_addresses) != nodes:
        raise ConfigError(
            f"tiered.peer_addresses lists {len(t.peer_addresses)} addresses, and "
            f"tiered.num_nodes is {nodes}: give one per node, in rank order"
        )
    for p in t.peers or []:
        if nodes > 1 and not 0 <= p < nodes:
            raise ConfigError(f"tiered.peers: rank {p} is not a node of {nodes}")
        if nodes > 1 and p == t.node_rank:
            raise ConfigError(f"tiered.peers: node {p} cannot keep a copy of its own steps")


def check_tiers_apart(cfg: TieredConfig) -> None:
    """The two tiers may not be one directory, nor one inside the other: every local step would
    then "be durable", nothing would be uploaded, and local retention would delete due steps."""
    scheme, _, rest = cfg.durable_url.partition("://")
    if scheme != "file":
        return
    local = os.path.realpath(cfg.local_dir)
    durable = os.path.realpath(rest)
    durable_key = (
        "checkpoint_dir"
        if cfg.checkpoint_dir
        else "checkpoint_dir (from base_output_directory and run_name)"
    )
    where = None
    if local == durable:
        where = "are the same directory"
    elif Path(durable).is_relative_to(local):
        where = "overlap: the durable tier is inside the local one"
    elif Path(local).is_relative_to(durable):
        where = "overlap: the local tier is inside the durable one"
    if where:
        raise ConfigError(
            f"local_checkpoint_directory ({local}) and {durable_key} ({durable}) {where}; the "
            "two tiers must be separate directories"
        )

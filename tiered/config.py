"""Configuration: MaxText's checkpointing keys, plus tiered's own settings.

Two ways in, one model:

- **The native API** reads one file: MaxText's key names at the top level (anything else there is
  ignored) and tiered's own settings under a ``tiered:`` section.
- **MaxText** refuses any key it does not know, so its file can hold only its own keys. The
  daemon reads that file as MaxText does (``--maxtext-config FILE``, following ``base_config``,
  then MaxText's ``key=value`` overrides), and takes its own settings from a second file
  (``--config tiered.yml``) that may hold only the ``tiered:`` section.

``TIERED_<KEY>`` environment variables override both (``TIERED_CHECKPOINT_PERIOD=100``,
``TIERED_LOCAL_MAX_TO_KEEP=3``); values are parsed as YAML scalars, as MaxText parses its
overrides. An unknown key in the ``tiered:`` section is an error that suggests the nearest valid
one; a top-level key one edit away from a MaxText checkpointing key is warned about.

Every error is a ``ConfigError`` whose message names the offending key. This module validates
a mapping and the environment mapping it is given; ``tiered.config_files`` reads the files.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
from tiered.types import Topology
from tiered.urls import PROTOCOL_PACKAGES, installed_protocols, normalize_url, strip_file_scheme

log = logging.getLogger(__name__)

ENV_PREFIX = "TIERED_"


class TieredSettings(BaseModel):
    """The ``tiered:`` section: settings MaxText has no name for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local_max_to_keep: int = Field(2, ge=1)
    keep_period: int | None = Field(None, gt=0)
    status_address: str = "127.0.0.1:8477"
    upload_concurrency: int = Field(8, ge=1, le=256)
    download_concurrency: int = Field(8, ge=1, le=256)
    durable_restore: Literal["store", "verify_first"] = "store"
    """How the training API restores a step only the durable tier holds. ``store``: when the
    store keeps a checksum per object (GCS) and every one equals the manifest's, orbax reads
    the step straight from the durable tier and the local copy is filled in the background;
    otherwise as ``verify_first``: download, verify every byte, then load the local copy."""
    min_free_local_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    shutdown_grace_seconds: float = Field(120.0, gt=0)
    rescan_seconds: float = Field(30.0, gt=0)
    prune_interval_seconds: float = Field(60.0, gt=0)
    backlog: Literal["all", "newest"] = "all"
    retry_initial_seconds: float = Field(1.0, gt=0)
    retry_max_seconds: float = Field(60.0, gt=0)
    retry_attempts: int = Field(6, ge=1)
    unhealthy_after_seconds: float = Field(900.0, gt=0)
    upload_bandwidth_mb_per_s: float | None = Field(None, gt=0)
    """Cap on the daemon's uploads, in megabytes (10**6 bytes) per second: the unit the logs
    and the status print."""
    transfer_pacing: float | None = Field(0.5, gt=0, le=1)
    """With no cap, a periodic upload goes just fast enough to end within this share of the
    time until the next durable step (a copy to a peer: until the next local step), from the
    trainer's step time; preemption and final steps go at full speed. null: full speed always."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    mtc_protocol: bool | None = None
    write_jax_init_info: bool = False
    coordinator_address: str | None = None
    process_id: int | None = Field(None, ge=0)
    node_rank: int = Field(0, ge=0)
    num_nodes: int = Field(1, ge=1)
    restore_agreement_timeout_seconds: float = Field(600.0, gt=0)
    local_compression: bool = False
    final_after_idle_seconds: float | None = Field(900.0, gt=0)
    local_capacity: int | None = None
    """Bytes the local tier may use (``200Gi``, ``50G``, ``1048576``): free space is measured
    against it instead of the filesystem's figure, which an emptyDir ``sizeLimit`` or a quota
    does not change."""
    durable_timeout_seconds: float = Field(60.0, gt=0)
    daemon_nice: int = Field(10, ge=0, le=19)
    log_format: Literal["text", "json"] = "text"
    peer_addresses: list[str] | str | None = None
    """Every node's peer server, ``host:port``: a list in rank order, or one template with
    ``{rank}`` (``job-{rank}.job.default.svc:8478``). Setting it turns peer replication on."""
    peers: list[int] | None = None
    """The ranks this node sends its steps to (default: the next node in a ring, or orbax's
    ``peer-ranks``)."""
    peer_listen_address: str | None = None
    """Where the peer server binds (default: every interface, on this node's port)."""
    peer_secret_file: str | None = None
    """A file holding the job's shared secret (at least 16 bytes): peers must present it."""
    peer_bandwidth_mb_per_s: float | None = Field(None, gt=0)
    """Cap on the replication this node sends, in megabytes per second."""
    peer_keep: int = Field(2, ge=1)
    """How many of each partner's newest steps this node keeps."""
    peer_timeout_seconds: float = Field(30.0, gt=0)

    @field_validator("local_capacity", mode="before")
    @classmethod
    def _bytes(cls, value: object) -> object:
        return parse_bytes(value) if isinstance(value, str) else value

    @field_validator("local_capacity")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(f"must be a positive size, got {value}")
        return value

    @field_validator("status_address", "peer_listen_address")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            check_host_port(value)
        return value

    @field_validator("peer_addresses")
    @classmethod
    def _peer_addresses(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, str):
            if "{rank}" not in value:
                raise ValueError(
                    f"a single address must be a template with {{rank}}, got {value!r}; "
                    "or give a list of every node's HOST:PORT in rank order"
                )
            try:
                check_host_port(value.format(rank=0))
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"{value!r}: {err}") from None
        elif value is not None:
            if not value:
                raise ValueError("an empty list: give every node's HOST:PORT, in rank order")
            for address in value:
                check_host_port(address)
            if len(set(value)) != len(value):
                raise ValueError(f"the same address twice: {value}")
        return value


def check_host_port(value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")


class TieredConfig(BaseModel):
    """The whole configuration. Field names are MaxText's."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    run_name: str = ""
    base_output_directory: str = ""
    checkpoint_dir: str = ""
    enable_checkpointing: bool = True
    async_checkpointing: bool = True
    checkpoint_period: int = 5000
    save_checkpoint_on_completion: bool = True
    enable_multi_tier_checkpointing: bool = False
    local_checkpoint_directory: str = ""
    local_checkpoint_period: int = 1000
    multi_tier_checkpointing_backup_interval_minutes: float | None = None
    multi_tier_checkpointing_backup_interval_steps: int | None = None
    max_num_checkpoints_to_keep: int | None = None
    enable_autocheckpoint: bool = False
    """MaxText saves when JAX's preemption notifier reports SIGTERM (its preemption step)."""
    steps: int | None = None
    """MaxText's run length: step ``steps - 1`` is the run's final save."""
    tiered: TieredSettings = Field(default_factory=TieredSettings)  # type: ignore[arg-type]

    # -- derived values -------------------------------------------------------------------------

    @property
    def local_dir(self) -> Path:
        return Path(strip_file_scheme(self.local_checkpoint_directory)).expanduser().absolute()

    @property
    def topology(self) -> Topology:
        """Which node this process is, of how many (``tiered.node_rank``, ``tiered.num_nodes``)."""
        return Topology(self.tiered.node_rank, self.tiered.num_nodes)

    @property
    def durable_url(self) -> str:
        """The durable tier's URL, always with a scheme (``file://`` for plain paths)."""
        raw = self.checkpoint_dir or (
            f"{self.base_output_directory.rstrip('/')}/{self.run_name}/checkpoints"
        )
        return normalize_url(raw)

    @property
    def durable_period(self) -> int:
        """Steps that are multiples of this are promoted."""
        return self.multi_tier_checkpointing_backup_interval_steps or self.checkpoint_period

    @property
    def backup_interval_seconds(self) -> float | None:
        minutes = self.multi_tier_checkpointing_backup_interval_minutes
        return minutes * 60.0 if minutes else None

    @property
    def peering(self) -> bool:
        """Whether the nodes replicate their local steps to each other."""
        return self.tiered.peer_addresses is not None

    @property
    def saves_on_sigterm(self) -> bool:  # MaxText: only with enable_autocheckpoint
        return not self.speaks_mtc or self.enable_autocheckpoint

    @property
    def speaks_mtc(self) -> bool:
        """Whether the daemon answers orbax's replicator protocol in the local directory."""
        if self.tiered.mtc_protocol is not None:
            return self.tiered.mtc_protocol
        return self.enable_multi_tier_checkpointing

    def with_durable_period(self, *, steps: int | None, minutes: float | None) -> TieredConfig:
        """A copy whose backup interval comes from ``replicator.yaml``."""
        return self.model_copy(
            update={
                "multi_tier_checkpointing_backup_interval_steps": steps,
                "multi_tier_checkpointing_backup_interval_minutes": minutes,
            }
        )


_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_bytes(text: str) -> int:
    """``200Gi``, ``50G``, ``1.5Ti``, ``1048576``: Kubernetes' quantities, in bytes."""
    raw = text.strip()
    number = raw.rstrip("KMGTiBkmgtb")
    unit = raw[len(number) :].lower().removesuffix("b")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"expected a size such as 200Gi or 50G, got {text!r}") from None
    if unit not in _UNITS or not math.isfinite(value):
        raise ValueError(f"expected a size such as 200Gi or 50G, got {text!r}")
    return int(value * _UNITS[unit])


def _check_consistency(cfg: TieredConfig, *, maxtext: bool = False) -> None:
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
    _check_tiers_apart(cfg)
    _check_peers(cfg)
    scheme = cfg.durable_url.partition("://")[0]
    installed = installed_protocols()
    if scheme not in installed:
        hint = PROTOCOL_PACKAGES.get(scheme)
        extra = f" (install {hint})" if hint else ""
        raise ConfigError(
            f"checkpoint_dir {cfg.durable_url!r}: unsupported URL scheme {scheme + '://'!r}"
            f"{extra}; installed fsspec protocols: {', '.join(installed)}"
        )


def _check_peers(cfg: TieredConfig) -> None:
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


def _check_tiers_apart(cfg: TieredConfig) -> None:
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
        _check_consistency(cfg, maxtext=maxtext)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg

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

Every error is a ``ConfigError`` whose message names the offending key. This module is the
model; ``tiered.config_check`` validates a mapping and the environment against it, and
``tiered.config_files`` reads the files.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tiered.types import Topology
from tiered.urls import normalize_url, strip_file_scheme

log = logging.getLogger(__name__)

ENV_PREFIX = "TIERED_"


class TieredSettings(BaseModel):
    """The ``tiered:`` section: settings MaxText has no name for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local_max_to_keep: int = Field(2, ge=1)
    """Newest local steps kept (pinned steps are kept too)."""
    keep_period: int | None = Field(None, gt=0)
    """Durable multiples of this are kept forever; a multiple of the durable period."""
    status_address: str = "127.0.0.1:8477"
    """Where the daemon serves HTTP ``/status``, ``/metrics``, ``/healthz`` (liveness) and
    ``/readyz`` (readiness)."""
    tensorboard_dir: str | None = None
    """A directory where the daemon writes TensorBoard scalars (``checkpoint/...``, as
    ``tiered.integrations`` logs them) each time a step commits on either tier, keyed by the
    newest local step: MaxText's ``tensorboard_dir`` puts them beside its loss. Needs
    ``tiered[tensorboard]``; unset: none are written."""
    upload_concurrency: int = Field(8, ge=1, le=256)
    """Files uploaded at once per step."""
    download_concurrency: int = Field(8, ge=1, le=256)
    """Files downloaded at once per step."""
    durable_restore: Literal["store", "verify_first"] = "store"
    """How the training API restores a step only the durable tier holds. ``store``: when the
    store keeps a checksum per object (GCS's crc32c) and every one equals the manifest's (the
    few small OCDBT files are read back for their xxh3), orbax reads the step in place and the
    local copy is downloaded and verified in the background (``close()`` waits for it);
    anywhere else (``file://``, S3 as tiered uploads) as ``verify_first``. ``verify_first``:
    download, checksum every byte on this node, then load; it also catches a store that returns
    other bytes than it checksummed."""
    min_free_local_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """Below this free fraction the local tier shrinks to the minimum."""
    shutdown_grace_seconds: float = Field(120.0, gt=0)
    """SIGTERM drain budget."""
    rescan_seconds: float = Field(30.0, gt=0)
    """Full rescan period (inotify events are only hints)."""
    prune_interval_seconds: float = Field(60.0, gt=0)
    """The loop runs at least this often (pruning happens every cycle, as soon as the plan
    names a step)."""
    backlog: Literal["all", "newest"] = "all"
    """``newest``: when behind, skip older due steps (shown as ``skipped``)."""
    retry_initial_seconds: float = Field(1.0, gt=0)
    """First backoff for transient errors (full jitter)."""
    retry_max_seconds: float = Field(60.0, gt=0)
    """Longest backoff for transient errors."""
    retry_attempts: int = Field(6, ge=1)
    """Tries of a transient error before it counts as a failure."""
    unhealthy_after_seconds: float = Field(900.0, gt=0)
    """``/readyz`` turns 503 once promotion has failed this long (``/healthz`` is liveness: 503
    only when the daemon's loop stalls)."""
    upload_bandwidth_mb_per_s: float | None = Field(None, gt=0)
    """Cap on the daemon's uploads, in megabytes (10**6 bytes) per second: the unit the logs
    and the status print. Replaces ``upload_bandwidth_mbps`` (megabits), refused with the
    conversion (400 Mbit/s is 50)."""
    transfer_pacing: float | None = Field(0.5, gt=0, le=1)
    """With no cap, a periodic upload goes just fast enough to end within this share of the
    time until the next durable step (``checkpoint_period`` times the trainer's step time, which
    ``tiered.CheckpointManager`` records with each save, or the spacing of the last two local
    steps), never slower than 2 MB/s, and at 25 MB/s until a step time is known; a copy to a
    peer is paced to the local period. Preemption and final steps go at full speed, and a paced
    transfer speeds up when one is waiting, the run ends or the daemon stops. ``null``: full
    speed always (docs/benchmarks.md's interference row shows what that costs)."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """Passed to the fsspec filesystem (``token``, ``endpoint_url``, ...)."""
    mtc_protocol: bool | None = None
    """Force orbax's replicator protocol on or off (default: follows
    ``enable_multi_tier_checkpointing``)."""
    write_jax_init_info: bool = False
    """Write ``jax-init-info.txt`` for orbax's multi-tier client."""
    coordinator_address: str | None = None
    """The JAX coordinator, ``HOST:PORT``, written to ``jax-init-info.txt``."""
    process_id: int | None = Field(None, ge=0)
    """The process id written to ``jax-init-info.txt`` (default: ``node_rank``)."""
    node_rank: int = Field(0, ge=0)
    """This host's index; set it on every host, for the trainer and the daemon."""
    num_nodes: int = Field(1, ge=1)
    """How many hosts the job has."""
    restore_agreement_timeout_seconds: float = Field(600.0, gt=0)
    """How long a multi-node restore waits for every node to ask."""
    local_compression: bool = False
    """zstd for local saves made by ``tiered.CheckpointManager``: most of a save's host CPU,
    paid every local period (0.6 s instead of 0.1 s for 256 MB of random float32). Turn it on
    when the state compresses well or local disk is tight."""
    local_data_file_size: int = 256 * 2**20
    """Target size of each data file of a local save (``256Mi``; orbax's own default is
    ``2Gi``): the OCDBT writer starts writing a file, and its fsync, once this much of the state
    is queued, so with several files the copy into the page cache runs on every core and
    overlaps the flushes of the files before it. A 1 GiB save took 0.67 s instead of 1.12 s
    (``dd`` with direct I/O on the same disk: 0.66 s; docs/benchmarks.md, section 6); the
    blocking part of a save is unchanged and plain orbax reads the steps as before. Arrays
    larger than this are stored in chunks of at most this size."""
    dedup: bool = True
    """With several nodes, each OCDBT key of a durable step is uploaded by one of the nodes that
    hold it, so replicated state is stored and uploaded once, not once per node
    (docs/multinode.md, "Each byte once"); needs tensorstore (the ``merge`` extra) beside every
    daemon, and falls back to each node uploading all it holds where one lacks it. Off: every
    node uploads all it holds, as tiered 0.3 did."""
    dedup_wait_seconds: float = Field(60.0, gt=0)
    """How long node 0 waits for every node's index of a step before it plans without the late
    ones (they upload all they hold); the others wait 30 s more for their plan."""
    final_after_idle_seconds: float | None = Field(900.0, gt=0)
    """With no trainer lock to tell and no JAX coordinator to watch, a run that saved nothing
    for this long and three of its usual save intervals counts as over: its newest local step
    is promoted as ``final``."""
    local_capacity: int | None = None
    """Bytes the local tier may use (``200Gi``, ``50G``, ``1048576``): free space is measured
    against it instead of the filesystem's figure, which an emptyDir ``sizeLimit`` or a quota
    does not change."""
    durable_timeout_seconds: float = Field(60.0, gt=0)
    """How long the daemon waits for one listing of the durable tier before it calls the tier
    unreachable (``tiered status`` waits ``--timeout``, 5 s by default)."""
    daemon_nice: int = Field(10, ge=0, le=19)
    """The daemon lowers its CPU priority to this nice value before it starts any thread; ``0``
    leaves it as started. On Kubernetes the sidecar's ``resources.requests.cpu`` sets its
    share."""
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object per line, with ``time``, ``level``, ``logger``, ``message``,
    and for the events a pipeline filters on ``event``, ``step``, ``tier``, ``bytes``,
    ``seconds``."""
    peer_addresses: list[str] | str | None = None
    """Every node's peer server, ``HOST:PORT``: a list in rank order, or one template with
    ``{rank}`` (``job-{rank}.job.default.svc:8478``). Setting it turns peer replication on."""
    peers: list[int] | None = None
    """The ranks this node sends its steps to (default: the next node in a ring, or orbax's
    ``peer-ranks``)."""
    peer_listen_address: str | None = None
    """Where the peer server binds (default: every interface, on this node's port)."""
    peer_secret_file: str | None = None
    """A file holding the job's shared secret (at least 16 bytes; ``openssl rand -hex 32``):
    every peer request is signed with it. Required with peers."""
    peer_bandwidth_mb_per_s: float | None = Field(None, gt=0)
    """Cap on the replication this node sends, in megabytes per second."""
    peer_keep: int = Field(2, ge=1)
    """How many of each partner's newest steps this node keeps."""
    peer_timeout_seconds: float = Field(30.0, gt=0)
    """A peer silent this long mid-request is dropped."""

    @field_validator("local_capacity", "local_data_file_size", mode="before")
    @classmethod
    def _bytes(cls, value: object) -> object:
        return parse_bytes(value) if isinstance(value, str) else value

    @field_validator("local_capacity", "local_data_file_size")
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
    """With ``base_output_directory``, names the durable directory."""
    base_output_directory: str = ""
    """The durable tier, when ``checkpoint_dir`` is unset:
    ``{base_output_directory}/{run_name}/checkpoints`` (with MaxText, always)."""
    checkpoint_dir: str = ""
    """The durable tier's URL (``gs://``, ``s3://``, ``file://``, a plain path); derived from
    ``base_output_directory`` and ``run_name`` when unset. MaxText has no such key."""
    enable_checkpointing: bool = True
    """``false`` makes ``save`` a no-op."""
    async_checkpointing: bool = True
    """Periodic local saves return at once."""
    checkpoint_period: int = 5000
    """The durable period: steps that are multiples of it are promoted."""
    save_checkpoint_on_completion: bool = True
    """``save(..., final=True)`` writes a final checkpoint."""
    enable_multi_tier_checkpointing: bool = False
    """The daemon answers orbax's replicator protocol."""
    local_checkpoint_directory: str = ""
    """Node-local directory (SSD or RAM disk) for the fast tier. Required."""
    local_checkpoint_period: int = 1000
    """The local save period; it must divide the durable period."""
    multi_tier_checkpointing_backup_interval_minutes: float | None = None
    """Time-based promotion (not with the steps interval)."""
    multi_tier_checkpointing_backup_interval_steps: int | None = None
    """Overrides ``checkpoint_period`` (orbax's ``replicator.yaml`` sets it for the daemon)."""
    max_num_checkpoints_to_keep: int | None = None
    """Newest durable steps kept (``null``: all)."""
    enable_autocheckpoint: bool = False
    """MaxText saves a step when SIGTERM arrives (JAX's preemption notifier); ``tiered status``
    counts a preemption as free only with it."""
    steps: int | None = None
    """MaxText's run length: step ``steps - 1`` is the run's final save (a reason-less step off
    the local period is otherwise taken as the preemption save, and promoted at once)."""
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

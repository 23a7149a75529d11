"""orbax's multi-tier checkpointing protocol: the daemon as the "replicator service".

The client side lives in orbax (``multi_tier_checkpointing/initialization.py``):
1. it may wait for ``jax-init-info.txt`` (line 1: process id, line 2: coordinator address);
2. it writes ``replicator.yaml`` atomically and waits for the service to delete it;
3. it then reads ``replicator.errors`` (logged) and ``replicator.failed`` (raises);
4. it waits for one ``{job}-s{step}-n{node}-w{worker}.restore`` entry: a symlink to a step
   directory, which it renames to ``<step>`` and restores, or an empty file with step 0 meaning
   "no checkpoint, start fresh".

Our side: validate and consume ``replicator.yaml`` (adopting its backup interval and the job's
shape), then answer with the restore step the planner chose (``tiered.policy.restore_options``,
or the nodes' agreement): a local step is moved into ``.tiered/staging`` first, so the client's
rename of the link to ``<step>`` can never collide with an existing directory, and a durable
step is downloaded and verified there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tiered import LocalTier, ReplicatorConfigError
from tiered.sidecar import (
    JAX_INIT_INFO,
    REPLICATOR_ERRORS,
    REPLICATOR_FAILED,
    REPLICATOR_FILE,
    RESTORE_SUFFIX,
    Topology,
    parse_restore,
    publish_file,
    restore_name,
    staging_path,
)

log = logging.getLogger(__name__)

_KNOWN_KEYS = {
    "job-name",
    "framework",
    "assume-data-parallelism",
    "node-rank",
    "nodes",
    "peer-ranks",
    "backup-interval-minutes",
    "backup-interval-steps",
}


@dataclass(frozen=True)
class ReplicatorConfig:
    job_name: str
    node_rank: int
    nodes: int
    peer_ranks: tuple[int, ...]
    backup_interval_minutes: float | None
    backup_interval_steps: int | None
    warnings: tuple[str, ...] = ()


def _int(data: dict[str, Any], key: str, *, minimum: int) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ReplicatorConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_replicator_yaml(text: str, *, local_period: int) -> ReplicatorConfig:
    """Validate the client's file. Fatal problems raise; recoverable ones become warnings."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ReplicatorConfigError(f"{REPLICATOR_FILE} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ReplicatorConfigError(f"{REPLICATOR_FILE} must be a mapping, got {data!r}")
    warnings = [f"unknown key {k!r} ignored" for k in sorted(set(data) - _KNOWN_KEYS, key=str)]
    job = data.get("job-name")
    if not isinstance(job, str) or not job.strip() or "/" in job:
        raise ReplicatorConfigError(f"job-name must be a non-empty name, got {job!r}")
    nodes = _int(data, "nodes", minimum=1)
    rank = _int(data, "node-rank", minimum=0)
    if rank >= nodes:
        raise ReplicatorConfigError(f"node-rank {rank} must be below nodes {nodes}")
    peers = data.get("peer-ranks", [])
    if not isinstance(peers, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) and 0 <= p < nodes for p in peers
    ):
        raise ReplicatorConfigError(f"peer-ranks must be a list of ranks below {nodes}: {peers!r}")
    framework = data.get("framework", "orbax")
    if framework != "orbax":
        raise ReplicatorConfigError(f"framework {framework!r} is not supported (only orbax)")
    minutes = data.get("backup-interval-minutes")
    steps = data.get("backup-interval-steps")
    if (minutes is None) == (steps is None):
        raise ReplicatorConfigError(
            "exactly one of backup-interval-minutes or backup-interval-steps must be set"
        )
    if minutes is not None and (
        isinstance(minutes, bool) or not isinstance(minutes, int | float) or minutes <= 0
    ):
        raise ReplicatorConfigError(f"backup-interval-minutes must be > 0, got {minutes!r}")
    if steps is not None:
        steps = _int(data, "backup-interval-steps", minimum=1)
        if steps % local_period:
            warnings.append(
                f"backup-interval-steps {steps} is not a multiple of local_checkpoint_period "
                f"{local_period}: only steps saved locally can be backed up"
            )
    return ReplicatorConfig(
        job_name=job.strip(),
        node_rank=rank,
        nodes=nodes,
        peer_ranks=tuple(peers),
        backup_interval_minutes=float(minutes) if minutes is not None else None,
        backup_interval_steps=steps,
        warnings=tuple(warnings),
    )


def _write_atomic(path: Path, text: str) -> None:
    publish_file(path, text.encode())


class MtcProtocol:
    """The service side of the replicator protocol: the files in the local directory.

    It owns no tier and decides nothing: the daemon's loop calls it to read the client's
    request, and to answer with the restore step the planner chose.
    """

    def __init__(
        self,
        root: Path,
        *,
        local_period: int,
        jax_init_info: tuple[int, str] | None,
        configured: Topology | None = None,
    ) -> None:
        self.root = root
        self.local_period = local_period
        self.jax_init_info = jax_init_info
        self.configured = configured
        self.active: ReplicatorConfig | None = None
        self.pending_restore: ReplicatorConfig | None = None

    @classmethod
    def for_config(cls, cfg: Any, root: Path) -> MtcProtocol | None:
        """The protocol a config asks for (``TieredConfig.speaks_mtc``), or None; with
        ``tiered.write_jax_init_info`` and a coordinator, the ``jax-init-info.txt`` to write."""
        if not cfg.speaks_mtc:
            return None
        t = cfg.tiered
        pid = t.process_id if t.process_id is not None else t.node_rank
        init = (
            (pid, t.coordinator_address)
            if t.write_jax_init_info and t.coordinator_address
            else None
        )
        return cls(
            root,
            local_period=cfg.local_checkpoint_period,
            jax_init_info=init,
            configured=cfg.topology,
        )

    def ensure_jax_init_info(self) -> None:
        """Write ``jax-init-info.txt`` when configured and missing (say, after a wipe)."""
        if self.jax_init_info is None or (self.root / JAX_INIT_INFO).exists():
            return
        pid, coordinator = self.jax_init_info
        _write_atomic(self.root / JAX_INIT_INFO, f"{pid}\n{coordinator}\n")
        log.info("Wrote %s (process %d, coordinator %s)", JAX_INIT_INFO, pid, coordinator)

    def coordinator_up(self) -> bool | None:
        """Whether the JAX coordinator of ``jax-init-info.txt`` accepts a TCP connection now;
        None when there is no such file (or it names no address)."""
        try:
            lines = (self.root / JAX_INIT_INFO).read_text().splitlines()
        except OSError:
            return None
        host, sep, port = (lines[1].strip() if len(lines) > 1 else "").rpartition(":")
        if not sep or not port.isdigit():
            return None
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=0.3).close()
        except OSError:
            return False
        return True

    def consume(self) -> ReplicatorConfig | None:
        """Validate and delete a new ``replicator.yaml``; return it when it is usable."""
        self.ensure_jax_init_info()
        path = self.root / REPLICATOR_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            cfg = parse_replicator_yaml(text, local_period=self.local_period)
        except ReplicatorConfigError as err:
            log.error("Rejected %s: %s", REPLICATOR_FILE, err)
            self.fail(str(err))
            path.unlink(missing_ok=True)
            return None
        if cfg.warnings:
            _write_atomic(
                self.root / REPLICATOR_ERRORS, "".join(f"tiered: {w}\n" for w in cfg.warnings)
            )
            for w in cfg.warnings:
                log.warning("%s: %s", REPLICATOR_FILE, w)
        configured = self.configured
        if (
            configured is not None
            and configured.multi
            and (cfg.nodes != configured.nodes or cfg.node_rank != configured.rank)
        ):
            reason = (
                f"{REPLICATOR_FILE} says node {cfg.node_rank} of {cfg.nodes}, but this daemon is "
                f"configured as node {configured.rank} of {configured.nodes} "
                "(tiered.node_rank / tiered.num_nodes)"
            )
            log.error("Rejected %s: %s", REPLICATOR_FILE, reason)
            self.fail(reason)
            path.unlink(missing_ok=True)
            return None
        path.unlink(missing_ok=True)
        interval = (
            f"every {cfg.backup_interval_steps} steps"
            if cfg.backup_interval_steps
            else f"every {cfg.backup_interval_minutes:g} minutes"
        )
        log.info(
            "Accepted %s for job %s (node %d of %d): durable backups %s",
            REPLICATOR_FILE,
            cfg.job_name,
            cfg.node_rank,
            cfg.nodes,
            interval,
        )
        self.active = cfg
        self.pending_restore = cfg
        self._clear_restore_entries()
        return cfg

    @property
    def topology(self) -> Topology | None:
        """The job's shape as the client told it; the daemon follows it."""
        cfg = self.active
        return Topology(cfg.node_rank, cfg.nodes) if cfg is not None else None

    def fail(self, reason: str) -> None:
        """Report a fatal problem to the client (which raises with this text)."""
        _write_atomic(self.root / REPLICATOR_FAILED, f"tiered: {reason}\n")
        self.pending_restore = None

    def _clear_restore_entries(self) -> None:
        for entry in self.root.iterdir():
            if entry.name.endswith(RESTORE_SUFFIX) and parse_restore(entry.name) is not None:
                entry.unlink()

    def offer_fresh(self) -> None:
        """Tell the client there is no checkpoint: it starts fresh."""
        cfg = self.pending_restore
        assert cfg is not None, "no restore request to answer"
        marker = self.root / restore_name(cfg.job_name, 0, node=cfg.node_rank)
        marker.touch(mode=0o644)
        log.info("No checkpoint on either tier: told the client to start fresh (%s)", marker.name)
        self.pending_restore = None

    def offer(self, step: int, *, source: str) -> None:
        """Point the client at the staged step ``.tiered/staging/<step>``."""
        cfg = self.pending_restore
        assert cfg is not None, "no restore request to answer"
        link = self.root / restore_name(cfg.job_name, step, node=cfg.node_rank)
        os.symlink(staging_path(step), link)
        log.info("Offered step %d (from the %s tier) to the client as %s", step, source, link.name)
        self.pending_restore = None

    def stage_local(self, local: LocalTier, step: int) -> None:
        """Move a local step into staging, so the client's rename of the link to ``<step>``
        can never collide with an existing directory."""
        current = local.step_dir(step)
        staged = self.root / staging_path(step)
        if current.is_symlink():
            # Already staged by an earlier restore: offer the same target, drop the old link.
            target = current.resolve()
            current.unlink()
            if target != staged.resolve():
                with contextlib.suppress(FileNotFoundError):
                    os.replace(target, staged)
            return
        staged.parent.mkdir(parents=True, exist_ok=True)
        if staged.is_symlink() or staged.is_file():
            staged.unlink()
        elif staged.exists():
            # A leftover from an interrupted restore: not a checkpoint anyone points to.
            shutil.rmtree(staged)
        os.replace(current, staged)

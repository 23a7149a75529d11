"""Operations shared by the CLI, the training API and the daemon: fetch, promote, delete.

Each one applies a single decision made elsewhere (by the caller or ``tiered.policy``) to the
tiers, and logs one line a user cares about.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tiered import faults
from tiered.config import TieredConfig
from tiered.coord import Decision, Rendezvous
from tiered.errors import StorageError, TieredError
from tiered.layout import (
    COMMIT_MARKER,
    GLOBAL_LAYOUT,
    ocdbt_roots,
    process_prefix,
    step_name,
    tmp_name,
)
from tiered.logs import fields, log_saved
from tiered.manifest import Manifest, check_file
from tiered.peering import recover_own
from tiered.policy import DISPLACED_KEEP, Delete, Snapshot, newer_than
from tiered.storage import DurableTier, LocalTier, Progress, TransferResult, copy_with_digest
from tiered.storage.merge import merge_roots
from tiered.storage.replicas import PeerStore
from tiered.storage.transfer import RateLimiter
from tiered.types import Reason, Topology
from tiered.units import human_bytes, human_rate

log = logging.getLogger(__name__)


def open_durable(
    cfg: TieredConfig, *, topology: Topology | None = None, concurrency: int | None = None
) -> DurableTier:
    """The durable tier a config names, for one node of a topology."""
    topo = topology or cfg.topology
    return DurableTier(
        cfg.durable_url,
        storage_options=cfg.tiered.storage_options,
        concurrency=concurrency or cfg.tiered.upload_concurrency,
        download_concurrency=cfg.tiered.download_concurrency,
        bandwidth_mb_per_s=cfg.tiered.upload_bandwidth_mb_per_s,
        topology=topo,
        dedup=cfg.tiered.dedup,
        dedup_wait=cfg.tiered.dedup_wait_seconds,
    )


def open_tiers(cfg: TieredConfig) -> tuple[LocalTier, DurableTier]:
    return LocalTier(cfg.local_dir), open_durable(cfg)


def snapshot(
    local: LocalTier, durable: DurableTier, *, now: float, with_size: bool = False
) -> Snapshot:
    """Both tiers as they are, with no daemon state (for the CLI)."""
    return Snapshot(
        now=now, local=tuple(local.scan(with_size=with_size)), durable=tuple(durable.scan())
    )


def promote_step(
    local: LocalTier,
    durable: DurableTier,
    step: int,
    *,
    progress: Progress | None = None,
    reason: Reason | None = None,
    limiter: RateLimiter | None = None,
) -> TransferResult:
    """Upload, verify and commit one committed local step at ``limiter``'s pace (default: the
    tier's cap); log one line.

    ``reason`` is what the planner owes the step for; it is recorded in the durable manifest
    when the trainer recorded none (MaxText's steps carry no reason).

    With several nodes this uploads this node's part under the current restore epoch; node 0
    then tries to commit at once (the last node to finish usually makes that succeed).
    """
    manifest = local.manifest(step)
    if reason is not None and manifest.reason == "unknown":
        manifest = replace(manifest, reason=reason)
    faults.hit("after-manifest")
    epoch = 0
    if durable.topology.multi:
        epoch = Rendezvous(durable).current_epoch()
    result = durable.upload_step(
        local.step_dir(step),
        step=step,
        progress=progress,
        manifest=manifest,
        epoch=epoch,
        limiter=limiter,
    )
    if durable.topology.multi:
        result = replace(result, epoch=epoch, committed=False)
        log.info(
            "Uploaded node %d's part of step %d to %s (%s in %.1f s, %s)",
            durable.topology.rank,
            step,
            durable.step_url(step),
            human_bytes(result.bytes_total),
            result.seconds,
            human_rate(result.mb_per_s * 1e6),
            extra=fields(
                "part_uploaded",
                step=step,
                tier="durable",
                bytes=result.bytes_total,
                seconds=round(result.seconds, 3),
            ),
        )
        if durable.topology.committer:
            missing = commit_parts(local, durable, step, epoch=epoch)
            result = replace(result, committed=not missing)
        return result
    log_saved(
        log,
        step=step,
        tier="durable",
        seconds=result.seconds,
        size=result.bytes_total,
        detail=f" to {durable.step_url(step)} at {human_rate(result.mb_per_s * 1e6)}"
        + (f", {result.files_skipped} files already there" if result.files_skipped else ""),
        event="promoted",
    )
    return result


def commit_parts(local: LocalTier, durable: DurableTier, step: int, *, epoch: int) -> list[int]:
    """Node 0: commit a multi-node step if every part is in; return the nodes still missing."""
    marker = local.step_dir(step) / COMMIT_MARKER
    try:
        data = marker.read_bytes()
    except FileNotFoundError:
        data = f"Committed by tiered node 0 of {durable.topology.nodes}\n".encode()
    missing = durable.commit_parts(step, epoch=epoch, marker=data)
    if not missing:
        log.info(
            "Committed step %d at %s: all %d nodes' parts are verified",
            step,
            durable.step_url(step),
            durable.topology.nodes,
            extra=fields("committed", step=step, tier="durable"),
        )
    return missing


def agree_restore(
    local: LocalTier,
    durable: DurableTier,
    *,
    timeout: float,
    should_stop: Callable[[], bool] | None = None,
    peers: PeerSetup | None = None,
) -> Decision:
    """Several nodes: agree with the others on the step to restore (``tiered.coord``), then set
    aside this node's local steps newer than it, and drop the peer copies newer than it."""
    decision = agree(local, durable, timeout=timeout, should_stop=should_stop, peers=peers)
    go_on_from(local, decision.step)
    return decision


def go_on_from(local: LocalTier, step: int | None) -> None:
    """After the nodes agreed on ``step``: set aside this node's local steps newer than it, and
    drop the copies of other nodes' steps newer than it (the run saves those numbers again)."""
    set_aside_newer(local, step, why="the nodes agreed on an older step")
    for gone in PeerStore(local.root).drop_newer(step):
        log.info(
            "Dropped node %d's step %d from the peer store (the run goes on from %s)",
            gone.owner,
            gone.step,
            f"step {step}" if step is not None else "a fresh start",
        )


@dataclass(frozen=True)
class PeerSetup:
    """What a node needs to get its own steps back from its peers before agreeing."""

    cfg: TieredConfig
    explicit: tuple[int, ...] | None = None
    """orbax's ``peer-ranks``, when ``tiered.peers`` is not set."""


def agree(
    local: LocalTier,
    durable: DurableTier,
    *,
    timeout: float,
    should_stop: Callable[[], bool] | None = None,
    peers: PeerSetup | None = None,
) -> Decision:
    """Several nodes: agree with the others on the step to restore (``tiered.coord``). With
    peers, this node first gets back the steps of its own that its peers hold and it lacks."""
    nodes = durable.topology.nodes
    from_peers: dict[int, int] = {}
    if peers is not None and peers.cfg.peering:
        try:
            newest = max((d.step for d in durable.scan() if d.own), default=None)
        except StorageError:
            newest = None
        for got in recover_own(
            peers.cfg,
            local,
            rank=durable.topology.rank,
            nodes=nodes,
            explicit=peers.explicit,
            newer_than=newest,
        ):
            from_peers[got.step] = got.peer
    usable = [s for s in local.scan() if s.committed and s.fits(nodes)]
    return Rendezvous(durable).agree(
        [s.step for s in usable],
        timeout=timeout,
        should_stop=should_stop,
        epochs={s.step: s.epoch for s in usable if s.epoch is not None},
        from_peers=from_peers,
    )


def set_aside_newer(local: LocalTier, step: int | None, *, why: str) -> list[int]:
    """Set aside this node's committed local steps newer than ``step`` (all of them for None)
    into ``.tiered/displaced``: the run goes on from ``step``, so they are not checkpoints of it
    any more, orbax would otherwise restore its own newest step, and the run must be free to
    save those numbers again."""
    newer = newer_than(local.committed_steps(), step)
    for s in newer:
        where = local.set_aside(s, now=time.time(), keep=DISPLACED_KEEP)
        log.warning(
            "Set aside local step %d in %s (%s; the run goes on from %s)",
            s,
            where,
            why,
            f"step {step}" if step is not None else "a fresh start",
        )
    return newer


def apply_deletes(
    deletes: Sequence[Delete], local: LocalTier, durable: DurableTier
) -> list[Delete]:
    """Apply deletions in order; return those done. The first failure propagates."""
    done = []
    for d in deletes:
        if d.tier == "local":
            local.delete_step(d.step)
        else:
            durable.delete_step(d.step)
        log.info(
            "Pruned %s step %d (%s)",
            d.tier,
            d.step,
            d.why,
            extra=fields("pruned", step=d.step, tier=d.tier),
        )
        done.append(d)
    return done


def export_step(
    local: LocalTier,
    durable: DurableTier,
    step: int,
    dest: Path,
    *,
    item: str | None = None,
    progress: Any = None,
) -> Path:
    """Write a standard orbax checkpoint of ``step`` (or of one ``item`` of it) into ``dest``,
    verified byte for byte, from the local copy when there is one and from the durable tier
    otherwise.

    An item exported alone is a plain orbax PyTree directory outside any step, which is what
    MaxText's ``load_full_state_path`` reads (``--item state`` for a MaxText step: pointed at
    ``<step>/state`` itself, orbax refuses a sub-directory of a checkpoint, and at ``<step>``
    it finds no pytree named ``items``).
    """
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise TieredError(f"{dest}: exists and is not an empty directory; choose a new path")
    with contextlib.suppress(OSError):
        dest.rmdir()
    multi = durable.topology.multi  # a node's local step is its part: the whole is durable
    # a local step no daemon has checksummed yet gets its manifest now (kept, as the daemon's)
    manifest = local.manifest(step) if step in local.committed_steps() else None
    if manifest is None or multi:
        got = durable.download_step(step, dest, progress=progress, only=item, whole=multi).manifest
        if got is not None and got.layout == GLOBAL_LAYOUT and not got.merged:
            merge_copy(dest, got)  # its paths are relative to dest, an item's too
        log.info("Exported step %d of %s to %s", step, durable.url, dest)
        return dest
    prefix = f"{item.strip('/')}/" if item else ""
    files = {r[len(prefix) :]: e for r, e in manifest.files.items() if r.startswith(prefix)}
    if not files:
        raise TieredError(f"local step {step} has no item {item!r}")
    partial = dest.with_name(tmp_name(dest.name))
    try:
        for rel, entry in sorted(files.items()):
            src = local.step_dir(step) / (prefix + rel)
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            check_file(str(src), entry, copy_with_digest(src, partial / rel))
        if not item:
            shutil.copyfile(local.step_dir(step) / COMMIT_MARKER, partial / COMMIT_MARKER)
        os.replace(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("Exported local step %d to %s", step, dest)
    return dest


def merge_copy(dest: Path, manifest: Manifest) -> None:
    """Merge the per-process OCDBT databases of an exported multi-node step that node 0 could
    not merge (no tensorstore beside its daemon), so the copy is one orbax checkpoint."""
    jobs = []
    for root in sorted(ocdbt_roots(manifest.files)):
        prefix = f"{root}/" if root else ""
        children = sorted(
            {
                folder[len(prefix) :]
                for rel in manifest.files
                if rel.startswith(prefix) and (folder := process_prefix(rel)) and folder != rel
            },
            key=lambda name: int(name.rsplit("_", 1)[1]),
        )
        jobs.append((f"file://{dest / root}".rstrip("/"), children))
    merge_roots(jobs, None)
    log.info("Merged the OCDBT databases of the exported step in %s", dest)


def fetch_step(
    local: LocalTier, durable: DurableTier, step: int, *, progress: Any = None, whole: bool = False
) -> Path:
    """Download a committed durable step into ``<local>/<step>``, verified; return that path.

    The files land in ``.tiered/staging`` and are renamed into place only once every one of
    them matches the manifest. A local directory of that step without a commit marker is an
    interrupted save or delete, not a checkpoint, and is replaced.
    """
    dest = local.step_dir(step)
    nodes = durable.topology.nodes
    if (dest / COMMIT_MARKER).exists():
        if not whole and all(s.fits(nodes) for s in local.scan() if s.step == step):
            return dest
        where = local.set_aside(step, now=time.time(), keep=DISPLACED_KEEP)
        log.warning(
            "Set aside local step %d in %s: %s, so it holds the wrong shards",
            step,
            where,
            "it is this node's part of the old mesh"
            if whole
            else f"a job of another shape saved it (this one has {nodes} nodes)",
        )
    result = stage_step(local, durable, step, progress=progress, whole=whole)
    if dest.is_symlink():
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    os.replace(result, dest)
    return dest


def stage_step(
    local: LocalTier, durable: DurableTier, step: int, *, progress: Any = None, whole: bool = False
) -> Path:
    """Download a committed durable step into ``.tiered/staging/<step>``, verified.

    Something already at that path is a leftover of an interrupted restore (a live staged step
    is reached through ``<step>``, and the caller checked there is none): it is not trusted, and
    is replaced."""
    local.staging_dir.mkdir(parents=True, exist_ok=True)
    staged = local.staging_dir / step_name(step)
    if staged.is_symlink() or staged.is_file():
        staged.unlink()
    elif staged.exists():
        shutil.rmtree(staged)
    started = time.monotonic()
    result = durable.download_step(step, staged, progress=progress, whole=whole)
    if result.manifest is not None:
        local.remember_manifest(step, result.manifest)
    log.info(
        "Fetched step %d from %s (%s in %.1f s)",
        step,
        durable.url,
        human_bytes(result.bytes_total),
        time.monotonic() - started,
        extra=fields(
            "fetched",
            step=step,
            tier="local",
            bytes=result.bytes_total,
            seconds=round(time.monotonic() - started, 3),
        ),
    )
    return staged

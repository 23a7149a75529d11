"""Operations shared by the CLI, the training API and the daemon: fetch, promote, delete.

Each one applies a single decision made elsewhere (by the caller or ``tiered.policy``) to the
tiers, and logs one line a user cares about.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tiered import faults
from tiered.config import TieredConfig
from tiered.coord import Decision, Rendezvous
from tiered.layout import COMMIT_MARKER
from tiered.policy import Delete, StepInfo, merge_inventories
from tiered.storage import DurableTier, LocalTier, Progress, TransferResult

log = logging.getLogger(__name__)


def open_tiers(cfg: TieredConfig) -> tuple[LocalTier, DurableTier]:
    durable = DurableTier(
        cfg.durable_url,
        storage_options=cfg.tiered.storage_options,
        concurrency=cfg.tiered.upload_concurrency,
        bandwidth_mbps=cfg.tiered.upload_bandwidth_mbps,
        node_rank=cfg.tiered.node_rank,
        num_nodes=cfg.tiered.num_nodes,
    )
    return LocalTier(cfg.local_dir), durable


def snapshot(local: LocalTier, durable: DurableTier, *, with_size: bool = False) -> list[StepInfo]:
    """Both tiers, merged by step."""
    return merge_inventories(local.scan(with_size=with_size), durable.scan())


def promote_step(
    local: LocalTier, durable: DurableTier, step: int, *, progress: Progress | None = None
) -> TransferResult:
    """Upload, verify and commit one committed local step; log one line.

    With several nodes this uploads this node's part under the current restore epoch; node 0
    then tries to commit at once (the last node to finish usually makes that succeed).
    """
    manifest = local.manifest(step)
    faults.hit("after-manifest")
    epoch = 0
    if durable.multi_node:
        epoch = Rendezvous(durable).current_epoch()
    result = durable.upload_step(
        local.step_dir(step), step=step, progress=progress, manifest=manifest, epoch=epoch
    )
    if durable.multi_node:
        result = replace(result, epoch=epoch, committed=False)
        log.info(
            "Uploaded node %d's part of step %d to %s (%s in %.1f s, %.0f MB/s)",
            durable.node_rank,
            step,
            durable.step_url(step),
            human_bytes(result.bytes_total),
            result.seconds,
            result.mb_per_s,
        )
        if durable.node_rank == 0:
            missing = commit_parts(local, durable, step, epoch=epoch)
            result = replace(result, committed=not missing)
        return result
    log.info(
        "Promoted step %d to %s (%s in %.1f s, %.0f MB/s%s)",
        step,
        durable.step_url(step),
        human_bytes(result.bytes_total),
        result.seconds,
        result.mb_per_s,
        f", {result.files_skipped} files already there" if result.files_skipped else "",
    )
    return result


def commit_parts(local: LocalTier, durable: DurableTier, step: int, *, epoch: int) -> list[int]:
    """Node 0: commit a multi-node step if every part is in; return the nodes still missing."""
    marker = local.step_dir(step) / COMMIT_MARKER
    try:
        data = marker.read_bytes()
    except FileNotFoundError:
        data = f"Committed by tiered node 0 of {durable.num_nodes}\n".encode()
    missing = durable.commit_parts(step, epoch=epoch, marker=data)
    if not missing:
        log.info(
            "Committed step %d at %s: all %d nodes' parts are verified",
            step,
            durable.step_url(step),
            durable.num_nodes,
        )
    return missing


def agree_restore(
    local: LocalTier,
    durable: DurableTier,
    *,
    timeout: float,
    should_stop: Callable[[], bool] | None = None,
) -> Decision:
    """Several nodes: agree with the others on the step to restore (``tiered.coord``), then set
    aside this node's local steps newer than it: some node lacks them, so they are not a
    checkpoint of this run any more, and orbax would otherwise restore its own newest step."""
    local_steps = local.committed_steps()
    decision = Rendezvous(durable).agree(local_steps, timeout=timeout, should_stop=should_stop)
    for newer in sorted(s for s in local_steps if decision.step is None or s > decision.step):
        log.warning(
            "Setting aside local step %d: the nodes agreed on %s, which every node can restore",
            newer,
            f"step {decision.step}" if decision.step is not None else "a fresh start",
        )
        local.delete_step(newer)
    return decision


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
        log.info("Pruned %s step %d (%s)", d.tier, d.step, d.why)
        done.append(d)
    return done


def fetch_step(local: LocalTier, durable: DurableTier, step: int, *, progress: Any = None) -> Path:
    """Download a committed durable step into ``<local>/<step>``, verified; return that path.

    The files land in ``.tiered/staging`` and are renamed into place only once every one of
    them matches the manifest. A local directory of that step without a commit marker is an
    interrupted save or delete, not a checkpoint, and is replaced.
    """
    dest = local.step_dir(step)
    if (dest / COMMIT_MARKER).exists():
        return dest
    result = stage_step(local, durable, step, progress=progress)
    if dest.is_symlink():
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    os.replace(result, dest)
    return dest


def stage_step(local: LocalTier, durable: DurableTier, step: int, *, progress: Any = None) -> Path:
    """Download a committed durable step into ``.tiered/staging/<step>``, verified."""
    local.staging_dir.mkdir(parents=True, exist_ok=True)
    staged = local.staging_dir / str(step)
    if (staged / COMMIT_MARKER).exists():
        return staged
    started = time.monotonic()
    result = durable.download_step(step, staged, progress=progress)
    log.info(
        "Fetched step %d from %s (%s in %.1f s)",
        step,
        durable.url,
        human_bytes(result.bytes_total),
        time.monotonic() - started,
    )
    return staged


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"

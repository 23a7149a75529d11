"""Multi-node steps: each node uploads its own files under ``node-<r>/`` and ends with its part
marker ``parts/<r>.json`` (its manifest, carrying the restore epoch); node 0 alone commits the
step, once every node's part of the current epoch is there, by writing the merged manifest and
then the commit marker.

Functions over a ``DurableTier`` whose topology says which node it is.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import replace
from typing import TYPE_CHECKING

from tiered import faults
from tiered.errors import CommitError, LayoutError, NotFound
from tiered.layout import COMMIT_MARKER, MANIFEST_NAME, PARTS_DIR, node_dir, part_marker, step_name
from tiered.manifest import Manifest
from tiered.storage.errormap import translate_errors

if TYPE_CHECKING:
    from tiered.storage.durable import DurableTier

log = logging.getLogger(__name__)


def write(tier: DurableTier, step: int, manifest: Manifest, *, epoch: int) -> None:
    """This node's part marker: its files are uploaded and verified."""
    rank, nodes = tier.topology.rank, tier.topology.nodes
    part = replace(manifest, node=rank, nodes=nodes, epoch=epoch, host=socket.gethostname())
    with translate_errors(f"writing node {rank}'s part of {tier.step_url(step)}"):
        tier.store.write_small(tier.object_path(step, part_marker(rank)), part.to_json().encode())


def ranks(tier: DurableTier, step: int) -> list[int]:
    """Nodes whose part marker of a multi-node step exists (one listing, no reads)."""
    names = tier.store.list_names(f"{step_name(step)}/{PARTS_DIR}")
    return sorted(
        int(n.removesuffix(".json"))
        for n in names
        if n.endswith(".json") and n.removesuffix(".json").isdigit()
    )


def read(tier: DurableTier, step: int, rank: int) -> Manifest:
    """One node's part marker (``NotFound``, a ``FileNotFoundError``, when it is not there)."""
    with translate_errors(f"reading {tier.step_url(step)}/{part_marker(rank)}"):
        data = tier.fs.cat_file(tier.object_path(step, part_marker(rank)))
    return _parse(tier, step, rank, data)


def read_all(tier: DurableTier, step: int) -> dict[int, Manifest]:
    """node rank -> part marker, for every part written so far; read in parallel, since node 0
    reads all N of them before a commit."""
    listed = ranks(tier, step)
    texts = tier.store.read_texts(
        [f"{step_name(step)}/{part_marker(r)}" for r in listed], workers=tier.concurrency
    )
    out = {}
    for rank, text in zip(listed, texts, strict=True):
        if text is None:
            raise NotFound(f"{tier.step_url(step)}/{part_marker(rank)}: vanished while read")
        out[rank] = _parse(tier, step, rank, text)
    return out


def _parse(tier: DurableTier, step: int, rank: int, data: str | bytes) -> Manifest:
    part = Manifest.from_json(data)
    if part.step != step or part.node != rank:
        raise LayoutError(
            f"{tier.step_url(step)}/{part_marker(rank)}: holds step {part.step} node {part.node}"
        )
    return part


def commit(tier: DurableTier, step: int, *, epoch: int, marker: bytes) -> list[int]:
    """Commit a multi-node step once every node's part is there; return the missing ranks.

    Only node 0 calls this, so two committers never race; the marker is still created with a
    precondition (GCS ``ifGenerationMatch=0``, S3 ``If-None-Match``, an exclusive link on
    ``file://``) where the backend has one. A part from another restore epoch is stale (the
    run restarted from an older step since) and counts as missing.
    """
    nodes = tier.topology.nodes
    if tier.has_marker(step):
        return []
    listed = ranks(tier, step)
    if len(listed) < nodes:
        # Read one part (a single small GET) so a job-shape mismatch shows up at once.
        sample = {listed[-1]: read(tier, step, listed[-1])} if listed else {}
        _check_shapes(tier, step, sample)
        return [r for r in range(nodes) if r not in listed]
    found = read_all(tier, step)
    _check_shapes(tier, step, found)
    fresh = {r: p for r, p in found.items() if p.epoch == epoch}
    missing = [r for r in range(nodes) if r not in fresh]
    if missing:
        return missing
    files = {
        f"{node_dir(r)}/{rel}": entry
        for r, part in sorted(fresh.items())
        for rel, entry in part.files.items()
    }
    reasons = {p.reason for p in fresh.values()}
    reason = next((r for r in ("preemption", "final") if r in reasons), fresh[0].reason)
    times = [p.commit_time for p in fresh.values() if p.commit_time is not None]
    merged = Manifest(
        step=step,
        files=files,
        reason=reason,
        commit_time=max(times) if times else None,
        nodes=nodes,
        epoch=epoch,
    )
    # Each node read its own objects back before writing its part; here every object is
    # checked once more for presence and size (and crc32c where listings carry it).
    tier.verify_files(step, merged, read_back=False)
    with translate_errors(f"committing {tier.step_url(step)}"):
        tier.store.write_small(tier.object_path(step, MANIFEST_NAME), merged.to_json().encode())
        faults.hit("commit")
        if not tier.store.create_exclusive(tier.object_path(step, COMMIT_MARKER), marker):
            log.warning(
                "%s was already committed by another writer; kept its marker", tier.step_url(step)
            )
    return []


def _check_shapes(tier: DurableTier, step: int, found: dict[int, Manifest]) -> None:
    nodes = tier.topology.nodes
    for rank, part in found.items():
        if part.nodes != nodes or rank >= nodes:
            raise CommitError(
                f"{tier.step_url(step)}: node {rank}'s part was written by a job of "
                f"{part.nodes} nodes, but this job has {nodes}: is tiered.num_nodes the same on "
                "every node?"
            )

"""Restoring a step from the durable tier: each file downloaded under a temporary name of this
writer's own, checked against the manifest, and the step renamed into place only once whole, so
the destination is either a complete step or absent."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tiered.errors import CommitError
from tiered.layout import COMMIT_MARKER, GLOBAL_LAYOUT, node_dir, part_path, tmp_name
from tiered.manifest import FileEntry, Manifest, check_file, digest_of_file
from tiered.storage import parts, rebuild
from tiered.storage.errormap import translate_errors
from tiered.storage.transfer import Progress, TransferResult, run_parallel

if TYPE_CHECKING:
    from tiered.storage.steps import StepStore


def download_step(
    tier: StepStore,
    step: int,
    dest: Path,
    *,
    progress: Progress | None = None,
    only: str | None = None,
    whole: bool = False,
) -> TransferResult:
    """Download a committed step into ``dest`` (which must not exist), verifying each file:
    this node's part of it, or with ``whole`` all of a multi-node step's orbax checkpoint.

    Files land under a temporary name of this writer's own first; the directory is renamed
    into place only once every file matches the manifest, so ``dest`` is either whole or
    absent. With ``only`` (an item of the step, such as ``state``), just that folder's
    files are downloaded, into ``dest`` itself.
    """
    started = time.monotonic()
    if not tier.has_marker(step):
        raise CommitError(f"{tier.step_url(step)} is not committed")
    manifest, locate = whole_manifest(tier, step) if whole else restore_manifest(tier, step)
    if only is not None:
        prefix = only.strip("/") + "/"
        files = {r[len(prefix) :]: e for r, e in manifest.files.items() if r.startswith(prefix)}
        if not files:
            items = sorted({r.split("/")[0] for r in manifest.files if "/" in r})
            raise CommitError(
                f"{tier.step_url(step)} has no item {only!r} (it has {', '.join(items)})"
            )
        inner = locate
        manifest, locate = replace(manifest, files=files), lambda rel: inner(prefix + rel)
    rebuilt = None
    if manifest.deduped and not whole:
        # This node's databases hold only the keys it owned: rebuilt from the merged root.
        rebuilt = manifest
        manifest = replace(manifest, files=rebuild.kept_files(manifest))
    partial = dest.with_name(tmp_name(dest.name))
    with translate_errors(f"preparing {partial}"):
        partial.mkdir(parents=True)
    total = manifest.total_bytes
    try:
        done = fetch_files(tier, step, manifest.files, partial, locate=locate, progress=progress)
        if rebuilt is not None:
            done += rebuild.rebuild(tier, step, rebuilt, partial)
            if progress:
                progress(done, done)
            manifest = rebuild.rebuilt_manifest(rebuilt, manifest, partial)
        if only is None:
            with translate_errors(f"downloading the commit marker of {tier.step_url(step)}"):
                tier.fs.get_file(
                    tier.object_path(step, COMMIT_MARKER), str(partial / COMMIT_MARKER)
                )
        with translate_errors(f"moving {partial} into place"):
            os.replace(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return TransferResult(
        step=step,
        bytes_total=total,
        bytes_moved=total,
        files_total=len(manifest.files),
        files_skipped=0,
        seconds=time.monotonic() - started,
        manifest=manifest,
    )


def fetch_files(
    tier: StepStore,
    step: int,
    files: dict[str, FileEntry],
    dest: Path,
    *,
    locate: Callable[[str], str],
    progress: Progress | None = None,
) -> int:
    """Download ``files`` of a step into ``dest`` (``locate``: where each is on the tier), each
    checked against its entry; the bytes downloaded."""
    total = sum(e.size for e in files.values())
    done = 0
    lock = threading.Lock()

    def get(rel: str) -> None:
        nonlocal done
        local = dest / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        entry = files[rel]
        with translate_errors(f"downloading {rel} of {tier.step_url(step)}"):
            tier.store.get(tier.object_path(step, locate(rel)), local, entry.size, tier.budget)
        got = digest_of_file(local)
        check_file(f"{tier.step_url(step)}/{rel}", entry, got)
        with lock:
            done += got.size
            if progress:
                progress(done, total)

    run_parallel(get, sorted(files), workers=tier.download_concurrency)
    return done


def restore_manifest(tier: StepStore, step: int) -> tuple[Manifest, Callable[[str], str]]:
    """What this node downloads of a step: (its files, where each one is on the tier).

    On the topology that wrote it, a node downloads its own part. A multi-node step whose
    OCDBT roots node 0 merged is one orbax checkpoint, so a job of any other shape (one
    process included) downloads the whole of it and restores it resharded."""
    topo = tier.topology
    part: Manifest | None = None
    if topo.multi:
        with contextlib.suppress(FileNotFoundError):
            part = parts.read(tier, step, topo.rank)
    if part is not None and part.nodes == topo.nodes:
        if part.layout == GLOBAL_LAYOUT:
            return part, lambda rel: part_path(topo.rank, rel)
        return part, lambda rel: f"{node_dir(topo.rank)}/{rel}"
    manifest = tier.read_manifest(step)
    if manifest.nodes == topo.nodes and not topo.multi:
        return manifest, str
    if manifest.layout == GLOBAL_LAYOUT and manifest.merged:
        return parts.whole_checkpoint(manifest), str
    why = (
        "it has no merged OCDBT root (`tiered export` writes a copy that any topology reads)"
        if manifest.layout == GLOBAL_LAYOUT
        else "tiered 0.2 kept each node's part apart"
    )
    raise CommitError(
        f"{tier.step_url(step)} was written by a job of {manifest.nodes} nodes and this one has "
        f"{topo.nodes}; it restores only on {manifest.nodes} nodes: {why}"
    )


def whole_manifest(tier: StepStore, step: int) -> tuple[Manifest, Callable[[str], str]]:
    """Every file of a step's orbax checkpoint, whatever the topology that wrote it (merged
    or not: ``tiered export`` merges a copy)."""
    manifest = tier.read_manifest(step)
    if manifest.nodes == 1:
        return manifest, str
    if manifest.layout != GLOBAL_LAYOUT:
        raise CommitError(
            f"{tier.step_url(step)} was written by tiered 0.2 on {manifest.nodes} nodes: each "
            "node-<r>/ folder in it is that node's checkpoint, and there is no whole one"
        )
    return parts.whole_checkpoint(manifest), str

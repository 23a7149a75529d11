"""Restoring a step from the durable tier: each file downloaded under a temporary name of this
writer's own, checked against the manifest, and the step renamed into place only once whole, so
the destination is either a complete step or absent."""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tiered.errors import CommitError
from tiered.layout import COMMIT_MARKER, tmp_name
from tiered.manifest import Manifest, check_entry, crc32c_of_file
from tiered.storage import parts
from tiered.storage.errormap import translate_errors
from tiered.storage.transfer import Progress, TransferResult, run_parallel

if TYPE_CHECKING:
    from tiered.storage.durable import DurableTier


def download_step(
    tier: DurableTier,
    step: int,
    dest: Path,
    *,
    progress: Progress | None = None,
    only: str | None = None,
) -> TransferResult:
    """Download a committed step into ``dest`` (which must not exist), verifying each file.

    Files land under a temporary name of this writer's own first; the directory is renamed
    into place only once every file matches the manifest, so ``dest`` is either whole or
    absent. With ``only`` (an item of the step, such as ``state``), just that folder's
    files are downloaded, into ``dest`` ittier.
    """
    started = time.monotonic()
    if not tier.has_marker(step):
        raise CommitError(f"{tier.step_url(step)} is not committed")
    manifest, under = restore_manifest(tier, step)
    if only is not None:
        prefix = only.strip("/") + "/"
        files = {r[len(prefix) :]: e for r, e in manifest.files.items() if r.startswith(prefix)}
        if not files:
            items = sorted({r.split("/")[0] for r in manifest.files if "/" in r})
            raise CommitError(
                f"{tier.step_url(step)} has no item {only!r} (it has {', '.join(items)})"
            )
        manifest, under = replace(manifest, files=files), under + prefix
    partial = dest.with_name(tmp_name(dest.name))
    with translate_errors(f"preparing {partial}"):
        partial.mkdir(parents=True)
    total = manifest.total_bytes
    done = 0
    lock = threading.Lock()

    def get(rel: str) -> None:
        nonlocal done
        local = partial / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        entry = manifest.files[rel]
        with translate_errors(f"downloading {rel} of {tier.step_url(step)}"):
            tier.store.get(tier.object_path(step, under + rel), local, entry.size, tier.budget)
        size, crc = crc32c_of_file(local)
        check_entry(f"{tier.step_url(step)}/{rel}", entry, size=size, crc32c=crc)
        with lock:
            done += size
            if progress:
                progress(done, total)

    try:
        run_parallel(get, sorted(manifest.files), workers=tier.download_concurrency)
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


def restore_manifest(tier: DurableTier, step: int) -> tuple[Manifest, str]:
    """What this node downloads of a step: (its files, the folder they are in)."""
    topo = tier.topology
    if not topo.multi:
        manifest = tier.read_manifest(step)
        if manifest.nodes != 1:
            raise CommitError(
                f"{tier.step_url(step)} was written by {manifest.nodes} nodes; restore it "
                f"with tiered.num_nodes: {manifest.nodes} and each node's tiered.node_rank"
            )
        return manifest, ""
    try:
        part = parts.read(tier, step, topo.rank)
    except FileNotFoundError:
        raise CommitError(
            f"{tier.step_url(step)} has no part for node {topo.rank}: it was written by "
            f"a job with a different number of nodes than this one ({topo.nodes})"
        ) from None
    if part.nodes != topo.nodes:
        raise CommitError(
            f"{tier.step_url(step)} was written by {part.nodes} nodes, but this job has "
            f"{topo.nodes}"
        )
    return part, tier.node_prefix()

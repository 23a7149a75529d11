"""Promoting a step to the durable tier: what moves is planned first (``plan_transfer``), each
file is uploaded whole and read back where the store keeps no checksum, then the manifest and
the commit marker are written (one node), or the node's part marker (several; node 0 commits
in ``tiered.storage.parts``)."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiered import faults
from tiered.errors import StepExists
from tiered.layout import COMMIT_MARKER, MANIFEST_NAME
from tiered.manifest import Manifest, build_manifest
from tiered.storage import dedup as dedup_keys
from tiered.storage import parts
from tiered.storage.errormap import translate_errors
from tiered.storage.local import read_step_metadata
from tiered.storage.stores import listed_crc32c
from tiered.storage.transfer import (
    Progress,
    RateLimiter,
    RemoteFile,
    TransferResult,
    listing_proves,
    plan_transfer,
)

if TYPE_CHECKING:
    from tiered.storage.steps import StepStore


def upload_step(
    tier: StepStore,
    step_dir: Path,
    *,
    step: int,
    progress: Progress | None = None,
    manifest: Manifest | None = None,
    epoch: int = 0,
    limiter: RateLimiter | None = None,
    dedup: bool = True,
) -> TransferResult:
    """Upload, verify, write the manifest, then the commit marker. Idempotent. The files move
    at ``limiter``'s pace (default: the tier's cap, if any).

    What moves is decided first (``plan_transfer``): files already there with the right
    size and checksum are skipped, and objects under the step that the manifest does not
    list (left by an earlier, different upload) are removed before the commit, so a
    committed step holds exactly the local step's files. A step that is already committed
    is never written again: with the same content this is a no-op, with other content it
    raises ``StepExists`` (the planner moves it aside first).

    With several nodes this node's files go where ``locate`` says and end with its part
    marker (carrying ``epoch``) instead: node 0 commits the step once every part is there
    (``commit_parts``). With ``dedup`` the node's OCDBT databases are uploaded with only the
    keys it owns (``tiered.storage.dedup``), where every node can take part.
    """
    started = time.monotonic()
    if manifest is None:
        reason, commit_time = read_step_metadata(step_dir)
        manifest = build_manifest(step_dir, step=step, reason=reason, commit_time=commit_time)
    if tier.topology.multi:
        parts.check_names(tier, step, manifest)
    files = manifest.files
    version = tier.marker_version(step)
    if version is not None:
        existing_manifest, _problem, _tiered = tier.step_manifest(step, version)
        if existing_manifest is None or existing_manifest.copy_identity != manifest.copy_identity:
            raise StepExists(
                f"{tier.step_url(step)} is already committed with other content; not overwritten"
            )
        return TransferResult(
            step=step,
            bytes_total=manifest.total_bytes,
            bytes_moved=0,
            files_total=len(files),
            files_skipped=len(files),
            seconds=time.monotonic() - started,
            manifest=manifest,
        )
    owned = None
    # a preemption or final step goes up as it is: no wait for the other nodes' indexes
    if tier.topology.multi and dedup and manifest.reason not in ("preemption", "final"):
        owned = dedup_keys.prepare(tier, step, step_dir, manifest, epoch=epoch)
    try:
        return _upload(
            tier, step_dir, step, manifest, epoch, pace_of(tier, limiter), progress, started, owned
        )
    finally:
        if owned is not None:
            owned.cleanup()


def pace_of(tier: StepStore, limiter: RateLimiter | None) -> RateLimiter | None:
    return limiter if limiter is not None else tier.limiter


def _upload(
    tier: StepStore,
    step_dir: Path,
    step: int,
    manifest: Manifest,
    epoch: int,
    pace: RateLimiter | None,
    progress: Progress | None,
    started: float,
    owned: dedup_keys.Upload | None,
) -> TransferResult:
    if owned is not None:
        manifest = owned.manifest
    files = manifest.files
    remote = tier.node_listing(step, manifest)
    transfer = plan_transfer(manifest, _remote_facts(tier, step, manifest, remote))
    total = manifest.total_bytes
    done = total - sum(files[r].size for r in transfer.put)
    lock = threading.Lock()
    if progress:
        progress(done, total)

    def put(rel: str) -> None:
        nonlocal done
        with translate_errors(
            f"uploading {rel} to {tier.step_url(step)}",
            missing="not found (the local file vanished, or the bucket does not exist)",
        ):
            tier.store.put(
                owned.sources[rel] if owned is not None else step_dir / rel,
                tier.object_path(step, tier.locate(rel)),
                files[rel],
                tier.budget,
                pace,
            )
        faults.hit("upload-file")
        with lock:
            done += files[rel].size
            if progress:
                progress(done, total)

    tier.parallel(put, list(transfer.put))
    for rel in transfer.remove:
        with (
            translate_errors(f"removing the stray {rel} from {tier.step_url(step)}"),
            contextlib.suppress(FileNotFoundError),
        ):
            tier.fs.rm_file(tier.object_path(step, tier.locate(rel)))
    tier.verify_files(step, manifest, read_back=tier.store.read_back, locate=tier.locate)
    if tier.topology.multi:
        parts.write(tier, step, manifest, epoch=epoch)
    else:
        with translate_errors(f"committing {tier.step_url(step)}"):
            tier.store.write_small(
                tier.object_path(step, MANIFEST_NAME), manifest.to_json().encode()
            )
            faults.hit("commit")
            marker = (step_dir / COMMIT_MARKER).read_bytes()
            if not tier.store.create_exclusive(tier.object_path(step, COMMIT_MARKER), marker):
                raise StepExists(f"{tier.step_url(step)} was committed by another writer meanwhile")
    return TransferResult(
        step=step,
        bytes_total=total,
        bytes_moved=sum(files[r].size for r in transfer.put),
        files_total=len(files),
        files_skipped=len(files) - len(transfer.put),
        seconds=time.monotonic() - started,
        manifest=manifest,
    )


def _remote_facts(
    tier: StepStore, step: int, manifest: Manifest, remote: dict[str, Any]
) -> dict[str, RemoteFile]:
    """Size and checksums of this node's objects of the step. The crc32c comes from the
    listing where the backend keeps one (GCS), and is enough for a file it tells apart;
    otherwise the object is read back, streamed, only when its size already matches the
    manifest (an OCDBT file is then skipped only if its xxh3 matches too)."""
    facts: dict[str, RemoteFile] = {}
    for rel, info in remote.items():
        size = int(info.get("size", -1))
        crc = listed_crc32c(info)
        entry = manifest.files.get(rel)
        if entry is not None and size == entry.size and not listing_proves(entry, crc):
            got = tier.digest_of(step, tier.locate(rel))
            facts[rel] = RemoteFile(size=got.size, crc32c=got.crc32c, xxh3=got.xxh3)
        else:
            facts[rel] = RemoteFile(size=size, crc32c=crc)
    return facts

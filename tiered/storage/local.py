"""The local tier: node-local step directories, read and changed with plain OS calls.

A committed step is ``<root>/<step>`` holding ``commit_success.txt`` (orbax renames its tmp
directory into place, so the marker is there once the step is whole). It may be a symlink into
``.tiered/staging`` (a step restored through orbax's multi-tier protocol). A step leaves the
namespace in one rename (into ``.tiered/trash`` to be deleted, or ``.tiered/displaced`` to be
kept), so a crash leaves it whole or gone, never half.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from tiered import faults
from tiered.atomic import empty_trash, publish_file
from tiered.errors import LayoutError
from tiered.layout import (
    CHECKPOINT_METADATA,
    COMMIT_MARKER,
    DEDUP_DIR,
    DISPLACED_DIR,
    STAGING_DIR,
    TIERED_DIR,
    TRASH_DIR,
    displaced_name,
    is_tmp_name,
    parse_displaced,
    parse_step,
    step_name,
)
from tiered.manifest import Manifest, build_manifest
from tiered.storage.errormap import translate_errors
from tiered.types import Displaced, LocalStep, Reason, as_reason


def read_step_metadata(step_dir: Path) -> tuple[Reason, float | None]:
    """(reason, commit time) from orbax's ``_CHECKPOINT_METADATA``, without importing orbax."""
    meta = step_metadata(step_dir)
    return meta.reason, meta.commit_time


class StepMetadata(NamedTuple):
    """What the saver recorded about a step, each field where it did."""

    reason: Reason = "unknown"
    commit_time: float | None = None
    nodes: int | None = None
    """The node count of the job that saved it."""
    epoch: int | None = None
    """The restore epoch it was saved under."""
    seconds_per_step: float | None = None
    """The trainer's wall time per training step before this save (``tiered.CheckpointManager``
    records it): what the daemon paces periodic transfers by."""


def step_metadata(step_dir: Path) -> StepMetadata:
    """The saver's facts about a step from orbax's ``_CHECKPOINT_METADATA`` (a small JSON
    file), without importing orbax."""
    try:
        data = json.loads((step_dir / CHECKPOINT_METADATA).read_text())
    except (OSError, ValueError):
        return StepMetadata()
    if not isinstance(data, dict):
        return StepMetadata()
    custom = data.get("custom_metadata") or {}
    meta = custom.get("tiered") if isinstance(custom, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    reason = as_reason(meta.get("reason")) if meta else "unknown"
    nodes, epoch = meta.get("nodes"), meta.get("epoch")
    per_step = meta.get("seconds_per_step")
    nsecs = data.get("commit_timestamp_nsecs")
    return StepMetadata(
        reason,
        (nsecs / 1e9 if isinstance(nsecs, int | float) else None),
        nodes if isinstance(nodes, int) and not isinstance(nodes, bool) and nodes > 0 else None,
        epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0 else None,
        float(per_step)
        if isinstance(per_step, int | float)
        and not isinstance(per_step, bool)
        and math.isfinite(per_step)
        and per_step > 0
        else None,
    )


class LocalTier:
    """The node-local step directories, read with plain OS calls.

    A committed step is ``<root>/<step>`` holding ``commit_success.txt``. It may be a symlink into
    ``.tiered/staging`` (a step restored through orbax's multi-tier protocol).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._size_cache: dict[tuple[int, int], int] = {}
        self._identity_cache: dict[tuple[int, int, int], tuple[str, bool]] = {}

    @property
    def tiered_dir(self) -> Path:
        return self.root / TIERED_DIR

    @property
    def staging_dir(self) -> Path:
        return self.tiered_dir / STAGING_DIR

    def step_dir(self, step: int) -> Path:
        return self.root / step_name(step)

    def ensure(self) -> None:
        with translate_errors(f"creating {self.root}"):
            self.root.mkdir(parents=True, exist_ok=True)
            self.tiered_dir.mkdir(mode=0o755, exist_ok=True)

    def scan(self, *, with_size: bool = False) -> list[LocalStep]:
        """Every step directory (committed or not), oldest first. Tmp saves are skipped."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        facts = []
        for entry in entries:
            if is_tmp_name(entry.name):
                continue
            ref = parse_step(entry.name)
            if ref is None:
                continue
            path = Path(entry.path)
            is_link = entry.is_symlink()
            if not path.is_dir():
                continue
            marker = path / COMMIT_MARKER
            try:
                marker_stat = marker.stat()
            except OSError:
                facts.append(LocalStep(step=ref.step, committed=False, is_link=is_link))
                continue
            reason, commit_time, nodes, epoch, per_step = step_metadata(path)
            size = self._size(path, marker_stat) if with_size else None
            identity, whole = self._identity(ref.step, marker_stat)
            facts.append(
                LocalStep(
                    step=ref.step,
                    committed=True,
                    reason=reason,
                    commit_time=commit_time if commit_time is not None else marker_stat.st_mtime,
                    size=size,
                    is_link=is_link,
                    identity=identity,
                    # a whole checkpoint (every process's shards) restores on any shape
                    nodes=None if whole else nodes,
                    epoch=epoch,
                    seconds_per_step=per_step,
                )
            )
        return sorted(facts, key=lambda f: f.step)

    def committed_steps(self) -> list[int]:
        return [f.step for f in self.scan() if f.committed]

    def _size(self, path: Path, marker_stat: os.stat_result) -> int:
        key = (marker_stat.st_ino, marker_stat.st_mtime_ns)
        if key not in self._size_cache:
            total = 0
            for dirpath, _dirs, files in os.walk(path):
                for name in files:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(dirpath, name)).st_size
            self._size_cache[key] = total
        return self._size_cache[key]

    def manifest_path(self, step: int) -> Path:
        return self.tiered_dir / "manifests" / f"{step_name(step)}.json"

    def _identity(self, step: int, marker_stat: os.stat_result) -> tuple[str | None, bool]:
        """(the identity of the step's kept manifest, if it has a valid one (see ``manifest``);
        whether it is a whole multi-node checkpoint, downloaded as such)."""
        try:
            st = self.manifest_path(step).stat()
        except OSError:
            return None, False
        if st.st_mtime_ns < marker_stat.st_mtime_ns:
            return None, False
        key = (step, st.st_mtime_ns, st.st_size)
        if key not in self._identity_cache:
            cached = self.cached_manifest(step)
            if cached is None:
                return None, False
            self._identity_cache[key] = (cached.copy_identity, cached.merged)
        return self._identity_cache[key]

    def cached_manifest(self, step: int) -> Manifest | None:
        """The manifest kept for the step, or None when there is none that is still valid: a
        kept manifest older than the step's commit marker belongs to an earlier save of the
        same step number."""
        path = self.manifest_path(step)
        try:
            if path.stat().st_mtime_ns < (self.step_dir(step) / COMMIT_MARKER).stat().st_mtime_ns:
                return None
            cached = Manifest.from_json(path.read_text())
        except (OSError, LayoutError):
            return None
        return cached if cached.step == step else None

    def manifest(self, step: int) -> Manifest:
        """The step's manifest, built once when first asked for and kept in ``.tiered/manifests``.

        Keeping it means bytes that change on disk after the first look (a bit flip, a stray
        writer) are caught by verification instead of being uploaded under a fresh checksum,
        and it is what the step's identity is compared by.
        """
        cached = self.cached_manifest(step)
        if cached is not None:
            return cached
        step_dir = self.step_dir(step)
        reason, commit_time = read_step_metadata(step_dir)
        manifest = build_manifest(step_dir, step=step, reason=reason, commit_time=commit_time)
        self.remember_manifest(step, manifest)
        return manifest

    def remember_manifest(self, step: int, manifest: Manifest) -> None:
        """Keep ``manifest`` as the step's own: after building it, or after a download verified
        the step's files against it."""
        path = self.manifest_path(step)
        with translate_errors(f"writing {path}"):
            path.parent.mkdir(parents=True, exist_ok=True)
            publish_file(path, manifest.to_json().encode())

    @property
    def trash_dir(self) -> Path:
        return self.tiered_dir / TRASH_DIR

    def delete_step(self, step: int) -> None:
        """Take the step out of the namespace in one rename, then delete it at leisure.

        The rename into ``.tiered/trash`` is atomic, so a crash at any point leaves either the
        whole committed step or none of it under ``<step>``; ``empty_trash`` finishes the job
        later. A symlinked step (restored through orbax's protocol) loses its link and its
        staged target.
        """
        with translate_errors(f"deleting local step {step}"):
            self._take_out(step, self.trash_dir / f"{step_name(step)}-{time.time_ns()}")
            faults.hit("prune-local")
            self.empty_trash()

    def set_aside(self, step: int, *, now: float, keep: int) -> Path:
        """Move a committed step out of the way, whole, into ``.tiered/displaced/`` (another
        step of its number is about to be saved: the run went back to an older step). The
        newest ``keep`` steps set aside are kept there (``tiered.policy.DISPLACED_KEEP``); older
        ones are deleted."""
        dest = self.displaced_dir / displaced_name(step, now)
        with translate_errors(f"setting aside local step {step}"):
            self._take_out(step, dest)
            for old in self.displaced()[:-keep] if keep else self.displaced():
                os.replace(self.displaced_dir / old.name, self.trash_dir / old.name)
            self.empty_trash()
        return dest

    @property
    def displaced_dir(self) -> Path:
        return self.root / DISPLACED_DIR

    def displaced(self) -> list[Displaced]:
        """Local steps set aside, oldest first."""
        try:
            names = [p.name for p in self.displaced_dir.iterdir()]
        except FileNotFoundError:
            return []
        found = [replace(d, tier="local") for d in map(parse_displaced, names) if d is not None]
        return sorted(found, key=lambda d: (d.moved_at or 0.0, d.name))

    def _take_out(self, step: int, dest: Path) -> None:
        """Rename the step to ``dest`` (a symlinked step: its staged target, and drop the link)
        and forget its manifest."""
        path = self.step_dir(step)
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.trash_dir.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            target = path.resolve()
            path.unlink()
            if target.is_relative_to(self.staging_dir.resolve()) and target.exists():
                os.replace(target, dest)
        else:
            os.replace(path, dest)
        self.manifest_path(step).unlink(missing_ok=True)

    def empty_trash(self) -> None:
        """Remove what earlier deletions moved aside (after a crash, too)."""
        empty_trash(self.trash_dir)

    def clear_leftovers(self) -> None:
        """At a daemon's start, with its lock held: the trash, and what a daemon that died while
        it built a deduplicated upload left (``.tiered/dedup``: keys of a step copied for the
        upload, no checkpoint), which only the daemon holding the lock writes."""
        self.empty_trash()
        shutil.rmtree(self.tiered_dir / DEDUP_DIR, ignore_errors=True)

    def used_bytes(self) -> int:
        """Bytes under the local directory: every file once (symlinked steps are not followed;
        their staged targets are counted where they are), saves in progress included."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.root, followlinks=False):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
        return total

    def free_bytes(self, capacity: int | None = None) -> int:
        """Free bytes: what ``capacity`` leaves when it is set (an emptyDir ``sizeLimit``, a
        quota, which the filesystem does not report), else the filesystem's own figure; the
        smaller of the two when both apply."""
        disk = shutil.disk_usage(self.root).free
        if capacity is None:
            return disk
        return max(0, min(disk, capacity - self.used_bytes()))

    def free_fraction(self, capacity: int | None = None) -> float:
        total = capacity if capacity is not None else shutil.disk_usage(self.root).total
        return self.free_bytes(capacity) / total if total else 1.0

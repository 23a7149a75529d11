"""The two tiers as storage: list steps, move one step between tiers, delete one step.

Commit ordering, stated once: a step is written data first, then ``tiered-manifest.json``, then
``commit_success.txt``; it is deleted in the reverse order (marker first), so a half-written or
half-deleted step is never mistaken for a checkpoint. Object stores have no atomic rename, which
is why the durable tier uses a marker file; the local tier gets the same marker from orbax,
which renames its tmp directory into place.

fsspec, OS and network errors are translated into ``StorageError`` here, at the boundary. Two
fsspec traps are avoided on purpose: ``exists()`` swallows every error (an auth failure would read
as "not there"), so we call ``info()`` and let real errors through; and ``mv`` is copy-then-delete,
so nothing here relies on it being atomic.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import fsspec

from tiered import faults
from tiered.atomic import publish_file
from tiered.config import normalize_url, redact_url
from tiered.errors import (
    ChecksumMismatch,
    CommitError,
    LayoutError,
    NotFound,
    StepExists,
    StorageError,
    TieredError,
)
from tiered.layout import (
    CHECKPOINT_METADATA,
    COMMIT_MARKER,
    DISPLACED_DIR,
    MANIFEST_NAME,
    PARTS_DIR,
    STAGING_DIR,
    TIERED_DIR,
    TRASH_DIR,
    displaced_name,
    is_marker_or_manifest,
    is_tmp_name,
    node_dir,
    parse_displaced,
    parse_step,
    part_marker,
    step_name,
    tmp_name,
)
from tiered.manifest import (
    Manifest,
    build_manifest,
    check_entry,
    crc32c_from_b64,
    crc32c_of_file,
    crc32c_of_stream,
)
from tiered.types import Displaced, DurableStep, LocalStep, Reason, as_reason

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes total) as a transfer proceeds."""


@dataclass(frozen=True)
class TransferResult:
    step: int
    bytes_total: int
    bytes_moved: int
    files_total: int
    files_skipped: int
    seconds: float
    epoch: int = 0
    committed: bool = True
    """False for a multi-node part that is uploaded but not yet committed by node 0."""
    manifest: Manifest | None = None
    """What was moved and verified (this node's files)."""

    @property
    def mb_per_s(self) -> float:
        return self.bytes_moved / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class RemoteFile:
    size: int
    crc32c: int | None


@dataclass(frozen=True)
class TransferPlan:
    put: tuple[str, ...]
    """Files to upload: missing, or there with other bytes."""
    skip: tuple[str, ...]
    """Files already there with the manifest's size and crc32c."""
    remove: tuple[str, ...]
    """Objects under the step that the manifest does not list."""


def plan_transfer(manifest: Manifest, remote: dict[str, RemoteFile]) -> TransferPlan:
    """What an upload of ``manifest`` moves, given what is already under the step."""
    put: list[str] = []
    skip: list[str] = []
    for rel, entry in sorted(manifest.files.items()):
        there = remote.get(rel)
        ok = there is not None and there.size == entry.size and there.crc32c == entry.crc32c
        (skip if ok else put).append(rel)
    remove = sorted(
        rel for rel in remote if rel not in manifest.files and not is_marker_or_manifest(rel)
    )
    return TransferPlan(put=tuple(put), skip=tuple(skip), remove=tuple(remove))


# -- error translation --------------------------------------------------------------------------

# One table maps what fsspec, the OS and the network raise onto tiered's errors. Whatever it does
# not name is a permanent StorageError; programming errors (TypeError, AttributeError, KeyError,
# AssertionError) pass through as they are, since hiding a bug as an I/O error helps nobody.
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}
_ERRNO = {
    # retrying will not help: the name, the permission or the filesystem says no
    errno.EACCES: (False, "permission denied"),
    errno.EPERM: (False, "operation not permitted"),
    errno.EROFS: (False, "read-only filesystem"),
    errno.ENAMETOOLONG: (False, "file name too long for the filesystem"),
    errno.EINVAL: (False, "invalid argument (a name the filesystem rejects?)"),
    errno.ENOTDIR: (False, "a path component is a file, not a directory"),
    errno.EISDIR: (False, "is a directory"),
    errno.ELOOP: (False, "too many symbolic links"),
    # worth retrying with backoff: space can be freed, devices and links recover
    errno.ENOSPC: (True, "no space left on device"),
    errno.EDQUOT: (True, "disk quota exceeded"),
    errno.EIO: (True, "I/O error"),
    errno.ETIMEDOUT: (True, "timed out"),
    errno.ECONNRESET: (True, "connection reset"),
    errno.ECONNREFUSED: (True, "connection refused"),
    errno.EHOSTUNREACH: (True, "host unreachable"),
    errno.ENETUNREACH: (True, "network unreachable"),
}
_TRANSIENT_MODULES = ("aiohttp", "botocore", "aiobotocore", "urllib3", "requests", "google")


def _classify(err: BaseException) -> tuple[bool, str]:
    """(transient, a one-line description) of a foreign error."""
    text = (str(err) or type(err).__name__).splitlines()[0][:300]
    code = getattr(err, "code", None) or getattr(err, "status", None)
    if isinstance(code, int) and not isinstance(err, OSError):
        return code in _TRANSIENT_HTTP, text
    if isinstance(err, OSError) and err.errno in _ERRNO:
        transient, words = _ERRNO[err.errno]
        return transient, f"{words}: {err.filename}" if err.filename else words
    if isinstance(err, PermissionError):
        return False, text
    if isinstance(err, ValueError):
        return False, text
    transient = isinstance(err, OSError | TimeoutError | ConnectionError) or type(
        err
    ).__module__.startswith(_TRANSIENT_MODULES)
    return transient, text


@contextlib.contextmanager
def translate_errors(what: str, *, missing: str | None = None) -> Iterator[None]:
    """Turn backend errors into tiered's (``StorageError``, ``NotFound``); tiered's own errors
    pass through. ``missing`` is what a ``FileNotFoundError`` means here (say, "the bucket does
    not exist" for a write to an object store)."""
    try:
        yield
    except TieredError:
        raise
    except FileNotFoundError as err:
        raise NotFound(f"{what}: {missing or 'not found'}") from err
    except (TypeError, AttributeError, KeyError, AssertionError):
        raise
    except Exception as err:
        transient, text = _classify(err)
        filename = getattr(err, "filename", None)
        if filename and str(filename) in what:  # said once is enough
            text = text.removesuffix(f": {filename}")
        raise StorageError(f"{what}: {text}", transient=transient) from err


# -- local tier ----------------------------------------------------------------------------------


def read_step_metadata(step_dir: Path) -> tuple[Reason, float | None]:
    """(reason, commit time) from orbax's ``_CHECKPOINT_METADATA``, without importing orbax."""
    try:
        data = json.loads((step_dir / CHECKPOINT_METADATA).read_text())
    except (OSError, ValueError):
        return "unknown", None
    if not isinstance(data, dict):
        return "unknown", None
    custom = data.get("custom_metadata") or {}
    tiered_meta = custom.get("tiered") if isinstance(custom, dict) else None
    reason = as_reason(tiered_meta.get("reason")) if isinstance(tiered_meta, dict) else "unknown"
    nsecs = data.get("commit_timestamp_nsecs")
    return reason, (nsecs / 1e9 if isinstance(nsecs, int | float) else None)


class LocalTier:
    """The node-local step directories, read with plain OS calls.

    A committed step is ``<root>/<step>`` holding ``commit_success.txt``. It may be a symlink into
    ``.tiered/staging`` (a step restored through orbax's multi-tier protocol).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._size_cache: dict[tuple[int, int], int] = {}
        self._identity_cache: dict[tuple[int, int, int], str] = {}

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
            reason, commit_time = read_step_metadata(path)
            size = self._size(path, marker_stat) if with_size else None
            facts.append(
                LocalStep(
                    step=ref.step,
                    committed=True,
                    reason=reason,
                    commit_time=commit_time if commit_time is not None else marker_stat.st_mtime,
                    size=size,
                    is_link=is_link,
                    identity=self._identity(ref.step, marker_stat),
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

    def _identity(self, step: int, marker_stat: os.stat_result) -> str | None:
        """The identity of the step's kept manifest, if it has a valid one (see ``manifest``)."""
        try:
            st = self.manifest_path(step).stat()
        except OSError:
            return None
        if st.st_mtime_ns < marker_stat.st_mtime_ns:
            return None
        key = (step, st.st_mtime_ns, st.st_size)
        if key not in self._identity_cache:
            cached = self.cached_manifest(step)
            if cached is None:
                return None
            self._identity_cache[key] = cached.identity
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

    def set_aside(self, step: int, *, now: float, keep: int = 2) -> Path:
        """Move a committed step out of the way, whole, into ``.tiered/displaced/`` (another
        step of its number is about to be saved: the run went back to an older step). The
        newest ``keep`` steps set aside are kept there; older ones are deleted."""
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
        with contextlib.suppress(FileNotFoundError):
            for entry in self.trash_dir.iterdir():
                shutil.rmtree(entry, ignore_errors=True)

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


# -- durable tier --------------------------------------------------------------------------------


def _object_version(info: dict[str, Any]) -> str:
    """What changes when an object is written again (generation, ETag, mtime, inode)."""
    keys = ("generation", "ETag", "etag", "mtime", "updated", "LastModified", "ino", "size")
    return ";".join(f"{k}={info[k]}" for k in keys if info.get(k) is not None)


def _entry_crc32c(info: dict[str, Any]) -> int | None:
    raw = info.get("crc32c")
    if isinstance(raw, str):
        with contextlib.suppress(ValueError):
            return crc32c_from_b64(raw)
    return None


class DurableTier:
    """The durable tier over any fsspec filesystem (``gs://``, ``s3://``, ``file://``, ...)."""

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        concurrency: int = 8,
        download_concurrency: int | None = None,
        bandwidth_mbps: float | None = None,
        node_rank: int = 0,
        num_nodes: int = 1,
    ) -> None:
        raw_url = normalize_url(url)
        self.url = redact_url(raw_url)  # for messages and status; never holds credentials
        self.protocol = raw_url.partition("://")[0]
        options = dict(storage_options or {})
        if self.protocol == "file":
            options.setdefault("auto_mkdir", True)
        with translate_errors(f"opening {self.url}"):
            self.fs, self.root = fsspec.core.url_to_fs(raw_url, **options)
        self.root = self.root.rstrip("/")
        self.concurrency = concurrency
        self.download_concurrency = download_concurrency or concurrency
        self._limiter = _RateLimiter(bandwidth_mbps * 1e6 / 8) if bandwidth_mbps else None
        self._budget = _MemoryBudget(_TRANSFER_MEMORY)
        self._manifests: dict[int, tuple[str, Manifest | None, str | None, bool]] = {}
        self.node_rank = 0
        self.num_nodes = 1
        self.set_topology(node_rank, num_nodes)

    def set_topology(self, node_rank: int, num_nodes: int) -> None:
        """Which node this process is, of how many (one daemon per node when ``num_nodes > 1``)."""
        if num_nodes < 1 or not 0 <= node_rank < num_nodes:
            raise ValueError(f"node rank {node_rank} must be in 0..{num_nodes - 1}")
        self.node_rank = node_rank
        self.num_nodes = num_nodes

    @property
    def multi_node(self) -> bool:
        return self.num_nodes > 1

    def _node_prefix(self) -> str:
        """Where this node's files go inside a step: ``node-<r>/`` when there are several."""
        return f"{node_dir(self.node_rank)}/" if self.multi_node else ""

    def __repr__(self) -> str:
        return f"DurableTier({self.url!r})"

    def _path(self, step: int, rel: str | None = None) -> str:
        base = f"{self.root}/{step_name(step)}"
        return f"{base}/{rel}" if rel else base

    def step_url(self, step: int) -> str:
        return f"{self.url}/{step_name(step)}"

    # -- listing --

    def check(self) -> None:
        """Fail with a precise message when the tier cannot be reached or written."""
        with translate_errors(f"reaching {self.url}"):
            if self.protocol == "file":
                Path(self.root).mkdir(parents=True, exist_ok=True)
                return
            self.fs.invalidate_cache()
            bucket = self.root.split("/", 1)[0]
            try:
                self.fs.info(bucket)
            except FileNotFoundError:
                raise StorageError(
                    f"{self.url}: bucket {bucket!r} does not exist or is not visible to these "
                    "credentials",
                    transient=False,
                ) from None

    def _ls_steps(self) -> list[int]:
        with translate_errors(f"listing {self.url}"):
            self.fs.invalidate_cache(self.root)
            try:
                entries = self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                return []
        steps = []
        for entry in entries:
            ref = parse_step(str(entry).rstrip("/").rsplit("/", 1)[-1])
            if ref is not None:
                steps.append(ref.step)
        return sorted(set(steps))

    def _marker_version(self, step: int) -> str | None:
        """A token that changes whenever the step's commit marker is written again; None when
        the step has no marker."""
        with translate_errors(f"reading {self.step_url(step)}"):
            try:
                info = self.fs.info(self._path(step, COMMIT_MARKER))
            except FileNotFoundError:
                return None
        return _object_version(info)

    def _has_marker(self, step: int) -> bool:
        return self._marker_version(step) is not None

    def scan(self) -> list[DurableStep]:
        """Every step prefix on the durable tier, committed or partial, oldest first, each
        committed one with the identity of its manifest (this node's part, with several nodes)
        or the reason it has none."""
        facts = []
        for step in self._ls_steps():
            version = self._marker_version(step)
            if version is None:
                self._manifests.pop(step, None)
                facts.append(DurableStep(step=step, committed=False))
                continue
            manifest, problem, tiered = self._step_manifest(step, version)
            facts.append(
                DurableStep(
                    step=step,
                    committed=True,
                    identity=manifest.identity if manifest else None,
                    reason=as_reason(manifest.reason) if manifest else "unknown",
                    commit_time=manifest.commit_time if manifest else None,
                    size=manifest.total_bytes if manifest else None,
                    problem=problem,
                    tiered=tiered,
                )
            )
        return facts

    def committed_steps(self) -> list[int]:
        """Committed steps this tier can verify (foreign ones are left out)."""
        return [f.step for f in self.scan() if f.kept]

    def _step_manifest(self, step: int, version: str) -> tuple[Manifest | None, str | None, bool]:
        """(this node's manifest or None, why not, whether a tiered manifest is there). With
        several nodes that is this node's own part marker: the merged manifest lists every
        node's files, and a thousand nodes each reading it would move a thousand times its
        size. Kept per marker version, so a step written again is read again."""
        cached = self._manifests.get(step)
        if cached is not None and cached[0] == version:
            return cached[1], cached[2], cached[3]
        manifest: Manifest | None = None
        problem: str | None = None
        tiered = True
        try:
            manifest = (
                self.read_part(step, self.node_rank)
                if self.multi_node
                else (self.read_manifest(step))
            )
        except FileNotFoundError:
            if self.multi_node:
                problem = f"no part for node {self.node_rank}: written by a job of another shape"
            else:
                problem, tiered = f"no {MANIFEST_NAME}: not written by tiered", False
        except LayoutError as err:
            problem, tiered = f"unreadable manifest: {err}", False
        if manifest is not None and manifest.nodes != self.num_nodes:
            problem = f"written by a job of {manifest.nodes} node(s), this one has {self.num_nodes}"
            manifest = None
        self._manifests[step] = (version, manifest, problem, tiered)
        return manifest, problem, tiered

    def read_manifest(self, step: int) -> Manifest:
        with translate_errors(f"reading the manifest of {self.step_url(step)}"):
            data = self.fs.cat_file(self._path(step, MANIFEST_NAME))
        manifest = Manifest.from_json(data)
        if manifest.step != step:
            raise LayoutError(
                f"{self.step_url(step)}: manifest is for step {manifest.step}, not {step}"
            )
        return manifest

    def _remote_files(self, step: int, *, under: str = "") -> dict[str, dict[str, Any]]:
        """Relative path -> fsspec info of every object under a step (or its ``under`` folder)."""
        prefix = self._path(step, under.rstrip("/")) if under else self._path(step)
        with translate_errors(f"listing {self.step_url(step)}"):
            self.fs.invalidate_cache(prefix)
            try:
                found = self.fs.find(prefix, detail=True)
            except FileNotFoundError:
                return {}
        out = {}
        for path, info in found.items():
            path = str(path)
            if info.get("type") == "directory":
                continue
            rel = path[len(prefix) :].lstrip("/")
            if rel:
                out[rel] = info
        return out

    # -- promotion --

    def upload_step(
        self,
        step_dir: Path,
        *,
        step: int,
        progress: Progress | None = None,
        manifest: Manifest | None = None,
        epoch: int = 0,
    ) -> TransferResult:
        """Upload, verify, write the manifest, then the commit marker. Idempotent.

        What moves is decided first (``plan_transfer``): files already there with the right
        size and checksum are skipped, and objects under the step that the manifest does not
        list (left by an earlier, different upload) are removed before the commit, so a
        committed step holds exactly the local step's files. A step that is already committed
        is never written again: with the same content this is a no-op, with other content it
        raises ``StepExists`` (the planner moves it aside first).

        With several nodes this node's files go under ``node-<r>/`` and end with its part
        marker (carrying ``epoch``) instead: node 0 commits the step once every part is there
        (``commit_parts``).
        """
        started = time.monotonic()
        if manifest is None:
            reason, commit_time = read_step_metadata(step_dir)
            manifest = build_manifest(step_dir, step=step, reason=reason, commit_time=commit_time)
        version = self._marker_version(step)
        if version is not None:
            existing_manifest, _problem, _tiered = self._step_manifest(step, version)
            if existing_manifest is None or existing_manifest.identity != manifest.identity:
                raise StepExists(
                    f"{self.step_url(step)} is already committed with other content; "
                    "not overwritten"
                )
            return TransferResult(
                step=step,
                bytes_total=manifest.total_bytes,
                bytes_moved=0,
                files_total=len(manifest.files),
                files_skipped=len(manifest.files),
                seconds=time.monotonic() - started,
                manifest=manifest,
            )
        under = self._node_prefix()
        transfer = plan_transfer(manifest, self._remote_facts(step, manifest, under=under))
        total = manifest.total_bytes
        done = total - sum(manifest.files[r].size for r in transfer.put)
        lock = threading.Lock()
        if progress:
            progress(done, total)

        def put(rel: str) -> None:
            nonlocal done
            remote_path = self._path(step, under + rel)
            if self._limiter:
                self._limiter.take(manifest.files[rel].size)
            with translate_errors(
                f"uploading {rel} to {self.step_url(step)}",
                missing="not found (the local file vanished, or the bucket does not exist)",
            ):
                size = manifest.files[rel].size
                options, buffered = _put_options(self.protocol, size)
                with self._budget.reserve(buffered):
                    if self.protocol == "file":
                        size, crc = copy_with_crc32c(step_dir / rel, Path(remote_path))
                        check_entry(
                            f"{self.step_url(step)}/{rel}",
                            manifest.files[rel],
                            size=size,
                            crc32c=crc,
                        )
                    else:
                        self.fs.put_file(str(step_dir / rel), remote_path, **options)
            faults.hit("upload-file")
            with lock:
                done += manifest.files[rel].size
                if progress:
                    progress(done, total)

        self._run_parallel(put, list(transfer.put))
        for rel in transfer.remove:
            with (
                translate_errors(f"removing the stray {rel} from {self.step_url(step)}"),
                contextlib.suppress(FileNotFoundError),
            ):
                self.fs.rm_file(self._path(step, under + rel))
        # On file:// the copy above checksummed every byte it wrote; reading it back would read
        # the page cache, which proves nothing more, so only sizes are checked again here.
        self._verify_files(step, manifest, under=under, read_back=self.protocol != "file")
        if self.multi_node:
            part = replace(
                manifest,
                node=self.node_rank,
                nodes=self.num_nodes,
                epoch=epoch,
                host=socket.gethostname(),
            )
            with translate_errors(f"writing node {self.node_rank}'s part of {self.step_url(step)}"):
                self._put_small(
                    self._path(step, part_marker(self.node_rank)), part.to_json().encode()
                )
        else:
            with translate_errors(f"committing {self.step_url(step)}"):
                self._put_small(self._path(step, MANIFEST_NAME), manifest.to_json().encode())
                faults.hit("commit")
                marker = step_dir / COMMIT_MARKER
                if not self.create_exclusive(self._path(step, COMMIT_MARKER), marker.read_bytes()):
                    raise StepExists(
                        f"{self.step_url(step)} was committed by another writer meanwhile"
                    )
        moved = sum(manifest.files[r].size for r in transfer.put)
        return TransferResult(
            step=step,
            bytes_total=total,
            bytes_moved=moved,
            files_total=len(manifest.files),
            files_skipped=len(manifest.files) - len(transfer.put),
            seconds=time.monotonic() - started,
            manifest=manifest,
        )

    def _remote_facts(self, step: int, manifest: Manifest, *, under: str) -> dict[str, RemoteFile]:
        """Size and crc32c of every object under the step (or its ``under`` folder). The crc32c
        comes from the listing where the backend keeps one (GCS); otherwise it is read back,
        streamed, only for objects whose size already matches the manifest."""
        remote = self._remote_files(step, under=under)
        facts: dict[str, RemoteFile] = {}
        for rel, info in remote.items():
            size = int(info.get("size", -1))
            crc = _entry_crc32c(info)
            entry = manifest.files.get(rel)
            if crc is None and entry is not None and size == entry.size:
                crc = self._read_crc32c(step, under + rel)
            facts[rel] = RemoteFile(size=size, crc32c=crc)
        return facts

    def _read_crc32c(self, step: int, rel: str) -> int:
        """The crc32c of an object, streamed in bounded reads: never the whole object at once."""
        block = self._read_block()
        with (
            translate_errors(f"reading back {rel} of {self.step_url(step)}"),
            self._budget.reserve(block),
            self.fs.open(self._path(step, rel), "rb", **self._stream_options(block)) as f,
        ):
            return crc32c_of_stream(f, chunk=block)[1]

    def _read_block(self) -> int:
        # S3 has no crc32c in its listings, so uploads are read back; each read is one ranged
        # GET, and fewer, larger ones cost less per byte.
        return _S3_PART * 2 if self.protocol in ("s3", "s3a") else _CHUNK

    def _stream_options(self, block: int) -> dict[str, Any]:
        # Each read is one ranged request of the size asked for; no read-ahead cache.
        return {} if self.protocol == "file" else {"block_size": block, "cache_type": "none"}

    # -- moving a step aside --

    def displace_step(self, step: int, *, now: float) -> str:
        """Move a committed step whole to ``.tiered/displaced/<step>-<time>/`` (a name no
        orbax reader takes for a step), so a different step of the same number can take its
        place; return the new name. On ``file://`` this is one rename. On object stores the
        objects are copied server-side, the marker last, and the original is then deleted
        marker first: a crash leaves the original committed or the copy whole, never neither.
        """
        if not self._has_marker(step):
            raise CommitError(f"{self.step_url(step)} is not committed: nothing to move aside")
        name = displaced_name(step, now)
        dest = f"{self.root}/{DISPLACED_DIR}/{name}"
        with translate_errors(f"moving {self.step_url(step)} aside"):
            if self.protocol == "file":
                Path(dest).parent.mkdir(parents=True, exist_ok=True)
                os.rename(self._path(step), dest)
                self.fs.invalidate_cache(self.root)
                return name
            objects = self._remote_files(step)
        data = sorted(rel for rel in objects if rel != COMMIT_MARKER)

        def copy(rel: str) -> None:
            with translate_errors(f"copying {rel} of {self.step_url(step)} aside"):
                self.fs.cp_file(self._path(step, rel), f"{dest}/{rel}")

        self._run_parallel(copy, data)
        if COMMIT_MARKER in objects:
            copy(COMMIT_MARKER)
        self.delete_step(step)
        return name

    def list_displaced(self) -> list[Displaced]:
        """Steps moved aside, oldest first."""
        out = []
        for name in self.list_names(DISPLACED_DIR):
            parsed = parse_displaced(name)
            if parsed is not None:
                out.append(parsed)
        return sorted(out, key=lambda d: (d.moved_at or 0.0, d.name))

    def verify_step(
        self, step: int, manifest: Manifest | None = None, *, read_back: bool = True
    ) -> Manifest:
        """Check every object of a step against its manifest.

        Sizes always; crc32c from object metadata where the backend gives it (GCS), otherwise
        by reading the object back, unless ``read_back`` is False.
        """
        manifest = manifest or self.read_manifest(step)
        self._verify_files(step, manifest, read_back=read_back)
        return manifest

    def _verify_files(
        self, step: int, manifest: Manifest, *, under: str = "", read_back: bool = True
    ) -> None:
        remote = self._remote_files(step, under=under)
        missing = [rel for rel in manifest.files if rel not in remote]
        if missing:
            raise ChecksumMismatch(
                f"{self.step_url(step)}: {len(missing)} file(s) missing, e.g. {under}{missing[0]}"
            )

        def check(rel: str) -> None:
            info = remote[rel]
            crc = _entry_crc32c(info)
            if crc is None and read_back:
                crc = self._read_crc32c(step, under + rel)
            check_entry(
                f"{self.step_url(step)}/{under}{rel}",
                manifest.files[rel],
                size=int(info.get("size", -1)),
                crc32c=crc,
            )

        self._run_parallel(check, sorted(manifest.files))

    # -- multi-node commit --

    def part_ranks(self, step: int) -> list[int]:
        """Nodes whose part marker of a multi-node step exists (one listing, no reads)."""
        names = self.list_names(f"{step_name(step)}/{PARTS_DIR}")
        return sorted(
            int(n.removesuffix(".json"))
            for n in names
            if n.endswith(".json") and n.removesuffix(".json").isdigit()
        )

    def read_parts(self, step: int) -> dict[int, Manifest]:
        """node rank -> part marker, for every part of a multi-node step written so far; read in
        parallel, since node 0 reads all N of them before a commit."""
        ranks = self.part_ranks(step)
        texts = self.read_texts([f"{step_name(step)}/{part_marker(r)}" for r in ranks])
        parts = {}
        for rank, text in zip(ranks, texts, strict=True):
            if text is None:
                raise FileNotFoundError(f"{self.step_url(step)}/{part_marker(rank)}")
            parts[rank] = self._parse_part(step, rank, text)
        return parts

    def read_part(self, step: int, rank: int) -> Manifest:
        with translate_errors(f"reading {self.step_url(step)}/{part_marker(rank)}"):
            data = self.fs.cat_file(self._path(step, part_marker(rank)))
        return self._parse_part(step, rank, data)

    def _parse_part(self, step: int, rank: int, data: str | bytes) -> Manifest:
        part = Manifest.from_json(data)
        if part.step != step or part.node != rank:
            raise LayoutError(
                f"{self.step_url(step)}/{part_marker(rank)}: holds step {part.step} "
                f"node {part.node}"
            )
        return part

    def commit_parts(self, step: int, *, epoch: int, marker: bytes) -> list[int]:
        """Commit a multi-node step once every node's part is there; return the missing ranks.

        Only node 0 calls this, so two committers never race; the marker is still created with a
        precondition (GCS ``ifGenerationMatch=0``, S3 ``If-None-Match``, an exclusive link on
        ``file://``) where the backend has one. A part from another restore epoch is stale (the
        run restarted from an older step since) and counts as missing.
        """
        if self._has_marker(step):
            return []
        listed = self.part_ranks(step)
        if len(listed) < self.num_nodes:
            # Read one part (a single small GET) so a job-shape mismatch shows up at once.
            sample = {listed[-1]: self.read_part(step, listed[-1])} if listed else {}
            self._check_part_shapes(step, sample)
            return [r for r in range(self.num_nodes) if r not in listed]
        parts = self.read_parts(step)
        self._check_part_shapes(step, parts)
        fresh = {r: p for r, p in parts.items() if p.epoch == epoch}
        missing = [r for r in range(self.num_nodes) if r not in fresh]
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
            nodes=self.num_nodes,
            epoch=epoch,
        )
        # Each node read its own objects back before writing its part; here every object is
        # checked once more for presence and size (and crc32c where listings carry it).
        self._verify_files(step, merged, read_back=False)
        with translate_errors(f"committing {self.step_url(step)}"):
            self._put_small(self._path(step, MANIFEST_NAME), merged.to_json().encode())
            faults.hit("commit")
            if not self.create_exclusive(self._path(step, COMMIT_MARKER), marker):
                log.warning(
                    "%s was already committed by another writer; kept its marker",
                    self.step_url(step),
                )
        return []

    def _check_part_shapes(self, step: int, parts: dict[int, Manifest]) -> None:
        for rank, part in parts.items():
            if part.nodes != self.num_nodes or rank >= self.num_nodes:
                raise CommitError(
                    f"{self.step_url(step)}: node {rank}'s part was written by a job of "
                    f"{part.nodes} nodes, but this job has {self.num_nodes}: is tiered.num_nodes "
                    "the same on every node?"
                )

    def _put_small(self, path: str, data: bytes) -> None:
        """Write a small object whole: object stores replace objects atomically, and on
        ``file://`` a temporary name is renamed into place, so a reader (another node polling
        for a part marker or a decision) never sees half of it."""
        if self.protocol == "file":
            publish_file(path, data)
        else:
            self.fs.pipe_file(path, data)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create an object only if it does not exist; False when it already did."""
        if self.protocol == "file":
            return publish_file(path, data, exclusive=True)
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    # -- small coordination objects (paths relative to the tier's root) --

    def read_text(self, rel: str) -> str | None:
        """A small object's text, or None when it does not exist."""
        with translate_errors(f"reading {self.url}/{rel}"):
            try:
                return self.fs.cat_file(f"{self.root}/{rel}").decode()
            except FileNotFoundError:
                return None

    def read_texts(self, rels: list[str]) -> list[str | None]:
        """Several small objects at once (None for each one that does not exist)."""
        out: dict[str, str | None] = {}

        def read(rel: str) -> None:
            out[rel] = self.read_text(rel)

        self._run_parallel(read, rels)
        return [out[rel] for rel in rels]

    def list_names(self, rel: str) -> set[str]:
        """Names directly under a folder (empty when it does not exist)."""
        folder = f"{self.root}/{rel}"
        with translate_errors(f"listing {self.url}/{rel}"):
            self.fs.invalidate_cache(folder)
            try:
                return {
                    str(p).rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)
                }
            except FileNotFoundError:
                return set()

    def write_text(self, rel: str, text: str) -> None:
        with translate_errors(f"writing {self.url}/{rel}"):
            self._put_small(f"{self.root}/{rel}", text.encode())

    # -- restore --

    def download_step(
        self,
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
        files are downloaded, into ``dest`` itself.
        """
        started = time.monotonic()
        if not self._has_marker(step):
            raise CommitError(f"{self.step_url(step)} is not committed")
        manifest, under = self._restore_manifest(step)
        if only is not None:
            prefix = only.strip("/") + "/"
            files = {r[len(prefix) :]: e for r, e in manifest.files.items() if r.startswith(prefix)}
            if not files:
                items = sorted({r.split("/")[0] for r in manifest.files if "/" in r})
                raise CommitError(
                    f"{self.step_url(step)} has no item {only!r} (it has {', '.join(items)})"
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
            with translate_errors(f"downloading {rel} of {self.step_url(step)}"):
                size_expected = manifest.files[rel].size
                remote = self._path(step, under + rel)
                if self.protocol != "file" and size_expected > _RANGED_MIN_BYTES:
                    self._get_ranged(remote, local, size_expected)
                else:
                    self.fs.get_file(remote, str(local))
            size, crc = crc32c_of_file(local)
            check_entry(f"{self.step_url(step)}/{rel}", manifest.files[rel], size=size, crc32c=crc)
            with lock:
                done += size
                if progress:
                    progress(done, total)

        try:
            self._run_parallel(get, sorted(manifest.files), workers=self.download_concurrency)
            if only is None:
                with translate_errors(f"downloading the commit marker of {self.step_url(step)}"):
                    self.fs.get_file(self._path(step, COMMIT_MARKER), str(partial / COMMIT_MARKER))
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

    def _restore_manifest(self, step: int) -> tuple[Manifest, str]:
        """What this node downloads of a step: (its files, the folder they are in)."""
        if not self.multi_node:
            manifest = self.read_manifest(step)
            if manifest.nodes != 1:
                raise CommitError(
                    f"{self.step_url(step)} was written by {manifest.nodes} nodes; restore it "
                    f"with tiered.num_nodes: {manifest.nodes} and each node's tiered.node_rank"
                )
            return manifest, ""
        try:
            part = self.read_part(step, self.node_rank)
        except FileNotFoundError:
            raise CommitError(
                f"{self.step_url(step)} has no part for node {self.node_rank}: it was written by "
                f"a job with a different number of nodes than this one ({self.num_nodes})"
            ) from None
        if part.nodes != self.num_nodes:
            raise CommitError(
                f"{self.step_url(step)} was written by {part.nodes} nodes, but this job has "
                f"{self.num_nodes}"
            )
        return part, self._node_prefix()

    def _get_ranged(self, remote: str, local: Path, size: int) -> None:
        """Download one large object as parallel byte ranges: a single stream per object
        leaves most of the bandwidth unused when a step is a few large files."""
        ranges = [
            (start, min(start + _RANGE_BYTES, size)) for start in range(0, size, _RANGE_BYTES)
        ]
        fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)

            def fetch(span: tuple[int, int]) -> None:
                # The range is in memory until it is written: the budget bounds how many are.
                with self._budget.reserve(span[1] - span[0]):
                    data = self.fs.cat_file(remote, start=span[0], end=span[1])
                    if len(data) != span[1] - span[0]:
                        raise ChecksumMismatch(
                            f"{remote}: range {span[0]}-{span[1]} returned {len(data)} bytes"
                        )
                    os.pwrite(fd, data, span[0])
                    del data

            with ThreadPoolExecutor(max_workers=4, thread_name_prefix="tiered-range") as pool:
                for future in [pool.submit(fetch, span) for span in ranges]:
                    future.result()
        finally:
            os.close(fd)

    # -- deletion --

    def delete_step(self, step: int) -> None:
        """Marker first, then the manifest, then the data."""
        self._manifests.pop(step, None)
        for rel in (COMMIT_MARKER, MANIFEST_NAME):
            with (
                translate_errors(f"deleting {rel} of {self.step_url(step)}"),
                contextlib.suppress(FileNotFoundError),
            ):
                self.fs.rm_file(self._path(step, rel))
        faults.hit("prune-durable")
        with translate_errors(f"deleting {self.step_url(step)}"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._path(step), recursive=True)
            self.fs.invalidate_cache(self.root)

    def _run_parallel(
        self, fn: Callable[[str], None], items: list[str], *, workers: int | None = None
    ) -> None:
        if not items:
            return
        n = min(workers or self.concurrency, len(items))
        if n == 1:
            for item in items:
                fn(item)
            return
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="tiered-io") as pool:
            futures = [pool.submit(fn, item) for item in items]
            errors = [f.exception() for f in futures]
        for err in errors:
            if err is not None:
                raise err


def copy_with_crc32c(src: Path, dest: Path) -> tuple[int, int]:
    """Copy a file, checksumming the bytes as they are written; the file appears whole or not
    at all (written to a temporary name, synced, then renamed)."""
    import google_crc32c

    checksum = google_crc32c.Checksum()
    size = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(tmp_name(dest.name))
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                checksum.update(chunk)
                fout.write(chunk)
                size += len(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return size, int.from_bytes(checksum.digest(), "big")


_CHUNK = 8 * 1024 * 1024
# The step data a tier holds in memory at once (see _MemoryBudget): with the interpreter and the
# clients, a daemon moving a step of multi-GB files stays under 200 MB.
_TRANSFER_MEMORY = 64 * 1024 * 1024
_RANGED_MIN_BYTES = 64 * 1024 * 1024
# Each range arrives as one bytes object. Kept well under 32 MiB, glibc's ceiling for serving an
# allocation from the reusable heap: at 32 MiB every range was a fresh mmap, zero-filled page by
# page (250,000 page faults per GiB downloaded), and a 1 GiB step downloaded 1.5x slower.
_RANGE_BYTES = 16 * 1024 * 1024


class _MemoryBudget:
    """Bytes of step data that may be in memory at once, across every transfer of a tier.

    Object-store clients buffer what they send or receive (gcsfs one resumable chunk per file,
    s3fs its multipart parts, a ranged download its range), so without a bound the peak grows
    with the files in flight and their sizes. A reservation larger than the whole budget waits
    for everything else, then takes it all."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = capacity
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, amount: int) -> Iterator[None]:
        amount = max(0, min(amount, self.capacity))
        with self._cond:
            self._cond.wait_for(lambda: self._free >= amount)
            self._free -= amount
        try:
            yield
        finally:
            with self._cond:
                self._free += amount
                self._cond.notify_all()


# What the object-store clients buffer per file, and the options that keep it small: gcsfs sends
# a resumable upload in chunks (a multiple of 256 KiB; objects under 5 MiB go in one request);
# s3fs sends parts of at least 5 MiB, and an object under two parts in one request.
# gcsfs sends one request per chunk. Against the emulator, a 512 MB file took 2.9 s in 16 MiB
# chunks and 4.2 s in gcsfs's default 50 MiB; each chunk in flight costs about three times its
# size in memory (the chunk, asyncio's send buffer, the socket's).
_GCS_CHUNK = 16 * 1024 * 1024
_S3_PART = 16 * 1024 * 1024
_S3_PARTS_IN_FLIGHT = 2
_S3_MAX_PARTS = 9_000  # below S3's 10,000


def _put_options(protocol: str, size: int) -> tuple[dict[str, Any], int]:
    """(``put_file`` options, the bytes the upload holds in memory at its peak)."""
    if protocol in ("gs", "gcs"):
        return {"chunksize": _GCS_CHUNK}, min(size, _GCS_CHUNK)
    if protocol in ("s3", "s3a"):
        part = max(_S3_PART, -(-size // _S3_MAX_PARTS))
        whole = size < 2 * part
        options = {"chunksize": part, "max_concurrency": _S3_PARTS_IN_FLIGHT}
        return options, size if whole else part * _S3_PARTS_IN_FLIGHT
    return {}, min(size, _CHUNK)


class _RateLimiter:
    """A token bucket shared by the upload threads (bytes per second)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def take(self, amount: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= amount
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)

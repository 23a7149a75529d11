"""How a durable tier's backend is written: the two commit strategies, in the manner of orbax's
``AtomicRenameTemporaryPath`` and ``CommitFileTemporaryPath``.

- ``PosixStore`` (``file://``): a file is copied to a temporary name, checksummed as it is
  written, synced and renamed into place; a small file is published the same way, a create-only
  one by hard link; a step is moved aside in one rename. Nothing is read back: the copy
  checksummed every byte it wrote, and a read would only hit the page cache.
- ``ObjectStore`` (``gs://``, ``s3://``, any other fsspec URL): objects are replaced whole by the
  store, a create-only write uses the store's precondition (GCS ``ifGenerationMatch=0``, S3
  ``If-None-Match``), a step is moved aside by server-side copies, and what is uploaded is read
  back where the listing carries no checksum that settles it (S3 always; on GCS the few small
  OCDBT files that share one crc32c).

Both hold the fsspec filesystem and the tier's root; paths are the filesystem's own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec

from tiered.atomic import publish_file
from tiered.errors import StorageError
from tiered.manifest import FileEntry, check_file, crc32c_from_b64
from tiered.storage.errormap import translate_errors
from tiered.storage.transfer import (
    CHUNK,
    RANGED_MIN_BYTES,
    MemoryBudget,
    RateLimiter,
    copy_with_digest,
    get_ranged,
    run_parallel,
)
from tiered.urls import redact_url

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


def object_version(info: dict[str, Any]) -> str:
    """What changes when an object is written again (generation, ETag, mtime, inode)."""
    keys = ("generation", "ETag", "etag", "mtime", "updated", "LastModified", "ino", "size")
    return ";".join(f"{k}={info[k]}" for k in keys if info.get(k) is not None)


def listed_crc32c(info: dict[str, Any]) -> int | None:
    """The crc32c a listing carries (GCS does; S3 and local files do not)."""
    raw = info.get("crc32c")
    if isinstance(raw, str):
        with contextlib.suppress(ValueError):
            return crc32c_from_b64(raw)
    return None


class Store:
    """An fsspec filesystem and a root, written by one of the two strategies below."""

    read_back = True
    """Whether what was uploaded is read back to check its checksums (when the listing has no
    crc32c)."""
    renames = False
    """Whether a folder moves in one rename (else object by object: ``move`` is given them)."""

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        self.protocol = url.partition("://")[0]

    def prepare(self) -> None:
        """Fail with a precise message when the tier cannot be reached."""
        raise NotImplementedError

    def check_missing_root(self) -> None:
        """The root lists as missing: fine for a new run's directory or prefix; an object
        store raises here when the bucket itself is gone (a listing would say "0 steps")."""

    # -- small objects, by paths relative to the root (coordination files, part markers) --

    def read_text(self, rel: str) -> str | None:
        """A small object's text, or None when it does not exist."""
        with translate_errors(f"reading {self.url}/{rel}"):
            try:
                return self.fs.cat_file(f"{self.root}/{rel}").decode()  # small objects only
            except FileNotFoundError:
                return None

    def read_texts(self, rels: list[str], *, workers: int = 8) -> list[str | None]:
        """Several small objects at once (None for each one that does not exist)."""
        out: dict[str, str | None] = {}

        def read(rel: str) -> None:
            out[rel] = self.read_text(rel)

        run_parallel(read, rels, workers=workers)
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

    def list_versions(self, rel: str) -> dict[str, str]:
        """Name -> version (``object_version``) of each object directly under a folder, from
        one listing (empty when the folder does not exist)."""
        folder = f"{self.root}/{rel}"
        with translate_errors(f"listing {self.url}/{rel}"):
            self.fs.invalidate_cache(folder)
            try:
                found = self.fs.ls(folder, detail=True)
            except FileNotFoundError:
                return {}
        return {
            str(info["name"]).rstrip("/").rsplit("/", 1)[-1]: object_version(info)
            for info in found
            if info.get("type") != "directory"
        }

    def write_text(self, rel: str, text: str) -> None:
        """Write a small object whole: a reader (another node polling for a part marker or a
        decision) never sees half of it."""
        with translate_errors(f"writing {self.url}/{rel}"):
            self.write_small(f"{self.root}/{rel}", text.encode())

    # -- the strategy --

    def put(
        self,
        local: Path,
        remote: str,
        entry: FileEntry,
        budget: MemoryBudget,
        limiter: RateLimiter | None = None,
    ) -> None:
        """Upload one file whole (a reader never sees part of it), at ``limiter``'s pace."""
        raise NotImplementedError

    def get(self, remote: str, local: Path, size: int, budget: MemoryBudget) -> None:
        self.fs.get_file(remote, str(local))

    def write_small(self, path: str, data: bytes) -> None:
        """Write a small object whole, replacing what is there."""
        raise NotImplementedError

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create an object only if it does not exist; False when it already did."""
        raise NotImplementedError

    def copy(self, src: str, dest: str) -> None:
        """Copy one object within the store (server-side where the store can), whole."""
        raise NotImplementedError

    def move(self, src: str, dest: str, rels: list[str], last: str, parallel: Parallel) -> bool:
        """Put the folder ``src`` (objects ``rels``, ``last`` written last) at ``dest``;
        True when ``src`` is gone, False when it is still there and must be deleted."""
        raise NotImplementedError

    def read_block(self) -> int:
        """The size of one read when streaming an object back."""
        return CHUNK

    def stream_options(self, block: int) -> dict[str, Any]:
        return {}


Parallel = Callable[[Callable[[str], None], list[str]], None]


class PosixStore(Store):
    read_back = False
    renames = True

    def prepare(self) -> None:
        Path(self.root).mkdir(parents=True, exist_ok=True)

    def put(
        self,
        local: Path,
        remote: str,
        entry: FileEntry,
        budget: MemoryBudget,
        limiter: RateLimiter | None = None,
    ) -> None:
        with budget.reserve(min(entry.size, CHUNK)):
            got = copy_with_digest(local, Path(remote), limiter=limiter)
        check_file(f"file://{remote}", entry, got)

    def write_small(self, path: str, data: bytes) -> None:
        publish_file(path, data)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        return publish_file(path, data, exclusive=True)

    def copy(self, src: str, dest: str) -> None:
        copy_with_digest(Path(src), Path(dest))

    def move(self, src: str, dest: str, rels: list[str], last: str, parallel: Parallel) -> bool:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dest)
        self.fs.invalidate_cache(self.root)
        return True


class ObjectStore(Store):
    def check_missing_root(self) -> None:
        self.prepare()

    def prepare(self) -> None:
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

    def put(
        self,
        local: Path,
        remote: str,
        entry: FileEntry,
        budget: MemoryBudget,
        limiter: RateLimiter | None = None,
    ) -> None:
        if limiter is not None:  # the client streams the file itself: paced a file at a time
            limiter.take(entry.size)
        options, buffered = self._put_options(entry.size)
        with budget.reserve(buffered):
            self.fs.put_file(str(local), remote, **options)

    def _put_options(self, size: int) -> tuple[dict[str, Any], int]:
        """(``put_file`` options, the bytes the upload holds in memory at its peak)."""
        if self.protocol in ("gs", "gcs"):
            return {"chunksize": _GCS_CHUNK}, min(size, _GCS_CHUNK)
        if self.protocol in ("s3", "s3a"):
            part = max(_S3_PART, -(-size // _S3_MAX_PARTS))
            whole = size < 2 * part
            options = {"chunksize": part, "max_concurrency": _S3_PARTS_IN_FLIGHT}
            return options, size if whole else part * _S3_PARTS_IN_FLIGHT
        return {}, min(size, CHUNK)

    def get(self, remote: str, local: Path, size: int, budget: MemoryBudget) -> None:
        if size > RANGED_MIN_BYTES:
            get_ranged(self.fs, remote, local, size, budget)
        else:
            self.fs.get_file(remote, str(local))

    def write_small(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def copy(self, src: str, dest: str) -> None:
        self.fs.cp_file(src, dest)

    def move(self, src: str, dest: str, rels: list[str], last: str, parallel: Parallel) -> bool:
        # No rename on object stores: copy every object server-side, ``last`` (the commit
        # marker) after the rest, so the copy counts only once it is whole.
        def copy(rel: str) -> None:
            with translate_errors(f"copying {rel} of {redact_url(src)} aside"):
                self.fs.cp_file(f"{src}/{rel}", f"{dest}/{rel}")

        parallel(copy, [r for r in rels if r != last])
        if last in rels:
            copy(last)
        return False

    def read_block(self) -> int:
        # S3 has no crc32c in its listings, so uploads are read back; each read is one ranged
        # GET, and fewer, larger ones cost less per byte. One part's size, not two: the client
        # holds a read about three times over (response buffer, bytes, the caller's copy), and
        # reads of 32 MiB put `tiered promote` of one 200 MB file at the 200 MB bar.
        return _S3_PART if self.protocol in ("s3", "s3a") else CHUNK

    def stream_options(self, block: int) -> dict[str, Any]:
        # Each read is one ranged request of the size asked for; no read-ahead cache.
        return {"block_size": block, "cache_type": "none"}


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    """The store for a normalized URL (credentials in it are kept out of ``Store.url``)."""
    protocol = url.partition("://")[0]
    options = dict(storage_options or {})
    if protocol == "file":
        options.setdefault("auto_mkdir", True)
    shown = redact_url(url)
    with translate_errors(f"opening {shown}"):
        fs, root = fsspec.core.url_to_fs(url, **options)
    return (PosixStore if protocol == "file" else ObjectStore)(fs, root, shown)

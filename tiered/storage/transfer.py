"""Moving bytes: what an upload moves (a pure function of the manifest and the listing), and the
bounds every transfer keeps (memory, bandwidth, threads).

Nothing here decides when a step moves or knows the commit order; ``tiered.storage.durable``
does, and uses these pieces.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiered.errors import ChecksumMismatch
from tiered.layout import is_marker_or_manifest, tmp_name
from tiered.manifest import Digest, FileEntry, Manifest

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes total) as a transfer proceeds."""

CHUNK = 8 * 1024 * 1024
# The step data a tier holds in memory at once (see MemoryBudget): with the interpreter and the
# clients, a daemon moving a step of multi-GB files stays under 200 MB.
TRANSFER_MEMORY = 64 * 1024 * 1024
RANGED_MIN_BYTES = 64 * 1024 * 1024
# Each range arrives as one bytes object. Kept well under 32 MiB, glibc's ceiling for serving an
# allocation from the reusable heap: at 32 MiB every range was a fresh mmap, zero-filled page by
# page (250,000 page faults per GiB downloaded), and a 1 GiB step downloaded 1.5x slower.
RANGE_BYTES = 16 * 1024 * 1024


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
    xxh3: str | None = None
    """Known only where the object was read back."""


@dataclass(frozen=True)
class TransferPlan:
    put: tuple[str, ...]
    """Files to upload: missing, or there with other bytes."""
    skip: tuple[str, ...]
    """Files already there with the manifest's bytes (``same_bytes``)."""
    remove: tuple[str, ...]
    """Objects under the step that the manifest does not list."""


CRC32C_RESIDUE = 0x48674BC7
"""The crc32c of any file that ends with its own crc32c (little-endian), as every OCDBT file
(``manifest.ocdbt``, ``d/...``) does: all of them share this one value, so for them size and
crc32c say nothing about which bytes a file holds; only the xxh3 does."""


def crc32c_tells_apart(entry: FileEntry) -> bool:
    """Whether a matching crc32c (the one GCS keeps, say) shows a file holds the manifest's
    bytes: not for a file whose crc32c is ``CRC32C_RESIDUE``, which every OCDBT file has."""
    return entry.crc32c != CRC32C_RESIDUE


def listing_proves(entry: FileEntry, crc32c: int | None) -> bool:
    """Whether a crc32c the store lists settles whether an object holds the manifest's bytes:
    one is there, and it differs, or it tells files apart, or the manifest (before tiered 0.3)
    has no xxh3 to check beyond it."""
    return crc32c is not None and (
        crc32c != entry.crc32c or entry.xxh3 is None or crc32c_tells_apart(entry)
    )


def same_bytes(entry: FileEntry, there: RemoteFile) -> bool:
    """Whether an object already there holds the manifest's bytes: size and crc32c equal, and
    the xxh3 where both sides know it; without one, only a crc32c that tells files apart
    counts (an older run's ``manifest.ocdbt`` of the same size has the same crc32c)."""
    if there.size != entry.size or there.crc32c != entry.crc32c:
        return False
    if entry.xxh3 is not None and there.xxh3 is not None:
        return there.xxh3 == entry.xxh3
    return crc32c_tells_apart(entry)


def plan_transfer(manifest: Manifest, remote: dict[str, RemoteFile]) -> TransferPlan:
    """What an upload of ``manifest`` moves, given what is already under the step: a file
    already there is skipped when it holds the same bytes (``same_bytes``)."""
    put: list[str] = []
    skip: list[str] = []
    for rel, entry in sorted(manifest.files.items()):
        there = remote.get(rel)
        ok = there is not None and same_bytes(entry, there)
        (skip if ok else put).append(rel)
    remove = sorted(
        rel for rel in remote if rel not in manifest.files and not is_marker_or_manifest(rel)
    )
    return TransferPlan(put=tuple(put), skip=tuple(skip), remove=tuple(remove))


class MemoryBudget:
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


class RateLimiter:
    """A token bucket shared by the transfer threads (bytes per second). ``lift`` lets every
    waiting and later ``take`` through at once: a paced transfer that must now hurry."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.last = time.monotonic()
        self.lock = threading.Lock()
        self._lifted = threading.Event()

    def take(self, amount: int) -> None:
        if self._lifted.is_set():
            return
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= amount
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            self._lifted.wait(wait)

    def lift(self) -> None:
        self._lifted.set()

    @property
    def lifted(self) -> bool:
        return self._lifted.is_set()


def run_parallel(fn: Callable[[str], None], items: Sequence[str], *, workers: int) -> None:
    """``fn`` over ``items`` on up to ``workers`` threads; the first error is raised once all
    have finished (nothing is left running behind the caller's back)."""
    if not items:
        return
    n = min(workers, len(items))
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


def copy_with_digest(src: Path, dest: Path, *, limiter: RateLimiter | None = None) -> FileEntry:
    """Copy a file, checksumming the bytes as they are written (``Digest``); the file appears
    whole or not at all (written to a temporary name, synced, then renamed). With ``limiter``,
    chunk by chunk at its pace."""
    digest = Digest()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(tmp_name(dest.name))
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(CHUNK):
                if limiter is not None:
                    limiter.take(len(chunk))
                digest.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return digest.entry()


def get_ranged(fs: Any, remote: str, local: Path, size: int, budget: MemoryBudget) -> None:
    """Download one large object as parallel byte ranges: a single stream per object leaves
    most of the bandwidth unused when a step is a few large files."""
    ranges = [(start, min(start + RANGE_BYTES, size)) for start in range(0, size, RANGE_BYTES)]
    fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)

        def fetch(span: tuple[int, int]) -> None:
            # The range is in memory until it is written: the budget bounds how many are.
            with budget.reserve(span[1] - span[0]):
                data = fs.cat_file(remote, start=span[0], end=span[1])  # one small range
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

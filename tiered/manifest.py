"""Per-step manifests: relative path, size, crc32c and xxh3 of every file of a step.

Two checksums, computed in one pass over the bytes (``Digest``): crc32c, because GCS keeps one
for every object and so vouches for an upload without a read; and xxh3-128, because crc32c
cannot tell OCDBT files apart: each ends with its own crc32c, so every whole one has the same
crc32c (the CRC-32C residue), and only the xxh3 says which bytes it holds. Manifests written
before tiered 0.3 have no xxh3; they verify by crc32c alone, as they did.

A manifest is built from a committed local step and written to the durable tier before the
commit marker, so a committed durable step can always be checked byte for byte. The top-level
commit marker and the manifest itself are not listed (see ``layout.is_marker_or_manifest``).

Building a manifest refuses anything that could leak data from outside the step: a symlink that
resolves outside the step directory, a device, a socket or a FIFO.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import google_crc32c
import xxhash

from tiered.errors import ChecksumMismatch, LayoutError
from tiered.layout import COMMIT_MARKER, is_marker_or_manifest

MANIFEST_VERSION = 2
"""2: each file has an ``xxh3``. Version 1 manifests (no ``xxh3``) are read as they are."""
_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    size: int
    crc32c: int
    xxh3: str | None = None
    """The xxh3-128 of the bytes, 32 hex digits; None in a manifest written before tiered 0.3."""


@dataclass(frozen=True)
class Manifest:
    step: int
    files: dict[str, FileEntry] = field(default_factory=dict)
    reason: str = "unknown"
    commit_time: float | None = None
    # Multi-node steps: how many nodes wrote the step; for a part marker, which node wrote it,
    # under which restore epoch, on which host.
    nodes: int = 1
    node: int | None = None
    epoch: int = 0
    host: str | None = None
    layout: str | None = None
    """``"global"``: a multi-node step laid out as one orbax checkpoint (``layout.part_path``);
    None: one node's step, or a multi-node one of tiered 0.2 (``node-<r>/`` folders)."""
    merged: bool = False
    """A global step whose OCDBT roots node 0 merged: plain orbax reads it on any topology."""
    deduped: bool = False
    """A part marker whose OCDBT databases hold only the keys its node owns
    (``tiered.storage.dedup``): a replaced node rebuilds its own from the merged root."""
    local_identity: str | None = None
    """The identity of the local step a deduplicated part was made from; in a local step
    rebuilt from such a part, the same (its files differ from the step that was saved)."""
    key_index: FileEntry | None = None
    """A merged step's key index (``tiered-parts/keys.json``: every OCDBT key with the digest
    of its value), which a job of another shape reads its own chunks by
    (``tiered.storage.partial``); None where node 0 wrote none."""

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    @property
    def identity(self) -> str:
        """A digest of what the step holds (every file's path, size, crc32c and xxh3), and
        nothing else: two steps are the same checkpoint exactly when their identities are
        equal. An entry without an xxh3 (a manifest of before tiered 0.3) adds what it added
        then, so an old step keeps its identity."""
        digest = hashlib.sha256()
        for rel, entry in sorted(self.files.items()):
            xxh3 = f"\0{entry.xxh3}" if entry.xxh3 is not None else ""
            digest.update(f"{rel}\0{entry.size}\0{entry.crc32c}{xxh3}\n".encode())
        return digest.hexdigest()[:32]

    @property
    def copy_identity(self) -> str:
        """The identity of the local step this manifest is a copy of: its own, except for a
        deduplicated part, which holds other files than the local step it came from."""
        return self.local_identity or self.identity

    @property
    def has_xxh3(self) -> bool:
        return any(e.xxh3 is not None for e in self.files.values())

    def to_json(self) -> str:
        extra: dict[str, object] = {}
        if self.nodes != 1 or self.node is not None:
            extra = {"nodes": self.nodes, "node": self.node, "epoch": self.epoch, "host": self.host}
        if self.layout is not None:
            extra = {**extra, "layout": self.layout, "merged": self.merged}
        if self.deduped:
            extra = {**extra, "deduped": True}
        if self.local_identity is not None:
            extra = {**extra, "local_identity": self.local_identity}
        if self.key_index is not None:
            extra = {**extra, "key_index": _entry_json(self.key_index)}
        return json.dumps(
            {
                # a manifest of tiered 0.2, kept or passed on, stays what it was
                "version": MANIFEST_VERSION if self.has_xxh3 else 1,
                "step": self.step,
                "reason": self.reason,
                "commit_time": self.commit_time,
                **extra,
                "files": {p: _entry_json(e) for p, e in sorted(self.files.items())},
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text)
            files = {str(p): _entry_from_json(e) for p, e in data["files"].items()}
            commit_time = data.get("commit_time")
            manifest = cls(
                step=int(data["step"]),
                files=files,
                reason=str(data.get("reason", "unknown")),
                commit_time=float(commit_time) if commit_time is not None else None,
                nodes=int(data.get("nodes", 1)),
                node=int(data["node"]) if data.get("node") is not None else None,
                epoch=int(data.get("epoch", 0)),
                host=str(data["host"]) if data.get("host") is not None else None,
                layout=str(data["layout"]) if data.get("layout") is not None else None,
                merged=bool(data.get("merged", False)),
                deduped=bool(data.get("deduped", False)),
                local_identity=(
                    str(data["local_identity"]) if data.get("local_identity") is not None else None
                ),
                key_index=_entry_from_json(data["key_index"]) if data.get("key_index") else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LayoutError(f"malformed manifest: {err}") from None
        for rel in files:
            _check_relpath(rel)
        return manifest


def _entry_json(entry: FileEntry) -> dict[str, object]:
    out: dict[str, object] = {"size": entry.size, "crc32c": crc32c_b64(entry.crc32c)}
    if entry.xxh3 is not None:
        out["xxh3"] = entry.xxh3
    return out


def _entry_from_json(e: dict[str, object]) -> FileEntry:
    return FileEntry(
        size=int(e["size"]),  # type: ignore[call-overload]
        crc32c=crc32c_from_b64(e["crc32c"]),  # type: ignore[arg-type]
        xxh3=_xxh3_from_json(e.get("xxh3")),
    )


def _xxh3_from_json(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 32 or value.strip("0123456789abcdef"):
        raise ValueError(f"xxh3 {value!r} is not 32 lowercase hex digits")
    return value


def crc32c_b64(value: int) -> str:
    """The base64 big-endian form GCS uses for crc32c metadata."""
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def crc32c_from_b64(text: str) -> int:
    raw = base64.b64decode(text)
    if len(raw) != 4:
        raise ValueError(f"crc32c {text!r} is not 4 bytes")
    return int.from_bytes(raw, "big")


class Digest:
    """Size, crc32c and xxh3-128 of bytes fed in order, each byte seen once: whatever streams
    a file (a copy, a download, a read-back, a peer's send) feeds its chunks here."""

    def __init__(self) -> None:
        self._crc32c = google_crc32c.Checksum()
        self._xxh3 = xxhash.xxh3_128()
        self.size = 0

    def update(self, data: bytes) -> None:
        self._crc32c.update(data)
        self._xxh3.update(data)
        self.size += len(data)

    def entry(self) -> FileEntry:
        """What a manifest says of these bytes."""
        return FileEntry(
            size=self.size,
            crc32c=int.from_bytes(self._crc32c.digest(), "big"),
            xxh3=self._xxh3.hexdigest(),
        )


def digest_of_file(path: str | os.PathLike[str]) -> FileEntry:
    """Size and checksums of a local file, streamed."""
    with open(path, "rb") as f:
        return digest_of_stream(f)


def digest_of_stream(f: BinaryIO, *, chunk: int = _CHUNK) -> FileEntry:
    """Size and checksums of everything left to read in ``f``, in reads of ``chunk`` bytes."""
    digest = Digest()
    while data := f.read(chunk):
        digest.update(data)
    return digest.entry()


def _check_relpath(rel: str) -> None:
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise LayoutError(f"manifest path {rel!r} escapes the step directory")


def iter_step_files(step_dir: Path) -> Iterator[tuple[str, Path]]:
    """(relative path, absolute path) of every regular file of a step, sorted.

    Symlinks are followed only when they stay inside the step directory; anything else that is
    not a regular file or a directory is refused with a ``LayoutError``.
    """
    root = step_dir.resolve()
    for dirpath, dirnames, filenames in os.walk(step_dir, followlinks=False):
        dirnames.sort()
        for name in [*sorted(filenames), *list(dirnames)]:
            full = Path(dirpath) / name
            rel = full.relative_to(step_dir).as_posix()
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                target = full.resolve()
                if not target.is_relative_to(root):
                    raise LayoutError(
                        f"{full}: symlink points outside the step directory (to {target}); "
                        "refusing to upload it"
                    )
                if target.is_dir():
                    raise LayoutError(
                        f"{full}: symlink to a directory inside a step is not supported"
                    )
                yield rel, full
            elif name in filenames:
                if not stat.S_ISREG(st.st_mode):
                    raise LayoutError(f"{full}: not a regular file; refusing to upload it")
                yield rel, full


def build_manifest(
    step_dir: Path, *, step: int, reason: str = "unknown", commit_time: float | None = None
) -> Manifest:
    """Checksum every file of a committed local step."""
    if not (step_dir / COMMIT_MARKER).is_file():
        raise LayoutError(f"{step_dir}: no {COMMIT_MARKER}, so the step is not committed")
    todo = [
        (rel, full) for rel, full in iter_step_files(step_dir) if not is_marker_or_manifest(rel)
    ]
    # Reading and checksumming release the GIL, so a few threads keep the disk busy.
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(todo)))) as pool:
        sums = list(pool.map(lambda item: digest_of_file(item[1]), todo))
    files = {rel: entry for (rel, _), entry in zip(todo, sums, strict=True)}
    return Manifest(step=step, files=files, reason=reason, commit_time=commit_time)


def verify_local(step_dir: Path, manifest: Manifest) -> None:
    """Raise ``ChecksumMismatch`` naming the first file that differs from the manifest."""
    for rel, entry in sorted(manifest.files.items()):
        path = step_dir / rel
        try:
            got = digest_of_file(path)
        except FileNotFoundError:
            raise ChecksumMismatch(f"{path}: missing (listed in the manifest)") from None
        check_file(str(path), entry, got)


def check_file(where: str, entry: FileEntry, got: FileEntry) -> None:
    """Raise ``ChecksumMismatch`` unless the bytes read (``got``) are the manifest's."""
    check_entry(where, entry, size=got.size, crc32c=got.crc32c, xxh3=got.xxh3)


def check_entry(
    where: str, entry: FileEntry, *, size: int, crc32c: int | None, xxh3: str | None = None
) -> None:
    """Raise ``ChecksumMismatch`` when what is known of a file (its size always; a checksum
    where it was read or listed) differs from the manifest. A manifest entry without an xxh3
    (before tiered 0.3) is checked by size and crc32c alone."""
    if size != entry.size:
        raise ChecksumMismatch(f"{where}: size {size} != manifest {entry.size}")
    if crc32c is not None and crc32c != entry.crc32c:
        raise ChecksumMismatch(
            f"{where}: crc32c {crc32c_b64(crc32c)} != manifest {crc32c_b64(entry.crc32c)}"
        )
    if xxh3 is not None and entry.xxh3 is not None and xxh3 != entry.xxh3:
        same_crc = " (same size and crc32c: another file's bytes)" if crc32c is not None else ""
        raise ChecksumMismatch(f"{where}: xxh3 {xxh3} != manifest {entry.xxh3}{same_crc}")

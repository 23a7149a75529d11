"""Per-step manifests: relative path, size and crc32c of every file of a step.

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

from tiered.errors import ChecksumMismatch, LayoutError
from tiered.layout import COMMIT_MARKER, is_marker_or_manifest

MANIFEST_VERSION = 1
_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    size: int
    crc32c: int


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

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files.values())

    @property
    def identity(self) -> str:
        """A digest of what the step holds (every file's path, size and crc32c), and nothing
        else: two steps are the same checkpoint exactly when their identities are equal."""
        digest = hashlib.sha256()
        for rel, entry in sorted(self.files.items()):
            digest.update(f"{rel}\0{entry.size}\0{entry.crc32c}\n".encode())
        return digest.hexdigest()[:32]

    def to_json(self) -> str:
        extra: dict[str, object] = {}
        if self.nodes != 1 or self.node is not None:
            extra = {"nodes": self.nodes, "node": self.node, "epoch": self.epoch, "host": self.host}
        if self.layout is not None:
            extra = {**extra, "layout": self.layout, "merged": self.merged}
        return json.dumps(
            {
                "version": MANIFEST_VERSION,
                "step": self.step,
                "reason": self.reason,
                "commit_time": self.commit_time,
                **extra,
                "files": {
                    p: {"size": e.size, "crc32c": crc32c_b64(e.crc32c)}
                    for p, e in sorted(self.files.items())
                },
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text)
            files = {
                str(p): FileEntry(size=int(e["size"]), crc32c=crc32c_from_b64(e["crc32c"]))
                for p, e in data["files"].items()
            }
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
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LayoutError(f"malformed manifest: {err}") from None
        for rel in files:
            _check_relpath(rel)
        return manifest


def crc32c_b64(value: int) -> str:
    """The base64 big-endian form GCS uses for crc32c metadata."""
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def crc32c_from_b64(text: str) -> int:
    raw = base64.b64decode(text)
    if len(raw) != 4:
        raise ValueError(f"crc32c {text!r} is not 4 bytes")
    return int.from_bytes(raw, "big")


def crc32c_of_file(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(size, crc32c) of a local file, streamed."""
    with open(path, "rb") as f:
        return crc32c_of_stream(f)


def crc32c_of_stream(f: BinaryIO, *, chunk: int = _CHUNK) -> tuple[int, int]:
    """(size, crc32c) of everything left to read in ``f``, in reads of ``chunk`` bytes."""
    checksum = google_crc32c.Checksum()
    size = 0
    while data := f.read(chunk):
        checksum.update(data)
        size += len(data)
    return size, int.from_bytes(checksum.digest(), "big")


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
        sums = list(pool.map(lambda item: crc32c_of_file(item[1]), todo))
    files = {
        rel: FileEntry(size=size, crc32c=crc)
        for (rel, _), (size, crc) in zip(todo, sums, strict=True)
    }
    return Manifest(step=step, files=files, reason=reason, commit_time=commit_time)


def verify_local(step_dir: Path, manifest: Manifest) -> None:
    """Raise ``ChecksumMismatch`` naming the first file that differs from the manifest."""
    for rel, entry in sorted(manifest.files.items()):
        path = step_dir / rel
        try:
            size, crc = crc32c_of_file(path)
        except FileNotFoundError:
            raise ChecksumMismatch(f"{path}: missing (listed in the manifest)") from None
        check_entry(str(path), entry, size=size, crc32c=crc)


def check_entry(where: str, entry: FileEntry, *, size: int, crc32c: int | None) -> None:
    if size != entry.size:
        raise ChecksumMismatch(f"{where}: size {size} != manifest {entry.size}")
    if crc32c is not None and crc32c != entry.crc32c:
        raise ChecksumMismatch(
            f"{where}: crc32c {crc32c_b64(crc32c)} != manifest {crc32c_b64(entry.crc32c)}"
        )

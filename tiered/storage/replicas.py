"""The peer store: copies of other nodes' local steps kept on this node, and the stream that
carries one step between two nodes.

On disk (``<local>/.tiered/peers/``)::

    node-<owner>/<step>/                    the owner's local step, file for file, with its
                                            commit_success.txt
    node-<owner>/<step>/tiered-replica.json written last: the sender's header and signature
    node-<owner>/<step>.tiered-tmp-*        a replica being received: never read, and removed
                                            at the next start when its writer is gone

A replica counts only once ``tiered-replica.json`` is in it, and that is written only after
every file was checked against the manifest (size, crc32c and xxh3) as its bytes arrived. A replica
is never a step of this node: the local tier's scan does not see it, retention does not prune
it, and only its owner can read it back.

The stream (one HTTP body, both ways)::

    b"TIERED-REPLICA 1\\n", 8-byte big-endian length, the header (JSON: owner, step, epoch,
    the commit marker's text, the manifest), then every file of the manifest in sorted order,
    exactly its size

The header is signed by whoever holds the job's shared secret (``tiered.peering``); this module
keeps the signature and hands it back, and checks everything else: the names, the sizes, the
checksums, the room left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tiered.atomic import discard, publish_file
from tiered.errors import ChecksumMismatch, LayoutError, StorageError
from tiered.layout import (
    COMMIT_MARKER,
    PEERS_DIR,
    REPLICA_INFO,
    TIERED_DIR,
    TRASH_DIR,
    parse_step,
    step_name,
    tmp_name,
    tmp_owner,
)
from tiered.manifest import Digest, Manifest
from tiered.policy import newer_than
from tiered.storage.errormap import translate_errors

MAGIC = b"TIERED-REPLICA 1\n"
MAX_HEADER = 64 * 2**20
"""A header is a manifest: about 100 bytes a file. 64 MiB is over half a million files."""
CHUNK = 1 << 20


@dataclass(frozen=True)
class Header:
    """What travels before a replica's bytes, and is kept beside them."""

    owner: int
    step: int
    epoch: int | None
    marker: str
    manifest: Manifest

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "step": self.step,
                "epoch": self.epoch,
                "marker": self.marker,
                "manifest": json.loads(self.manifest.to_json()),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Header:
        try:
            data = json.loads(raw)
            header = cls(
                owner=int(data["owner"]),
                step=int(data["step"]),
                epoch=int(data["epoch"]) if data.get("epoch") is not None else None,
                marker=str(data.get("marker", "")),
                manifest=Manifest.from_json(json.dumps(data["manifest"])),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise LayoutError(f"malformed replica header: {err}") from None
        reserved = {COMMIT_MARKER, REPLICA_INFO} & set(header.manifest.files)
        if reserved:
            raise LayoutError(f"replica manifest lists reserved names {sorted(reserved)}")
        if header.manifest.step != header.step:
            raise LayoutError(
                f"replica header for step {header.step} carries the manifest of step "
                f"{header.manifest.step}"
            )
        return header

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes

    def stream_length(self, raw: bytes | None = None) -> int:
        """The body's length (what ``Content-Length`` says), with the header as ``raw``."""
        return len(MAGIC) + 8 + len(raw if raw is not None else self.to_bytes()) + self.total_bytes


@dataclass(frozen=True)
class Replica:
    """One replica held here."""

    owner: int
    step: int
    epoch: int | None
    identity: str
    bytes: int
    received_at: float

    @property
    def order(self) -> tuple[int, int]:
        """Newest first by (epoch, step): a step saved again after a rollback has a higher
        epoch, so a stale copy of a higher step number never pushes out the live one."""
        return (self.epoch or 0, self.step)


def encode(
    header: Header, files: Callable[[str], BinaryIO], *, raw: bytes | None = None
) -> Iterator[bytes]:
    """The stream of one replica: the framed header (``raw``, as signed), then each file's
    bytes in manifest order.

    A file that is not exactly its manifest size when read is an error here, not a short
    stream the other side has to find out about."""
    raw = raw if raw is not None else header.to_bytes()
    yield MAGIC + len(raw).to_bytes(8, "big") + raw
    for rel, entry in sorted(header.manifest.files.items()):
        left = entry.size
        with files(rel) as f:
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise ChecksumMismatch(f"{rel}: shorter than its manifest size {entry.size}")
                left -= len(chunk)
                yield chunk


def read_header(stream: BinaryIO) -> tuple[Header, bytes]:
    """The header at the start of a stream, and its raw bytes (what the signature covers)."""
    start = _read_exactly(stream, len(MAGIC) + 8, what="the stream's start")
    if start[: len(MAGIC)] != MAGIC:
        raise LayoutError("not a tiered replica stream (bad magic)")
    length = int.from_bytes(start[len(MAGIC) :], "big")
    if length > MAX_HEADER:
        raise LayoutError(f"replica header of {length} bytes is over the {MAX_HEADER} limit")
    raw = _read_exactly(stream, length, what="the header")
    return Header.from_bytes(raw), raw


def _read_exactly(stream: BinaryIO, n: int, *, what: str) -> bytes:
    parts, left = [], n
    while left:
        chunk = stream.read(min(CHUNK, left))
        if not chunk:
            raise ChecksumMismatch(f"the stream ended {left} bytes short, in {what}")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def receive_files(
    stream: BinaryIO, header: Header, dest: Path, *, limit: Callable[[int], None] | None = None
) -> None:
    """Write every file of ``header``'s manifest from ``stream`` under ``dest`` (a fresh
    directory of this writer's), each checked against the manifest as it arrives, then the
    commit marker. Any difference raises ``ChecksumMismatch`` naming the file.

    The files are not synced one by one (that took 60% of a restore from a peer): a copy torn
    by a power cut fails its check when it is read back (a peer's copy is checked again by its
    owner; a step got back is checked against its kept manifest before it is promoted)."""
    for rel, entry in sorted(header.manifest.files.items()):
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = Digest()
        left = entry.size
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as out:
            while left:
                chunk = stream.read(min(CHUNK, left))
                if not chunk:
                    raise ChecksumMismatch(
                        f"{rel}: the stream ended {left} of {entry.size} bytes short"
                    )
                if limit is not None:
                    limit(len(chunk))
                digest.update(chunk)
                out.write(chunk)
                left -= len(chunk)
        got = digest.entry()
        if got.crc32c != entry.crc32c or (entry.xxh3 is not None and got.xxh3 != entry.xxh3):
            raise ChecksumMismatch(f"{rel}: the bytes received differ from the sender's manifest")
    publish_file(dest / COMMIT_MARKER, header.marker.encode())


class PeerStore:
    """Other nodes' steps kept on this node, under ``<local>/.tiered/peers``."""

    def __init__(self, local_root: Path) -> None:
        self.local_root = Path(local_root)
        self.root = self.local_root / TIERED_DIR / PEERS_DIR

    def owner_dir(self, owner: int) -> Path:
        return self.root / f"node-{owner}"

    def replica_dir(self, owner: int, step: int) -> Path:
        return self.owner_dir(owner) / step_name(step)

    # -- reading ----------------------------------------------------------------------------

    def replicas(self, owner: int | None = None) -> list[Replica]:
        """Every complete replica (of one owner), newest first by (epoch, step)."""
        owners = [owner] if owner is not None else self._owners()
        found = []
        for o in owners:
            try:
                names = os.listdir(self.owner_dir(o))
            except OSError:
                continue
            for name in names:
                ref = parse_step(name)
                if ref is None:
                    continue
                info = self.info(o, ref.step)
                if info is not None:
                    header, _raw, _sig, received = info
                    found.append(
                        Replica(
                            owner=o,
                            step=ref.step,
                            epoch=header.epoch,
                            identity=header.manifest.identity,
                            bytes=header.total_bytes,
                            received_at=received,
                        )
                    )
        return sorted(found, key=lambda r: r.order, reverse=True)

    def _owners(self) -> list[int]:
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        owners = []
        for name in names:
            ref = parse_step(name.removeprefix("node-")) if name.startswith("node-") else None
            if ref is not None:
                owners.append(ref.step)
        return sorted(owners)

    def info(self, owner: int, step: int) -> tuple[Header, bytes, str, float] | None:
        """(header, its bytes as the owner signed them, the signature, when received) of a
        complete replica, or None (the small JSON file written last; a damaged one makes the
        replica not count)."""
        path = self.replica_dir(owner, step) / REPLICA_INFO
        try:
            data = json.loads(path.read_text())  # small: the header and a signature
            raw = data["header"].encode()
            header = Header.from_bytes(raw)
            sig, received = str(data["sig"]), float(data["received_at"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, LayoutError):
            return None
        if header.owner != owner or header.step != step:
            return None
        return header, raw, sig, received

    def open_file(self, owner: int, step: int, rel: str) -> BinaryIO:
        """A file of a replica, for serving it to its owner: never through a symlink, never
        outside the replica (``rel`` comes from the replica's own checked manifest)."""
        base = self.replica_dir(owner, step)
        path = base / rel
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        f = os.fdopen(fd, "rb")
        if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(base)):
            f.close()
            raise LayoutError(f"{path}: outside the replica")
        return f

    def used_bytes(self) -> int:
        return sum(r.bytes for r in self.replicas())

    # -- writing ----------------------------------------------------------------------------

    def receive(
        self,
        stream: BinaryIO,
        header: Header,
        raw: bytes,
        sig: str,
        *,
        free_bytes: int,
        keep: int,
        limit: Callable[[int], None] | None = None,
    ) -> Replica:
        """Take one replica from ``stream`` (positioned after the header): into a temporary
        directory, every file checked, then renamed over any older copy of the same step, and
        the owner's replicas beyond the newest ``keep`` removed."""
        if header.total_bytes > free_bytes:
            raise StorageError(
                f"no room for node {header.owner}'s step {header.step}: it needs "
                f"{header.total_bytes} bytes and {free_bytes} are free",
                transient=True,
            )
        final = self.replica_dir(header.owner, header.step)
        partial = final.with_name(tmp_name(final.name))
        with translate_errors(f"receiving node {header.owner}'s step {header.step}"):
            try:
                partial.mkdir(parents=True)
                receive_files(stream, header, partial, limit=limit)
                publish_file(
                    partial / REPLICA_INFO,
                    json.dumps(
                        {
                            "header": raw.decode(),
                            "sig": sig,
                            "received_at": time.time(),
                        }
                    ).encode(),
                )
                if final.exists():
                    self._trash(final)
                os.replace(partial, final)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            self.prune(header.owner, keep=keep)
        replica = next((r for r in self.replicas(header.owner) if r.step == header.step), None)
        if replica is None:  # pruned at once: older than every kept one
            raise StorageError(
                f"node {header.owner}'s step {header.step} is older than the {keep} kept",
                transient=False,
            )
        return replica

    def prune(self, owner: int, *, keep: int) -> list[int]:
        """Keep the newest ``keep`` replicas of ``owner`` (by epoch, then step)."""
        dropped = []
        for r in self.replicas(owner)[keep:]:
            self.drop(owner, r.step)
            dropped.append(r.step)
        return dropped

    def drop(self, owner: int, step: int) -> None:
        path = self.replica_dir(owner, step)
        if path.exists():
            self._trash(path)

    def drop_newer(self, step: int | None) -> list[Replica]:
        """Remove every replica newer than ``step`` (all of them for None): the nodes agreed
        to go on from ``step``, so those copies are of steps the run will save again."""
        held = self.replicas()
        again = set(newer_than((r.step for r in held), step))
        gone = [r for r in held if r.step in again]
        for r in gone:
            self.drop(r.owner, r.step)
        return gone

    def clean_partial(self) -> None:
        """Remove replicas left half received by a receiver that is gone."""
        for owner in self._owners():
            with contextlib.suppress(OSError):
                for name in os.listdir(self.owner_dir(owner)):
                    pid = tmp_owner(name)
                    if pid is not None and not _alive(pid):
                        shutil.rmtree(self.owner_dir(owner) / name, ignore_errors=True)

    def _trash(self, path: Path) -> None:
        name = f"peer-{path.parent.name}-{path.name}-{time.time_ns()}"
        discard(path, self.local_root / TIERED_DIR / TRASH_DIR, name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""A merged multi-node step's key index: every key of its OCDBT roots with the size and xxh3-128
of its value. Node 0 writes it at the commit (``tiered.storage.parts``) and names its header's
digest in the step's manifest; a job of another shape reads only its own chunks by it
(``tiered.storage.partial``), and only the blocks of the index that name them.

On the store, per step:

- ``tiered-parts/keys.json``, the header: per item folder, its body object, its key count and
  bytes, and its blocks (the first and last key, the offset and length in the body, the xxh3
  of the block), in key order;
- ``tiered-parts/keys-<i>.jsonl``, one body per item: one JSON line ``[key, size, xxh3]`` per
  key, sorted, in blocks of ``BLOCK_KEYS`` keys.

A reader checks the header against the manifest, then each block it fetches (one ranged read)
against the header: what it costs is the header (about 85 bytes per block) and the blocks that
hold the keys it asks for, not the whole index.
"""

from __future__ import annotations

import bisect
import io
import json
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import xxhash

from tiered.errors import ChecksumMismatch, CommitError
from tiered.layout import PARTS_DIR
from tiered.manifest import FileEntry, Manifest, check_file, digest_of_stream
from tiered.storage.errormap import translate_errors

if TYPE_CHECKING:
    from tiered.storage.steps import StepStore

KEYS_NAME = f"{PARTS_DIR}/keys.json"
"""The key index's header."""
KEYS_VERSION = 2
BLOCK_KEYS = 256
"""Keys per block: a reader fetches the blocks that hold the keys it asks for."""

Facts = list[Any]
"""[size, xxh3] of a key's value."""


def body_name(i: int) -> str:
    return f"{PARTS_DIR}/keys-{i}.jsonl"


def write(tier: StepStore, step: int, roots: dict[str, dict[str, Facts]]) -> FileEntry:
    """Write the key index of ``roots`` (item folder -> key -> [size, xxh3]): each item's body,
    then the header; return the header's manifest entry."""
    header: dict[str, Any] = {}
    for i, root in enumerate(sorted(roots)):
        keys = roots[root]
        body = io.BytesIO()
        blocks = []
        ordered = sorted(keys)
        for start in range(0, len(ordered), BLOCK_KEYS):
            names = ordered[start : start + BLOCK_KEYS]
            block = b"".join((json.dumps([k, *keys[k]]) + "\n").encode() for k in names)
            digest = xxhash.xxh3_128_hexdigest(block)
            blocks.append([names[0], names[-1], body.tell(), len(block), digest])
            body.write(block)
        rel = body_name(i)
        with translate_errors(f"writing {tier.step_url(step)}/{rel}"):
            tier.store.write_small(tier.object_path(step, rel), body.getvalue())
        header[root] = {
            "body": rel,
            "keys": len(ordered),
            "bytes": sum(int(v[0]) for v in keys.values()),
            "blocks": blocks,
        }
    data = json.dumps({"version": KEYS_VERSION, "step": step, "roots": header}).encode()
    with translate_errors(f"writing {tier.step_url(step)}/{KEYS_NAME}"):
        tier.store.write_small(tier.object_path(step, KEYS_NAME), data)
    return key_entry(data)


def key_entry(data: bytes) -> FileEntry:
    """The manifest entry of the header's bytes."""
    return digest_of_stream(io.BytesIO(data))


@dataclass
class RootIndex:
    """One item's part of the index: its body and blocks, and the blocks read so far."""

    body: str
    keys: int
    bytes: int
    firsts: list[str]
    lasts: list[str]
    blocks: list[list[Any]]
    read: dict[int, dict[str, Facts]] = field(default_factory=dict)


class KeyIndex:
    """A step's key index as a reader sees it: blocks fetched as the keys it asks for need
    them, each checked against the header, which was checked against the manifest."""

    def __init__(self, tier: StepStore, step: int, manifest: Manifest) -> None:
        if manifest.key_index is None:
            raise CommitError(f"{tier.step_url(step)} has no key index")
        self.tier, self.step = tier, step
        where = f"{tier.step_url(step)}/{KEYS_NAME}"
        with (
            translate_errors(f"reading {where}"),
            tier.fs.open(tier.object_path(step, KEYS_NAME), "rb") as f,
        ):
            data = f.read()
        check_file(where, manifest.key_index, key_entry(data))
        self.header_bytes = len(data)
        self.block_bytes = 0
        self._lock = threading.Lock()
        try:
            doc = json.loads(data)
            if doc.get("version") != KEYS_VERSION:
                raise ValueError(f"version {doc.get('version')!r}")
            self.roots = {
                str(root): RootIndex(
                    body=str(r["body"]),
                    keys=int(r["keys"]),
                    bytes=int(r["bytes"]),
                    firsts=[str(b[0]) for b in r["blocks"]],
                    lasts=[str(b[1]) for b in r["blocks"]],
                    blocks=[
                        [str(b[0]), str(b[1]), int(b[2]), int(b[3]), str(b[4])] for b in r["blocks"]
                    ],
                )
                for root, r in doc["roots"].items()
            }
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise CommitError(f"{where} is malformed: {err}") from None

    def block_of(self, root: str, key: str) -> int | None:
        """The block that would hold ``key``, or None (no block's keys span it)."""
        r = self.roots[root]
        i = bisect.bisect_right(r.firsts, key) - 1
        return i if i >= 0 and key <= r.lasts[i] else None

    def blocks_in(self, root: str, lo: str, hi: str | None) -> list[int]:
        """The blocks holding keys in ``[lo, hi)`` (``hi`` None: to the end)."""
        r = self.roots[root]
        start = bisect.bisect_left(r.lasts, lo)  # the first block whose last key is >= lo
        stop = len(r.firsts) if hi is None else bisect.bisect_left(r.firsts, hi)
        return list(range(start, max(start, stop)))

    def fetch(self, root: str, blocks: set[int]) -> None:
        """Read ``blocks`` of an item (those not read yet), in parallel, each checked."""
        r = self.roots[root]
        todo = sorted(b for b in blocks if b not in r.read)

        def get(b: str) -> None:
            first, last, offset, length, digest = r.blocks[int(b)]
            path = self.tier.object_path(self.step, r.body)
            where = f"{self.tier.step_url(self.step)}/{r.body} (block {b})"
            with translate_errors(f"reading {where}"):
                # one block: BLOCK_KEYS lines, small by construction
                data = self.tier.fs.cat_file(path, start=offset, end=offset + length)
            if len(data) != length or xxhash.xxh3_128_hexdigest(data) != digest:
                raise ChecksumMismatch(f"{where}: not the bytes the key index's header names")
            facts: dict[str, Facts] = {}
            for line in data.decode().splitlines():
                key, size, value = json.loads(line)
                facts[str(key)] = [int(size), str(value)]
            if not facts or min(facts) != first or max(facts) != last:
                raise ChecksumMismatch(f"{where}: its keys are not the ones the header spans")
            with self._lock:
                r.read[int(b)] = facts
                self.block_bytes += length

        self.tier.parallel(get, [str(b) for b in todo])

    def lookup(self, root: str, keys: list[str]) -> dict[str, Facts]:
        """The facts of those of ``keys`` the item has."""
        if root not in self.roots:
            return {}
        where = {k: self.block_of(root, k) for k in keys}
        self.fetch(root, {b for b in where.values() if b is not None})
        r = self.roots[root]
        return {k: r.read[b][k] for k, b in where.items() if b is not None and k in r.read[b]}

    def in_ranges(self, root: str, ranges: list[tuple[str, str | None]]) -> None:
        """Read every block that may hold keys in ``ranges``."""
        if root in self.roots:
            self.fetch(root, {b for lo, hi in ranges for b in self.blocks_in(root, lo, hi)})

    def read_keys(self, root: str) -> dict[str, Facts]:
        """Every key of the blocks of ``root`` read so far."""
        out: dict[str, Facts] = {}
        for facts in self.roots[root].read.values() if root in self.roots else ():
            out.update(facts)
        return out

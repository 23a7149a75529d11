"""A restore that reads only what it needs: a job of another size (or another mesh) takes from a
merged durable step the OCDBT keys of the chunks its own shards cover, each value checked
against the step's key index, instead of the whole step on every node.

The pieces:

- **The key index** (``tiered-parts/keys.json``). At the commit of a merged step node 0 writes
  every key of every item's OCDBT root with the size and xxh3-128 of its value (the union of the
  nodes' indexes, which the merge checked the root against), and names its digest in the step's
  manifest (``Manifest.key_index``). One object per step: its size grows with the step's keys,
  not with the node count of the job that reads it.
- **What a node needs** (``Need``): per item folder, per array (orbax's parameter name), the
  array's shape and the boxes of it this process's devices hold (from the target's shardings,
  ``tiered.loading``).
- **The choice of keys** (``select``, pure): an array's metadata key always; a chunk key when its
  chunk meets one of the boxes, read from the array's zarr metadata (zarr v2 and v3, regular
  grids, both key encodings). Anything not understood (an array the target does not name, a
  shape that differs, a key that does not parse, another grid) is taken whole: the choice may
  read more than it needs, never less.
- **The copy** (``stage``): the step's files that are not OCDBT databases (its metadata)
  downloaded and verified against the manifest, then the chosen keys read from the merged root,
  each checked against the key index, into one database of the item's own, which orbax reads as
  it reads any local step.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tiered.errors import CommitError
from tiered.layout import COMMIT_MARKER, GLOBAL_LAYOUT, in_ocdbt_root, ocdbt_roots
from tiered.manifest import Manifest
from tiered.storage.errormap import translate_errors
from tiered.storage.keyindex import KeyIndex

if TYPE_CHECKING:
    from tiered.storage.steps import StepStore

log = logging.getLogger(__name__)

METADATA_KEYS = (".zarray", "zarr.json")
"""The key (under an array's folder) of its zarr v2 and v3 metadata."""

Box = tuple[tuple[int, int], ...]
"""A half-open box of an array: (start, stop) per dimension."""


@dataclass(frozen=True)
class ArrayNeed:
    """What a process reads of one array: its shape as the target has it, and the boxes of it
    this process's devices hold."""

    shape: tuple[int, ...]
    boxes: tuple[Box, ...]


Need = dict[str, dict[str, ArrayNeed]]
"""item folder -> orbax parameter name -> what this process reads of it. An item or an array not
named is read whole."""


# -- the choice of keys (pure) --


def array_of(key: str, arrays: set[str]) -> str | None:
    """The array (its folder, one of ``arrays``) a key belongs to, or None."""
    parts = key.split("/")
    for i in range(1, len(parts)):
        prefix = "/".join(parts[:i])
        if prefix in arrays:
            return prefix
    return None


@dataclass(frozen=True)
class Grid:
    """An array's chunk grid as its zarr metadata gives it: enough to name each chunk's box."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    prefix: str
    """What a chunk key starts with under the array's folder (``c/`` in zarr v3's default
    encoding), before its coordinates."""
    separator: str

    def coords(self, tail: str) -> tuple[int, ...] | None:
        """A chunk's grid coordinates from the key under the array's folder, or None."""
        if not tail.startswith(self.prefix):
            return None
        rest = tail[len(self.prefix) :]
        if not self.shape:  # a 0-d array has one chunk
            return () if rest in ("0", "") else None
        pieces = rest.split(self.separator)
        if len(pieces) != len(self.shape) or not all(p.isdigit() for p in pieces):
            return None
        return tuple(int(p) for p in pieces)

    def key(self, coords: tuple[int, ...]) -> str:
        """The key (under the array's folder) of the chunk at ``coords``."""
        if not self.shape:
            return self.prefix or "0"
        return self.prefix + self.separator.join(map(str, coords))

    def cells(self, box: Box) -> list[tuple[int, ...]]:
        """The grid coordinates of the chunks ``box`` meets."""
        spans = []
        for (lo, hi), n in zip(box, self.chunks, strict=True):
            if hi <= lo:
                return []
            spans.append(range(lo // n, -(-hi // n)))
        return list(itertools.product(*spans))

    def meets(self, coords: tuple[int, ...], box: Box) -> bool:
        return all(lo < hi for lo, hi in box) and all(
            c * n < hi and (c + 1) * n > lo
            for c, n, (lo, hi) in zip(coords, self.chunks, box, strict=True)
        )


def grid_of(meta: bytes) -> Grid | None:
    """The chunk grid of a zarr v2 ``.zarray`` or v3 ``zarr.json``; None when it is anything
    this choice does not understand (then the array is read whole)."""
    try:
        doc = json.loads(meta)
        if doc.get("zarr_format") == 2:
            sep = doc.get("dimension_separator") or "."
            return Grid(tuple(doc["shape"]), tuple(doc["chunks"]), "", sep)
        if doc.get("zarr_format") == 3:
            grid = doc["chunk_grid"]
            if grid.get("name") != "regular":
                return None
            encoding = doc.get("chunk_key_encoding") or {"name": "default"}
            config = encoding.get("configuration") or {}
            if encoding.get("name") == "default":
                sep = config.get("separator", "/")
                prefix = "c" + sep if doc["shape"] else "c"
                return Grid(
                    tuple(doc["shape"]), tuple(grid["configuration"]["chunk_shape"]), prefix, sep
                )
            if encoding.get("name") == "v2":
                sep = config.get("separator", ".")
                return Grid(
                    tuple(doc["shape"]), tuple(grid["configuration"]["chunk_shape"]), "", sep
                )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return None


def grids_for(needs: dict[str, ArrayNeed], metas: dict[str, bytes]) -> dict[str, Grid]:
    """The named arrays whose chunk grid the choice understands (and whose shape is the
    target's); every other array is read whole."""
    grids: dict[str, Grid] = {}
    for name, need in needs.items():
        meta = metas.get(name)
        grid = grid_of(meta) if meta is not None else None
        if grid is not None and not (
            grid.shape != need.shape or len(grid.chunks) != len(grid.shape) or 0 in grid.chunks
        ):
            grids[name] = grid
    return grids


def candidates(grids: dict[str, Grid], needs: dict[str, ArrayNeed]) -> list[str]:
    """The chunk keys of the understood arrays that meet a box: what the index is asked for."""
    out: set[str] = set()
    for name, grid in grids.items():
        for box in needs[name].boxes:
            out.update(f"{name}/{grid.key(c)}" for c in grid.cells(box))
    return sorted(out)


def outside(grids: dict[str, Grid]) -> list[tuple[str, str | None]]:
    """The key ranges outside every understood array's folder (``name/`` up to ``name0``, the
    first string after the folder's keys): their keys are read whole."""
    taken = sorted((f"{n}/", f"{n}0") for n in grids)
    out: list[tuple[str, str | None]] = []
    lo = ""
    for start, stop in taken:
        if start > lo:
            out.append((lo, start))
        lo = max(lo, stop)
    out.append((lo, None))
    return out


def select(keys: list[str], metas: dict[str, bytes], needs: dict[str, ArrayNeed]) -> list[str]:
    """The keys of one item's database a process reads: every key, except the chunks of a
    named array that meet none of its boxes. ``metas``: array folder -> its zarr metadata."""
    grids: dict[str, Grid | None] = dict(grids_for(needs, metas))
    arrays = set(needs)
    out = []
    for key in keys:
        array = array_of(key, arrays)
        grid = grids.get(array) if array is not None else None
        if grid is None or array is None:
            out.append(key)
            continue
        tail = key[len(array) + 1 :]
        coords = grid.coords(tail)
        if coords is None or any(grid.meets(coords, box) for box in needs[array].boxes):
            out.append(key)
    return out


# -- the copy --


@dataclass(frozen=True)
class Staged:
    """A step staged with only the keys this process needs: its folder (orbax reads it as a
    step of its own), the values' bytes read, and the bytes of every key of the step."""

    folder: Path
    bytes_read: int
    bytes_all: int
    keys_read: int
    keys_all: int
    index_bytes: int
    """The key index's bytes read: its header and the blocks that name the keys read."""
    seconds: float


def readable(manifest: Manifest) -> bool:
    """Whether a durable step can be read in part: a merged global step with a key index."""
    return (
        manifest.nodes > 1
        and manifest.layout == GLOBAL_LAYOUT
        and manifest.merged
        and manifest.key_index is not None
    )


def stage(
    tier: StepStore, step: int, dest: Path, need: Need, manifest: Manifest | None = None
) -> Staged:
    """Stage into ``dest`` (a new folder: ``<dest>`` is the step folder) the step's metadata and,
    for each item's OCDBT root, the keys ``need`` covers, each checked against the key index."""
    from tiered.storage import download, ocdbt_keys
    from tiered.storage.merge import kvstore_spec
    from tiered.storage.parts import whole_checkpoint

    started = time.monotonic()
    if not tier.has_marker(step):
        raise CommitError(f"{tier.step_url(step)} is not committed")
    manifest = manifest or tier.read_manifest(step)
    if not readable(manifest):
        raise CommitError(f"{tier.step_url(step)} cannot be read in part (no key index)")
    index = KeyIndex(tier, step, manifest)
    whole = whole_checkpoint(manifest)
    roots = ocdbt_roots(whole.files)
    if set(index.roots) != roots:
        raise CommitError(
            f"{tier.step_url(step)}: its key index covers {sorted(index.roots)}, its OCDBT "
            f"roots are {sorted(roots)}"
        )
    plain = {
        rel: e
        for rel, e in whole.files.items()
        if not in_ocdbt_root(rel, roots) and not _in_database(rel, roots)
    }
    dest.mkdir(parents=True)
    download.fetch_files(tier, step, plain, dest, locate=str)
    need = {root: arrays for root, arrays in need.items() if _loud_when_missing(dest / root)}
    jobs = []
    for root in sorted(roots):
        src = kvstore_spec(f"{tier.step_url(step)}/{root}".rstrip("/"), tier.storage_options)
        # the index's keys are bytes read as latin-1; orbax names arrays in UTF-8
        arrays = {n.encode().decode("latin-1"): a for n, a in need.get(root, {}).items()}
        asked = [f"{n}/{m}" for n in sorted(arrays) for m in METADATA_KEYS]
        try:
            metas = ocdbt_keys.read_checked(src, index.lookup(root, asked))
        except SystemExit as err:  # a metadata value unlike its index
            raise CommitError(f"reading step {step} of {tier.url} in part: {err}") from None
        by_array = {k.rsplit("/", 1)[0]: v for k, v in metas.items()}
        grids = grids_for(arrays, by_array)
        # an array with another one inside its folder (parameters ``a`` and ``a/b``) is read
        # whole: only its own chunks are asked for, and the other's keys lie in its range
        names = sorted(set(arrays) | _param_names(dest / root))
        grids = {n: g for n, g in grids.items() if not _holds_another(n, names)}
        index.lookup(root, candidates(grids, arrays))
        index.in_ranges(root, outside(grids))
        known = index.read_keys(root)
        chosen = select(sorted(known), by_array, arrays)
        jobs.append(
            {
                "op": "copy",
                "src": src,
                "dest": {"driver": "file", "path": str(dest / root).rstrip("/") + "/"},
                "keys": {k: known[k] for k in chosen},
            }
        )
    try:
        answers = ocdbt_keys.run(jobs)
    except SystemExit as err:  # what the copy refused (a value unlike its index, a missing key)
        raise CommitError(f"reading step {step} of {tier.url} in part: {err}") from None
    with translate_errors(f"downloading the commit marker of {tier.step_url(step)}"):
        tier.fs.get_file(tier.object_path(step, COMMIT_MARKER), str(dest / COMMIT_MARKER))
    staged = Staged(
        folder=dest,
        bytes_read=sum(a["bytes"] for a in answers) + sum(e.size for e in plain.values()),
        bytes_all=sum(r.bytes for r in index.roots.values()) + sum(e.size for e in plain.values()),
        keys_read=sum(a["keys"] for a in answers),
        keys_all=sum(r.keys for r in index.roots.values()),
        index_bytes=index.header_bytes + index.block_bytes,
        seconds=time.monotonic() - started,
    )
    log.info(
        "Read the %d of %d keys of step %d this process needs from %s (%d of %d bytes; %d "
        "bytes of the key index), each checked against the index, in %.1f s",
        staged.keys_read,
        staged.keys_all,
        step,
        tier.step_url(step),
        staged.bytes_read,
        staged.bytes_all,
        staged.index_bytes,
        staged.seconds,
    )
    return staged


def _param_names(item: Path) -> set[str]:
    """orbax's parameter names of an item (its ``_METADATA`` tree, each key path joined by
    ``.``), in the key index's form (UTF-8 bytes read as latin-1)."""
    try:
        doc = json.loads((item / "_METADATA").read_bytes())
        return {
            ".".join(str(k["key"]) for k in entry["key_metadata"]).encode().decode("latin-1")
            for entry in doc["tree_metadata"].values()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _holds_another(name: str, names: list[str]) -> bool:
    """Whether another of the sorted ``names`` lies in ``name``'s folder (``name/...``)."""
    i = bisect.bisect_left(names, f"{name}/")
    return i < len(names) and names[i].startswith(f"{name}/")


def _loud_when_missing(item: Path) -> bool:
    """Whether orbax refuses a chunk missing from this item (its ``_METADATA`` says every chunk
    was stored, ``store_array_data_equal_to_fill_value``), rather than reading it as the fill
    value. Only then is the item read in part: a chunk the choice left out that orbax then
    asks for fails the restore (which falls back to the whole step), never reads as zeros."""
    if (item / "checkpoint").exists():
        return False  # an old orbax's aggregate file: its restore reads missing chunks as zeros
    try:
        doc = json.loads((item / "_METADATA").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("store_array_data_equal_to_fill_value") is True


def _in_database(rel: str, roots: set[str]) -> bool:
    """A file of a node's OCDBT database in an item (``<root>/ocdbt.process_<p>/...``)."""
    for root in roots:
        prefix = f"{root}/" if root else ""
        if rel.startswith(prefix + "ocdbt.process_"):
            return True
    return False

"""Every name on disk, built and parsed in one place.

Local tier (``<local_checkpoint_directory>``):
    <step>/                          an orbax step directory, committed once it holds
                                     commit_success.txt
    <step>.orbax-checkpoint-tmp*     a save in progress: never read or deleted by tiered
    .tiered/daemon.lock              flock held by the one daemon of this directory
    .tiered/trainer.lock             flock held by the one tiered.CheckpointManager writing here
    .tiered/trainer-stats.json       how long its recent saves blocked the training loop
    .tiered/staging/<step>/          a step downloaded (or moved aside) for restore
    .tiered/manifests/<step>.json    a step's manifest, built when the daemon first sees it
    .tiered/trash/                   local steps being deleted (moved here in one rename)
    .tiered/displaced/<step>-<time>/ local steps set aside: the run went back to an older step
                                     and saves their numbers again (the newest two are kept)
    .tiered/peers/node-<r>/<step>/   node r's local step, replicated here by its daemon, with
                                     tiered-replica.json (its header, signed) written last
    .tiered/peer-nonces              the peer requests this node's daemon took lately (their
                                     nonces), so none is taken twice (``tiered.peerauth``)
    replicator.yaml, replicator.errors, replicator.failed, jax-init-info.txt,
    {job}-s{step}-n{node}-w{worker}.restore    orbax's multi-tier protocol files

Durable tier (``<checkpoint_dir>``), one node:
    <step>/...                       the local step's files
    <step>/tiered-manifest.json      size and crc32c of every file
    <step>/commit_success.txt        written last; without it the step is a partial upload

Durable tier, N > 1 nodes (one daemon per node, node rank 0 commits); the step is one global
orbax checkpoint:
    <step>/<item>/ocdbt.process_<r>/...   node r's own shards, where a global save puts them
    <step>/tiered-parts/node-<r>/...      node r's copy of the files every node has (metadata,
                                     its process's OCDBT root): what node r restores on its own
    <step>/tiered-parts/<r>.json     node r's part marker: its manifest, written once its files
                                     are uploaded and verified
    <step>/<item>/manifest.ocdbt, d/ the merged OCDBT root over every process's database, and
    <step>/<item>/_METADATA, ...     node 0's metadata: both written by node 0 at commit
    <step>/tiered-manifest.json      every file of the step, written by node 0
  (steps written by tiered 0.2 keep node r's files under <step>/node-<r>/ instead)
    <step>/commit_success.txt        written by node 0 once all N parts are verified; created
                                     with a precondition (if-none-match) where the backend has one
    .tiered/restore/request-<r>.json node r's restore request: its nonce and local steps
    .tiered/restore/decision.json    node 0's answer: the step every node restores, and the epoch
                                     that new part markers must carry

Durable tier, any number of nodes:
    .tiered/displaced/<step>-<UTC time>/   a committed step moved aside whole, because another
                                     step of the same number (a new run, a rollback) had to
                                     take its place; never pruned by tiered

Temporary names, on both tiers, are ``<final name>.tiered-tmp-<pid>-<random>``: every writer's
are its own, and a leftover whose writer is dead can be told from one being written. A final
name too long for that (the suffix would take it past ``NAME_MAX``, 255 bytes) is cut to fit:
the pid and the random part are what make the name unique, never the final name.

A step name is a canonical decimal integer: no sign, no leading zeros, below 2**63. Anything
else (``-1``, ``00100``, ``../x``) is not a step and is left alone.
"""

from __future__ import annotations

import calendar
import contextlib
import os
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from tiered.types import Displaced

COMMIT_MARKER = "commit_success.txt"
MANIFEST_NAME = "tiered-manifest.json"
ORBAX_TMP_INFIX = ".orbax-checkpoint-tmp"
CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"

TIERED_DIR = ".tiered"
LOCK_NAME = "daemon.lock"
TRAINER_LOCK_NAME = "trainer.lock"
TRAINER_STATS = "trainer-stats.json"
STAGING_DIR = "staging"
DEDUP_DIR = "dedup"
"""Under ``.tiered``: the daemon's database of the keys a node owns while it uploads them
(``tiered.storage.dedup``)."""
TRASH_DIR = "trash"
PEERS_DIR = "peers"
PEER_NONCES = "peer-nonces"
REPLICA_INFO = "tiered-replica.json"

REPLICATOR_FILE = "replicator.yaml"
REPLICATOR_ERRORS = "replicator.errors"
REPLICATOR_FAILED = "replicator.failed"
JAX_INIT_INFO = "jax-init-info.txt"
RESTORE_SUFFIX = ".restore"

PARTS_DIR = "tiered-parts"
GLOBAL_LAYOUT = "global"
"""A multi-node step laid out as one orbax checkpoint (see ``part_path``)."""
NODE_DIR_PREFIX = "node-"
RESTORE_COORD_DIR = f"{TIERED_DIR}/restore"
DECISION_NAME = "decision.json"
DISPLACED_DIR = f"{TIERED_DIR}/displaced"

TMP_INFIX = ".tiered-tmp-"
NAME_MAX = 255
"""The longest file name, in bytes, that Linux file systems take (ext4, xfs, tmpfs)."""

MAX_STEP = 2**63 - 1

_STEP_RE = re.compile(r"0|[1-9][0-9]{0,18}")
_DISPLACED_RE = re.compile(
    r"(?P<step>0|[1-9][0-9]{0,18})-(?P<time>[0-9]{8}T[0-9]{6}(?:\.[0-9]{6})?Z)"
)
_RESTORE_RE = re.compile(
    r"(?P<job>.+)-s(?P<step>0|[1-9][0-9]{0,18})-n(?P<node>[0-9]+)-w(?P<worker>[0-9]+)\.restore"
)


@dataclass(frozen=True, order=True)
class StepRef:
    """A parsed step directory name."""

    step: int

    @property
    def name(self) -> str:
        return step_name(self.step)


@dataclass(frozen=True)
class RestoreRef:
    """A parsed ``{job}-s{step}-n{node}-w{worker}.restore`` entry."""

    job: str
    step: int
    node: int
    worker: int

    @property
    def name(self) -> str:
        return restore_name(self.job, self.step, node=self.node, worker=self.worker)


def step_name(step: int) -> str:
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"step {step} is outside 0..{MAX_STEP}")
    return str(step)


def parse_step(name: str) -> StepRef | None:
    """The step a directory name stands for, or None if it is not a canonical step name."""
    if not _STEP_RE.fullmatch(name):
        return None
    step = int(name)
    return StepRef(step) if step <= MAX_STEP else None


def is_tmp_name(name: str) -> bool:
    """True for orbax's in-progress save directories, which tiered never touches."""
    return ORBAX_TMP_INFIX in name


def tmp_name(name: str) -> str:
    """A temporary name for something that will be published as ``name`` in the same folder:
    unique to this process and this call, and never longer than ``NAME_MAX`` bytes (a long
    ``name`` is cut, at a character boundary, to leave room for the suffix)."""
    suffix = f"{TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    room = NAME_MAX - len(suffix)
    raw = os.fsencode(name)
    if len(raw) > room:
        name = _cut(raw[:room])
    return f"{name}{suffix}"


def _cut(raw: bytes) -> str:
    """``raw`` as a name, without the partial character a cut may have left at its end."""
    for end in range(len(raw), max(0, len(raw) - 4), -1):
        with contextlib.suppress(UnicodeDecodeError):
            return raw[:end].decode()
    return os.fsdecode(raw)  # not UTF-8 at all: keep the bytes as they are


def tmp_owner(name: str) -> int | None:
    """The pid that made a temporary name, or None if ``name`` is not one of ours."""
    _, sep, rest = name.rpartition(TMP_INFIX)
    pid, dash, _rand = rest.partition("-")
    return int(pid) if sep and dash and pid.isdigit() else None


def restore_name(job: str, step: int, *, node: int, worker: int = 0) -> str:
    return f"{job}-s{step_name(step)}-n{node}-w{worker}{RESTORE_SUFFIX}"


def parse_restore(name: str) -> RestoreRef | None:
    m = _RESTORE_RE.fullmatch(name)
    if m is None:
        return None
    return RestoreRef(
        job=m["job"], step=int(m["step"]), node=int(m["node"]), worker=int(m["worker"])
    )


def staging_path(step: int) -> str:
    """Path of a staged step, relative to the local directory."""
    return f"{TIERED_DIR}/{STAGING_DIR}/{step_name(step)}"


def is_marker_or_manifest(relpath: str) -> bool:
    """Files the manifest does not list: the top-level commit marker and the manifest itself."""
    return relpath in (COMMIT_MARKER, MANIFEST_NAME)


def node_dir(rank: int) -> str:
    """The durable sub-directory holding node ``rank``'s files of a multi-node step."""
    return f"{NODE_DIR_PREFIX}{rank}"


_PROCESS_PART = re.compile(r"(ocdbt\.)?process_\d+")


def process_owned(rel: str) -> bool:
    """Whether a file of a local step belongs to its process alone (``ocdbt.process_<i>/...``,
    ``array_metadatas/process_<i>``): in a multi-node step it keeps its path, which is where a
    global orbax checkpoint has it. Every other file (metadata, the per-process OCDBT root)
    exists on every node, and is kept per node under ``tiered-parts/node-<r>/``."""
    return any(_PROCESS_PART.fullmatch(part) for part in rel.split("/"))


def process_prefix(rel: str) -> str | None:
    """``rel`` up to its first per-process component (``default/ocdbt.process_0``), or None."""
    parts = rel.split("/")
    for i, part in enumerate(parts):
        if _PROCESS_PART.fullmatch(part):
            return "/".join(parts[: i + 1])
    return None


def part_path(rank: int, rel: str) -> str:
    """Where node ``rank``'s file ``rel`` of a multi-node step lives on the durable tier."""
    return rel if process_owned(rel) else f"{PARTS_DIR}/{node_dir(rank)}/{rel}"


def ocdbt_roots(rels: Iterable[str]) -> set[str]:
    """Item folders (``""`` for the step itself) holding per-process OCDBT databases: where a
    merged ``manifest.ocdbt`` goes."""
    roots = set()
    for rel in rels:
        parts = rel.split("/")
        for i, part in enumerate(parts[:-1]):
            if part.startswith("ocdbt.process_") and _PROCESS_PART.fullmatch(part):
                roots.add("/".join(parts[:i]))
    return roots


def in_ocdbt_root(rel: str, roots: set[str]) -> bool:
    """Whether ``rel`` is an OCDBT root's own file (its ``manifest.ocdbt`` or ``d/...``), which
    a merge writes for the whole step."""
    for root in roots:
        prefix = f"{root}/" if root else ""
        if rel.startswith(prefix):
            tail = rel[len(prefix) :]
            if tail == "manifest.ocdbt" or tail.startswith("d/"):
                return True
    return False


def part_marker(rank: int) -> str:
    """Path of node ``rank``'s part marker, relative to a durable step."""
    return f"{PARTS_DIR}/{rank}.json"


def restore_request_name(rank: int) -> str:
    return f"request-{rank}.json"


def displaced_name(step: int, moved_at: float) -> str:
    """``<step>-<UTC time>``: the name of a durable step moved aside at ``moved_at``."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(moved_at))
    return f"{step_name(step)}-{stamp}.{int(moved_at * 1e6) % 10**6:06d}Z"


def parse_displaced(name: str) -> Displaced | None:
    m = _DISPLACED_RE.fullmatch(name)
    if m is None:
        return None
    stamp = m["time"].rstrip("Z")
    whole, _, frac = stamp.partition(".")
    moved = calendar.timegm(time.strptime(whole, "%Y%m%dT%H%M%S")) + (
        int(frac) / 1e6 if frac else 0
    )
    return Displaced(name=name, step=int(m["step"]), moved_at=float(moved))

"""Each byte of a multi-node step uploaded once: every node uploads only the OCDBT keys it owns.

The local step does not change (each node saves every replica it holds, so it restores on its
own); only what its daemon uploads does:

1. **Index.** The node lists its OCDBT databases (``tiered.storage.ocdbt_keys``, a child
   process) and writes ``<step>/tiered-parts/index-<r>.json``: per item folder, every key with
   its value's size and digest, and the restore epoch.
2. **Plan.** Node 0, waiting for its own plan, reads the N indexes of the epoch once all are
   there and writes ``plan-<r>.json`` for every node: the keys it uploads
   (``tiered.policy.ownership``), the epoch and the digest of the index it was computed from.
3. **Own database.** Each node, polling only its own plan, copies the keys it owns from its local
   database into a new one in the local tier's ``.tiered/dedup/`` folder and uploads that as
   its ``ocdbt.process_<p>/``; its part marker says ``deduped``.
4. **Merge.** Node 0 merges the N databases (their keys are now disjoint) and checks that the
   merged root holds every key of every index before it commits (``tiered.storage.parts``).
5. **Fallback.** With no tensorstore beside a daemon, no index within ``tiered.dedup_wait_seconds``
   (node 0 then plans without it), no plan, or a plan of another epoch or index, a node uploads
   its whole database as before. Any mix is safe:
   every key is in the database of a node that followed the plan, or of one that uploaded all it
   holds.

A replaced node restores its deduplicated part by rebuilding its database from the merged
durable root, reading only the keys of its own index, each checked against the index's digest
(``tiered.storage.rebuild``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tiered.errors import CommitError, LayoutError, StorageError
from tiered.layout import (
    DEDUP_DIR,
    PARTS_DIR,
    TIERED_DIR,
    ocdbt_roots,
    process_prefix,
    step_name,
)
from tiered.manifest import Manifest, digest_of_file
from tiered.policy.ownership import Index, KeyFacts, assign
from tiered.storage import merge
from tiered.storage.errormap import translate_errors
from tiered.storage.merge import MergeUnavailable, kvstore_spec

if TYPE_CHECKING:
    from tiered.storage.steps import StepStore

log = logging.getLogger(__name__)

VERSION = 1
PLAN_GRACE_SECONDS = 30.0
"""How much longer than node 0 (``tiered.dedup_wait_seconds``) the other nodes wait for a plan."""
LATE_WAIT_SECONDS = 5.0
"""Node 0's wait for the indexes when nodes were late at the step before."""
POLL_SECONDS = 1.0
CHILD_TIMEOUT_SECONDS = 1800.0


def index_name(rank: int) -> str:
    return f"{PARTS_DIR}/index-{rank}.json"


def plan_name(rank: int) -> str:
    return f"{PARTS_DIR}/plan-{rank}.json"


def available() -> bool:
    """Whether tensorstore is beside this daemon (the ``merge`` extra)."""
    return importlib.util.find_spec("tensorstore") is not None


def databases(manifest: Manifest) -> dict[str, str]:
    """item folder -> this node's OCDBT database folder in it (``ocdbt.process_<p>``), for every
    item that has exactly one, with its ``manifest.ocdbt`` (a folder without one is no database
    tiered can read: it is uploaded as it is)."""
    found: dict[str, set[str]] = {}
    for root in ocdbt_roots(manifest.files):
        prefix = f"{root}/" if root else ""
        for rel in manifest.files:
            folder = process_prefix(rel)
            if folder and rel.startswith(prefix) and folder != rel:
                child = folder[len(prefix) :]
                if "/" not in child and child.startswith("ocdbt.process_"):
                    found.setdefault(root, set()).add(child)
    out: dict[str, str] = {}
    for root, children in found.items():
        if len(children) != 1:
            continue
        child = children.pop()
        if f"{root}/{child}/manifest.ocdbt".lstrip("/") in manifest.files:
            out[root] = child
    return out


def run_child(jobs: list[dict[str, Any]], storage_options: dict[str, Any] | None) -> list[Any]:
    """Run ``tiered.storage.ocdbt_keys`` on ``jobs``; its answers, in order."""
    out = merge.run_child(
        "tiered.storage.ocdbt_keys",
        jobs,
        storage_options,
        timeout=CHILD_TIMEOUT_SECONDS,
        what="the OCDBT key copy",
    )
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        raise StorageError(f"the OCDBT key copy failed: {tail}", transient=True)
    return list(json.loads(out.stdout))


def file_spec(path: Path) -> dict[str, Any]:
    return {"driver": "file", "path": str(path).rstrip("/") + "/"}


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Upload:
    """What a node uploads of a deduplicated step: the manifest of its part and where each of
    its files is on the local disk."""

    manifest: Manifest
    sources: dict[str, Path]
    folder: Path
    owned_bytes: int

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def prepare(
    tier: StepStore, step: int, step_dir: Path, manifest: Manifest, *, epoch: int
) -> Upload | None:
    """Index this node's databases, get its plan and build the database of the keys it owns;
    None when it uploads everything instead (the reason is logged)."""
    dbs = databases(manifest)
    if not dbs:
        return None
    rank = tier.topology.rank
    if not available():
        _write(tier, step, index_name(rank), _index_doc(tier, step, epoch, None, dbs))
        log.info("Node %d uploads all of step %d: no tensorstore beside the daemon", rank, step)
        return None
    try:
        listed = run_child(
            [{"op": "index", "db": file_spec(step_dir / r / c)} for r, c in sorted(dbs.items())],
            tier.storage_options,
        )
    except StorageError as err:  # a database tensorstore cannot read: upload it as it is
        _write(tier, step, index_name(rank), _index_doc(tier, step, epoch, None, dbs))
        log.warning("Node %d uploads all of step %d: listing its keys failed: %s", rank, step, err)
        return None
    roots = {root: keys for (root, _c), keys in zip(sorted(dbs.items()), listed, strict=True)}
    doc = _index_doc(tier, step, epoch, roots, dbs)
    _write(tier, step, index_name(rank), doc)
    plan = _wait_plan(tier, step, epoch, _digest(doc["roots"]))
    if plan is None:
        return None
    if plan.get("fallback"):
        log.info("Node %d uploads all of step %d: %s", rank, step, plan["fallback"])
        return None
    owned: dict[str, list[str]] = plan["roots"]
    folder = (
        step_dir.parent / TIERED_DIR / DEDUP_DIR / f"{step}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    _clear_old(step_dir.parent / TIERED_DIR / DEDUP_DIR, step)
    jobs = [
        {
            "op": "build",
            "src": file_spec(step_dir / root / child),
            "dest": file_spec(folder / root / child),
            "keys": owned.get(root, []),
        }
        for root, child in sorted(dbs.items())
    ]
    try:
        folder.mkdir(parents=True)
        run_child(jobs, tier.storage_options)
        files = {}
        sources = {}
        prefixes = [f"{r}/".lstrip("/") for r in dbs] + [
            f"{r}/{c}/".lstrip("/") for r, c in dbs.items()
        ]
        for rel, entry in manifest.files.items():
            if any(is_database_file(rel, prefix) for prefix in prefixes):
                # this node's database, replaced by the one of the keys it owns, and the
                # local root over it (a replaced node rebuilds its own)
                continue
            files[rel] = entry
            sources[rel] = step_dir / rel
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                rel = path.relative_to(folder).as_posix()
                files[rel] = digest_of_file(path)
                sources[rel] = path
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    size = sum(roots[r][k][0] for r, keys in owned.items() for k in keys)
    return Upload(
        manifest=replace(
            manifest, files=files, deduped=True, local_identity=manifest.copy_identity
        ),
        sources=sources,
        folder=folder,
        owned_bytes=size,
    )


def is_database_file(rel: str, prefix: str) -> bool:
    if not rel.startswith(prefix):
        return False
    tail = rel[len(prefix) :]
    return tail == "manifest.ocdbt" or tail.startswith("d/")


def _clear_old(folder: Path, step: int) -> None:
    """What an interrupted attempt at this step left."""
    if folder.is_dir():
        for old in folder.glob(f"{step}-*"):
            shutil.rmtree(old, ignore_errors=True)


def _index_doc(
    tier: StepStore,
    step: int,
    epoch: int,
    roots: dict[str, dict[str, list[Any]]] | None,
    dbs: dict[str, str],
) -> dict[str, Any]:
    return {
        "version": VERSION,
        "step": step,
        "node": tier.topology.rank,
        "nodes": tier.topology.nodes,
        "epoch": epoch,
        "databases": dbs,
        "roots": roots,  # None: this node cannot take part (no tensorstore)
    }


def _write(tier: StepStore, step: int, rel: str, doc: dict[str, Any]) -> None:
    with translate_errors(f"writing {tier.step_url(step)}/{rel}"):
        tier.store.write_small(tier.object_path(step, rel), json.dumps(doc).encode())


def read_doc(tier: StepStore, step: int, rel: str) -> dict[str, Any] | None:
    text = tier.store.read_text(f"{step_name(step)}/{rel}")
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _wait_plan(tier: StepStore, step: int, epoch: int, own: str) -> dict[str, Any] | None:
    """This node's plan of ``epoch`` computed from its index ``own`` (node 0 makes every
    node's); None when none came in time."""
    rank = tier.topology.rank
    wait = tier.dedup_wait + (0.0 if rank == 0 else PLAN_GRACE_SECONDS)
    if rank == 0 and tier.late_ranks:
        # the same nodes were late at the step before (down, or busy): do not hold every step
        # of this node the whole wait for them
        wait = min(wait, LATE_WAIT_SECONDS)
    deadline = time.monotonic() + wait
    while True:
        if rank == 0:
            plan = make_plans(tier, step, epoch, final=time.monotonic() >= deadline)
        else:
            plan = read_doc(tier, step, plan_name(rank))
        if (
            plan is not None
            and plan.get("epoch") == epoch
            and (plan.get("index") == own or plan.get("fallback"))
        ):
            return plan
        if time.monotonic() >= deadline:
            log.warning(
                "Node %d uploads all of step %d: no plan from node 0 within %.0f s",
                rank,
                step,
                wait,
            )
            return None
        time.sleep(POLL_SECONDS)


def make_plans(tier: StepStore, step: int, epoch: int, *, final: bool) -> dict[str, Any] | None:
    """Node 0: once every node's index of ``epoch`` is there, write every node's plan and return
    its own; with ``final`` (its wait is over), write a fallback plan for every node instead."""
    nodes = tier.topology.nodes
    made = read_doc(tier, step, plan_name(0))
    if made is not None and made.get("epoch") == epoch:
        # plans are made once per epoch: the nodes may have followed them already (a retry
        # that planned again could give a key to a node that uploaded without it)
        return made
    listed = tier.store.list_versions(f"{step_name(step)}/{PARTS_DIR}")
    have = [r for r in range(nodes) if f"index-{r}.json" in listed]
    if len(have) < nodes and not final:
        return None
    texts = tier.store.read_texts(
        [f"{step_name(step)}/{index_name(r)}" for r in have], workers=tier.concurrency
    )
    docs: dict[int, dict[str, Any]] = {}
    for r, text in zip(have, texts, strict=True):
        try:
            doc = json.loads(text) if text is not None else None
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("epoch") == epoch and doc.get("node") == r:
            if doc.get("roots") is not None and _parse_roots(doc) is None:
                continue  # malformed: that node uploads all it holds
            docs[r] = doc
    if len(docs) < nodes and not final:
        return None  # an index of another epoch: its node has not indexed this one yet
    able = {r: d for r, d in docs.items() if d.get("roots") is not None}
    why: dict[int, str] = {}
    mergeable = _mergeable(tier)
    for r in range(nodes):
        if mergeable is not None:
            why[r] = mergeable
        elif r not in docs:
            why[r] = f"its index of epoch {epoch} did not come within {tier.dedup_wait:.0f} s"
        elif r not in able:
            why[r] = "it has no tensorstore beside its daemon"
    planned = {r: d for r, d in able.items() if r not in why}
    tier.late_ranks = {r for r in range(nodes) if r not in docs}
    parsed = {r: _parse_roots(d) for r, d in planned.items()}
    ownership = assign({r: p for r, p in parsed.items() if p is not None})
    if ownership.divergent:
        # replicas that differ: each node must keep its own value to restore its part
        for r in planned:
            why[r] = f"replicas differ between nodes ({len(ownership.divergent)} key(s))"
        planned = {}
    for root, key, ranks in ownership.divergent[:8]:
        log.warning(
            "Step %d: nodes %s hold different values of %s/%s; node %d's is kept",
            step,
            ranks,
            root,
            key,
            ranks[0],
        )
    if why and planned:
        log.warning(
            "Step %d: node(s) %s upload all they hold (%s); the other %d share the rest",
            step,
            sorted(why)[:8],
            next(iter(why.values())),
            len(planned),
        )
    plans: dict[int, dict[str, Any]] = {}
    for r in range(nodes):
        plan: dict[str, Any] = {
            "version": VERSION,
            "step": step,
            "node": r,
            "epoch": epoch,
            "index": _digest(docs[r]["roots"]) if r in docs else None,
        }
        if r in planned:
            plan["roots"] = ownership.owned[r]
        else:
            plan["fallback"] = why[r]
        plans[r] = plan

    def put(r: str) -> None:
        _write(tier, step, plan_name(int(r)), plans[int(r)])

    tier.parallel(put, [str(r) for r in range(1, nodes)])
    _write(tier, step, plan_name(0), plans[0])
    return plans[0]


def _mergeable(tier: StepStore) -> str | None:
    """Why node 0 cannot merge a deduplicated step of this tier, or None: such a step restores
    only through its merged root, so without one every node uploads all it holds."""
    if not available():
        return "node 0 has no tensorstore to merge a deduplicated step"
    try:
        kvstore_spec(tier.url, tier.storage_options)
    except MergeUnavailable as err:
        return f"node 0 cannot merge on this store ({err})"
    return None


IndexDocs = dict[int, tuple[Any, Index | None]]
"""rank -> (the epoch of its index, its keys or None): ``read_index_docs``."""


def read_index_docs(tier: StepStore, step: int, ranks: list[int]) -> IndexDocs:
    """The indexes of ``ranks`` that are there: rank -> (its epoch, its keys, or None when it is
    malformed or its node could not index)."""
    texts = tier.store.read_texts(
        [f"{step_name(step)}/{index_name(r)}" for r in ranks], workers=tier.concurrency
    )
    out: IndexDocs = {}
    for r, text in zip(ranks, texts, strict=True):
        if text is None:
            continue
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            out[r] = (None, None)
            continue
        parsed = _parse_roots(doc) if doc.get("roots") is not None else None
        out[r] = (doc.get("epoch"), parsed)
    return out


def read_indexes(tier: StepStore, step: int, ranks: list[int], docs: IndexDocs) -> dict[int, Index]:
    """The indexes of ``ranks`` among ``docs`` (``read_index_docs``): node 0 checks the merged
    root against them, so each must be there and well formed."""
    out: dict[int, Index] = {}
    for r in ranks:
        if r not in docs:
            raise CommitError(f"{tier.step_url(step)}: node {r}'s index is missing")
        parsed = docs[r][1]
        if parsed is None:
            raise LayoutError(f"{tier.step_url(step)}: node {r}'s index is malformed")
        out[r] = parsed
    return out


def _parse_roots(doc: dict[str, Any]) -> Index | None:
    """An index's keys, or None when it is malformed."""
    try:
        return {
            str(root): {str(k): KeyFacts(int(v[0]), str(v[1])) for k, v in keys.items()}
            for root, keys in (doc.get("roots") or {}).items()
        }
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        return None

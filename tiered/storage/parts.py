"""Multi-node steps: each node uploads its own files under ``node-<r>/`` and ends with its part
marker ``parts/<r>.json`` (its manifest, carrying the restore epoch); node 0 alone commits the
step, once every node's part of the current epoch is there, by writing the merged manifest and
then the commit marker.

Functions over a step store (``tiered.storage.steps.StepStore``, which ``DurableTier``
implements) whose topology says which node it is.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tiered import faults
from tiered.errors import CommitError, LayoutError, NotFound, StorageError
from tiered.layout import (
    COMMIT_MARKER,
    GLOBAL_LAYOUT,
    MANIFEST_NAME,
    PARTS_DIR,
    in_ocdbt_root,
    node_dir,
    ocdbt_roots,
    part_marker,
    part_path,
    process_owned,
    process_prefix,
    step_name,
)
from tiered.manifest import FileEntry, Manifest
from tiered.storage import dedup, keyindex
from tiered.storage.errormap import translate_errors
from tiered.storage.merge import MergeIncomplete, merge_roots

if TYPE_CHECKING:
    from tiered.storage.steps import StepStore

log = logging.getLogger(__name__)


def write(tier: StepStore, step: int, manifest: Manifest, *, epoch: int) -> None:
    """This node's part marker: its files are uploaded and verified."""
    rank, nodes = tier.topology.rank, tier.topology.nodes
    part = replace(
        manifest,
        node=rank,
        nodes=nodes,
        epoch=epoch,
        host=socket.gethostname(),
        layout=GLOBAL_LAYOUT,
    )
    with translate_errors(f"writing node {rank}'s part of {tier.step_url(step)}"):
        tier.store.write_small(tier.object_path(step, part_marker(rank)), part.to_json().encode())


def _versions(tier: StepStore, step: int) -> dict[int, str]:
    """rank -> version of its part marker, for every marker of a multi-node step (one
    listing, no reads)."""
    listed = tier.store.list_versions(f"{step_name(step)}/{PARTS_DIR}")
    return {
        int(n.removesuffix(".json")): version
        for n, version in listed.items()
        if n.endswith(".json") and n.removesuffix(".json").isdigit()
    }


def ranks(tier: StepStore, step: int) -> list[int]:
    """Nodes whose part marker of a multi-node step exists (one listing, no reads)."""
    return sorted(_versions(tier, step))


def read(tier: StepStore, step: int, rank: int) -> Manifest:
    """One node's part marker (``NotFound``, a ``FileNotFoundError``, when it is not there)."""
    with translate_errors(f"reading {tier.step_url(step)}/{part_marker(rank)}"):
        data = tier.fs.cat_file(tier.object_path(step, part_marker(rank)))
    return _parse(tier, step, rank, data)


def read_all(
    tier: StepStore, step: int, *, versions: dict[int, str] | None = None
) -> dict[int, Manifest]:
    """node rank -> part marker, for every part written so far (``versions``: from a listing
    just made). Those not read before at their version are read, in parallel, since node 0
    reads all N of them before a commit."""
    versions = _versions(tier, step) if versions is None else versions
    out = {}
    todo = []
    for rank, version in sorted(versions.items()):
        kept = tier.parts_read.get(step, rank, version)
        if kept is None:
            todo.append(rank)
        else:
            out[rank] = kept
    texts = tier.store.read_texts(
        [f"{step_name(step)}/{part_marker(r)}" for r in todo], workers=tier.concurrency
    )
    for rank, text in zip(todo, texts, strict=True):
        if text is None:
            raise NotFound(f"{tier.step_url(step)}/{part_marker(rank)}: vanished while read")
        out[rank] = _parse(tier, step, rank, text)
        tier.parts_read.put(step, rank, versions[rank], out[rank])
    return dict(sorted(out.items()))


def _parse(tier: StepStore, step: int, rank: int, data: str | bytes) -> Manifest:
    part = Manifest.from_json(data)
    if part.step != step or part.node != rank:
        raise LayoutError(
            f"{tier.step_url(step)}/{part_marker(rank)}: holds step {part.step} node {part.node}"
        )
    return part


def commit(tier: StepStore, step: int, *, epoch: int, marker: bytes) -> list[int]:
    """Commit a multi-node step once every node's part is there; return the missing ranks.

    Only node 0 calls this, so two committers never race; the marker is still created with a
    precondition (GCS ``ifGenerationMatch=0``, S3 ``If-None-Match``, an exclusive link on
    ``file://``) where the backend has one. A part from another restore epoch is stale (the
    run restarted from an older step since) and counts as missing.
    """
    nodes = tier.topology.nodes
    if tier.has_marker(step):
        tier.parts_read.forget(step)
        return []
    versions = _versions(tier, step)
    if len(versions) < nodes:
        # Read one part (a single small GET, once) so a job-shape mismatch shows up at once.
        newest = max(versions, default=None)
        sample = (
            read_all(tier, step, versions={newest: versions[newest]}) if newest is not None else {}
        )
        _check_shapes(tier, step, sample)
        return [r for r in range(nodes) if r not in versions]
    found = read_all(tier, step, versions=versions)
    _check_shapes(tier, step, found)
    fresh = {r: p for r, p in found.items() if p.epoch == epoch}
    missing = [r for r in range(nodes) if r not in fresh]
    if missing:
        return missing
    layouts = {p.layout for p in fresh.values()}
    if len(layouts) > 1:
        raise CommitError(
            f"{tier.step_url(step)}: the nodes' parts have different layouts "
            f"({sorted(map(str, layouts))}): is every node's daemon the same tiered version?"
        )
    merged_root = False
    key_index = None
    if layouts == {GLOBAL_LAYOUT}:
        files, merged_root, key_index = _global_files(tier, step, fresh, epoch=epoch)
    else:  # parts of tiered 0.2: each node's files in its own folder
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
        nodes=nodes,
        epoch=epoch,
        layout=fresh[0].layout,
        merged=merged_root,
        key_index=key_index,
    )
    # Each node read its own objects back before writing its part; here every object is
    # checked once more for presence and size (and crc32c where listings carry it).
    tier.verify_files(step, merged, read_back=False)
    with translate_errors(f"committing {tier.step_url(step)}"):
        tier.store.write_small(tier.object_path(step, MANIFEST_NAME), merged.to_json().encode())
        faults.hit("commit")
        if not tier.store.create_exclusive(tier.object_path(step, COMMIT_MARKER), marker):
            log.warning(
                "%s was already committed by another writer; kept its marker", tier.step_url(step)
            )
    tier.parts_read.forget(step)
    return []


def check_names(tier: StepStore, step: int, manifest: Manifest) -> None:
    """Refuse a node's step holding ``tiered-parts/...`` or ``tiered-manifest.json``: in a
    multi-node step node 0 copies its files to their own paths, and those are tiered's (another
    node's part marker, the step's manifest)."""
    for rel in manifest.files:
        if rel.split("/", 1)[0] in (PARTS_DIR, MANIFEST_NAME):
            raise LayoutError(
                f"{tier.step_url(step)}: the local step holds {rel}, a name tiered keeps for "
                "its own files in a multi-node step; refusing to upload it"
            )


def listing(tier: StepStore, step: int, manifest: Manifest) -> dict[str, Any]:
    """This node's objects of a multi-node step, keyed by the manifest's relative paths: it
    lists ``tiered-parts/node-<r>/`` and this process's own folders, and of folders several
    processes write into (``array_metadatas/``) only the manifest's files. An object that the
    manifest does not list is then a stray of this node's own (removed before its part marker
    is written)."""
    parts_prefix = f"{PARTS_DIR}/{node_dir(tier.topology.rank)}"
    own = {parts_prefix}
    shared = set()
    for rel in manifest.files:
        prefix = process_prefix(rel)
        if prefix is not None and prefix != rel:
            own.add(prefix)
        elif prefix is not None and "/" in rel:
            shared.add(rel.rsplit("/", 1)[0])
    out: dict[str, Any] = {}
    for prefix in sorted(own):
        for sub, info in tier.remote_files(step, under=prefix).items():
            out[sub if prefix == parts_prefix else f"{prefix}/{sub}"] = info
    for prefix in sorted(shared):
        for sub, info in tier.remote_files(step, under=prefix).items():
            if f"{prefix}/{sub}" in manifest.files:
                out[f"{prefix}/{sub}"] = info
    return out


def foreign_manifest(tier: StepStore, step: int) -> tuple[Manifest | None, str | None]:
    """A step written by a job of another shape: restorable (whole, resharded) when node 0
    merged it into one orbax checkpoint, else not, and why."""
    try:
        manifest = tier.read_manifest(step)
    except FileNotFoundError:
        return None, f"no {MANIFEST_NAME} and no part for node {tier.topology.rank}"
    except LayoutError as err:
        return None, f"unreadable manifest: {err}"
    if manifest.layout == GLOBAL_LAYOUT and manifest.merged:
        return whole_checkpoint(manifest), None
    return None, (
        f"written by a job of {manifest.nodes} node(s), this one has {tier.topology.nodes} "
        "(and not merged into one orbax checkpoint: `tiered export` makes one)"
    )


def whole_checkpoint(manifest: Manifest) -> Manifest:
    """A multi-node step's files without the nodes' private copies: the orbax checkpoint that
    any topology restores."""
    files = {r: e for r, e in manifest.files.items() if not r.startswith(f"{PARTS_DIR}/")}
    return replace(manifest, files=files)


def _check_shapes(tier: StepStore, step: int, found: dict[int, Manifest]) -> None:
    nodes = tier.topology.nodes
    for rank, part in found.items():
        if part.nodes != nodes or rank >= nodes:
            raise CommitError(
                f"{tier.step_url(step)}: node {rank}'s part was written by a job of "
                f"{part.nodes} nodes, but this job has {nodes}: is tiered.num_nodes the same on "
                "every node?"
            )


def _global_files(
    tier: StepStore, step: int, fresh: dict[int, Manifest], *, epoch: int
) -> tuple[dict[str, FileEntry], bool, FileEntry | None]:
    """Make the step one orbax checkpoint; return every file it then holds, whether its
    OCDBT roots are merged, and the entry of its key index (``tiered.storage.partial``).

    Each process's own shards are already in place. Node 0's copy of the files every node has
    (the step's and each item's metadata) is copied server-side to the step's own paths, and
    the per-process OCDBT databases get one merged root (``tiered.storage.merge``). Without a
    merge (no tensorstore beside the daemon, or a backend it cannot reach) the step still
    commits, and restores on the same topology; ``tiered export`` merges a copy.
    """
    owners: dict[str, int] = {}
    files: dict[str, FileEntry] = {}
    for rank, part in sorted(fresh.items()):
        check_names(tier, step, part)  # a part from a node that did not check
        for rel, entry in part.files.items():
            if process_owned(rel):
                if rel in owners:
                    raise CommitError(
                        f"{tier.step_url(step)}: nodes {owners[rel]} and {rank} both wrote {rel}: "
                        "does every node's process have its own jax.process_index()?"
                    )
                owners[rel] = rank
            files[part_path(rank, rel)] = entry
    roots = ocdbt_roots(owners)
    shared = {
        rel: entry
        for rel, entry in fresh[0].files.items()
        if not process_owned(rel) and not in_ocdbt_root(rel, roots)
    }

    def copy(rel: str) -> None:
        with translate_errors(f"copying node 0's {rel} into {tier.step_url(step)}"):
            tier.store.copy(tier.object_path(step, part_path(0, rel)), tier.object_path(step, rel))

    tier.parallel(copy, sorted(shared))
    files.update(shared)
    if not roots:
        return files, False, None
    _clear_roots(tier, step, roots)  # what an interrupted commit may have left
    jobs = []
    for root in sorted(roots):
        prefix = f"{root}/" if root else ""
        children: dict[int, set[str]] = {}
        for rel, rank in owners.items():
            folder = process_prefix(rel)
            if folder and rel.startswith(prefix) and folder != rel:
                children.setdefault(rank, set()).add(folder[len(prefix) :])
        ordered = [c for r in sorted(children) for c in sorted(children[r])]
        jobs.append((f"{tier.step_url(step)}/{root}".rstrip("/"), ordered))
    started = time.monotonic()
    deduped = sorted(r for r, p in fresh.items() if p.deduped)
    # Every node's index, read once, for the merge's check and the key index; none when no
    # node deduplicated (dedup off: no indexes to read, and N GETs a commit saved).
    docs = dedup.read_index_docs(tier, step, sorted(fresh)) if deduped else {}
    # a node that uploaded all it holds needs no index: every key it holds is in its database
    expect = _expected_keys(tier, step, dedup.read_indexes(tier, step, deduped, docs), roots)
    try:
        merge_roots(jobs, tier.storage_options, expect=expect)
    except MergeIncomplete as err:
        _clear_roots(tier, step, roots)
        raise CommitError(f"{tier.step_url(step)} not committed: {err}") from None
    except StorageError as err:  # MergeUnavailable, a timeout, a database it cannot read
        if deduped:
            # Nodes that uploaded only the keys they own restore only through the merged
            # root: no commit without it (the attempt is retried).
            _clear_roots(tier, step, roots)
            raise StorageError(
                f"{tier.step_url(step)}: the parts of nodes {deduped[:8]} are deduplicated and "
                f"restore only through a merged OCDBT root, which failed: {err}",
                transient=True,
            ) from None
        # The checkpoint matters more than its merged root: commit it without one.
        _clear_roots(tier, step, roots)
        log.warning(
            "Committing %s without a merged OCDBT root (%s): it restores on a job of %d nodes; "
            "`tiered export` writes a copy plain orbax reads",
            tier.step_url(step),
            err,
            tier.topology.nodes,
        )
        return files, False, None
    merged = True
    for root in sorted(roots):
        written = _root_files(tier, step, root)
        if f"{root}/manifest.ocdbt".lstrip("/") not in written:
            log.warning("%s/%s: the merge wrote no OCDBT root", tier.step_url(step), root)
            merged = False
        for rel in written:
            # Read back even where the store lists a crc32c: these are OCDBT files, told
            # apart by their xxh3 only, and a merged root is small (the data stays put).
            files[rel] = tier.digest_of(step, rel)
    log.info(
        "Merged the OCDBT databases of %d nodes into one root for %s in %.1f s",
        len(fresh),
        tier.step_url(step),
        time.monotonic() - started,
    )
    key_index = (
        write_key_index(tier, step, sorted(fresh), docs, roots, epoch)
        if merged and deduped
        else None
    )
    return files, merged, key_index


def write_key_index(
    tier: StepStore,
    step: int,
    ranks: list[int],
    docs: dedup.IndexDocs,
    roots: set[str],
    epoch: int,
) -> FileEntry | None:
    """Write the step's key index (every key of its merged roots, with its value's size and
    digest: the union of the nodes' indexes of this epoch); None, and a job of another shape
    reads the step whole, where a node has none or two nodes hold different values of a key."""
    union: dict[str, dict[str, list[Any]]] = {root: {} for root in roots}
    why = None
    for r in ranks:
        got_epoch, index = docs.get(r, (None, None))
        if index is None or got_epoch != epoch:
            why = f"node {r} has no index of epoch {epoch}"
            break
        for root, keys in index.items():
            if root not in union:
                continue
            into = union[root]
            for key, facts in keys.items():
                value = [facts.size, facts.digest]
                if into.setdefault(key, value) != value:
                    why = f"nodes hold different values of {root}/{key}"
                    break
            if why:
                break
        if why:
            break
    if why is not None:
        log.info(
            "%s has no key index (%s): a job of another shape reads it whole",
            tier.step_url(step),
            why,
        )
        return None
    return keyindex.write(tier, step, union)


def _expected_keys(
    tier: StepStore, step: int, indexes: dict[int, dedup.Index], roots: set[str]
) -> dict[str, list[str]] | None:
    """root URL -> every key the nodes' ``indexes`` name under it: what the merged root must
    hold; None with no index to check against."""
    if not indexes:
        return None
    out: dict[str, set[str]] = {}
    for index in indexes.values():
        for root, keys in index.items():
            if root in roots:
                out.setdefault(f"{tier.step_url(step)}/{root}".rstrip("/"), set()).update(keys)
    return {url: sorted(keys) for url, keys in out.items()}


def _clear_roots(tier: StepStore, step: int, roots: set[str]) -> None:
    for root in sorted(roots):
        for rel in _root_files(tier, step, root):
            with translate_errors(f"removing {rel} of {tier.step_url(step)}"):
                tier.fs.rm_file(tier.object_path(step, rel))


def _root_files(tier: StepStore, step: int, root: str) -> dict[str, dict]:
    """The objects of an OCDBT root of the step: its ``manifest.ocdbt`` and ``d/...``."""
    prefix = f"{root}/" if root else ""
    found = {}
    for sub, info in tier.remote_files(step, under=f"{prefix}d").items():
        found[f"{prefix}d/{sub}"] = info
    with (
        contextlib.suppress(FileNotFoundError),
        translate_errors(f"reading {tier.step_url(step)}/{prefix}manifest.ocdbt"),
    ):
        found[f"{prefix}manifest.ocdbt"] = tier.fs.info(
            tier.object_path(step, f"{prefix}manifest.ocdbt")
        )
    return found

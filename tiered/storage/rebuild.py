"""A replaced node's part of a deduplicated step (``tiered.storage.dedup``) restored: its files
downloaded as they are, and its OCDBT databases rebuilt from the merged durable root, reading
only the keys of its own index, each value checked against the index's digest. The local step
that results holds the keys the node saved, in other files, and counts as a copy of it."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tiered.errors import CommitError
from tiered.layout import COMMIT_MARKER
from tiered.manifest import FileEntry, Manifest, digest_of_file
from tiered.storage.dedup import (
    available,
    databases,
    file_spec,
    index_name,
    is_database_file,
    read_doc,
    run_child,
)
from tiered.storage.merge import kvstore_spec

if TYPE_CHECKING:
    from tiered.storage.steps import StepStore

log = logging.getLogger(__name__)


def kept_files(part: Manifest) -> dict[str, FileEntry]:
    """A deduplicated part's files a replaced node downloads as they are: all but its OCDBT
    databases, which ``rebuild`` makes again."""
    dbs = databases(part)
    owned = [f"{r}/{c}/".lstrip("/") for r, c in dbs.items()]
    return {
        rel: e for rel, e in part.files.items() if not any(is_database_file(rel, p) for p in owned)
    }


def rebuilt_manifest(part: Manifest, kept: Manifest, folder: Path) -> Manifest:
    """The manifest of a local step rebuilt from a deduplicated ``part`` in ``folder``: the
    files downloaded as they were (``kept``, verified) and those the rebuild wrote, read once;
    its identity as a copy is that of the step the part was made from."""
    files = dict(kept.files)
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in files and rel != COMMIT_MARKER:
            files[rel] = digest_of_file(path)
    return replace(kept, files=files, deduped=False, local_identity=part.copy_identity)


def rebuild(tier: StepStore, step: int, part: Manifest, dest: Path) -> int:
    """Rebuild this node's OCDBT databases of a deduplicated step into the step folder being
    restored (``dest``): each key of its index read from the merged durable root and checked
    against the index's digest, then the local root over it. Returns the bytes of the values."""
    rank = tier.topology.rank
    doc = read_doc(tier, step, index_name(rank))
    if doc is None or not doc.get("roots"):
        raise CommitError(f"{tier.step_url(step)}: node {rank}'s index is missing or unreadable")
    if not available():
        raise CommitError(
            f"restoring node {rank}'s part of {tier.step_url(step)} (deduplicated) needs "
            "tensorstore beside the daemon: install tiered-checkpoint[merge]"
        )
    jobs = []
    for root, child in sorted(doc["databases"].items()):
        keys = doc["roots"].get(root, {})
        jobs.append(
            {
                "op": "rebuild",
                "src": kvstore_spec(
                    f"{tier.step_url(step)}/{root}".rstrip("/"), tier.storage_options
                ),
                "dest": file_spec(dest / root / child),
                "root": file_spec(dest / root) if root else file_spec(dest),
                "child": child,
                "keys": keys,
            }
        )
    run_child(jobs, tier.storage_options)
    size = sum(v[0] for keys in doc["roots"].values() for v in keys.values())
    log.info(
        "Rebuilt node %d's databases of step %d from the merged root: %d keys, %d bytes, "
        "each checked against its index",
        rank,
        step,
        sum(len(keys) for keys in doc["roots"].values()),
        size,
    )
    return size

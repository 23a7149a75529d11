"""What the multi-node protocol costs as the node count grows (``python -m bench scale`` measures
it at 16 to 1,024 nodes; these are its quick checks on ``file://``): every node but node 0 pays
the same per durable step at any N, node 0's polls do not reread what they have read, and the
merged root of N databases is one version, whatever N."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.scale import make_local_step, open_node, run_nodes
from tiered.storage.merge import merge_roots
from tiered.tiers import promote_step


def test_requests_per_node_do_not_grow_with_the_node_count(tmp_path: Path) -> None:
    rows = {n: run_nodes(n, f"file://{tmp_path}/d{n}/durable", tmp_path / f"d{n}") for n in (4, 16)}
    per_step = "requests_per_other_node_per_step"
    assert rows[16][per_step]["max"] <= rows[4][per_step]["max"], rows
    # An agreement costs a node one request and one read per poll: the polls depend on how long
    # it waits for the last node to ask (threads on a loaded machine), not on N.
    agreement = "requests_per_other_node_agreement"
    assert rows[16][agreement]["mean"] <= rows[4][agreement]["mean"] + 1, rows
    # Node 0's work is linear: a marker read per node, a fixed part besides, and at most three
    # requests per one-second poll while the others upload.
    fixed = {n: r["requests_node0_per_step"] - 3 * r["commit_polls"] for n, r in rows.items()}
    assert fixed[16] - fixed[4] <= 3 * 12, rows


def test_node_0_reads_each_part_marker_once_while_a_stale_part_waits(tmp_path: Path) -> None:
    """After a restart the parts of the old run's step are stale (another epoch); node 0 polls
    once a second until each node uploads again, and must not reread every marker each time."""
    url = f"file://{tmp_path}/durable"
    nodes = [open_node(url, {}, r, 8) for r in range(8)]
    locals_ = [make_local_step(tmp_path / "local", r, 8) for r in range(8)]
    for r in range(1, 8):
        promote_step(locals_[r], nodes[r][0], 100)  # epoch 0: the old run's
    tier0, counter0 = nodes[0]
    assert tier0.commit_parts(100, epoch=1, marker=b"ok") == [0]
    tier0.upload_step(locals_[0].step_dir(100), step=100, epoch=1)
    assert tier0.commit_parts(100, epoch=1, marker=b"ok") == list(range(1, 8))
    reads = counter0.by_name.get("cat_file", 0)
    for _ in range(3):
        assert tier0.commit_parts(100, epoch=1, marker=b"ok") == list(range(1, 8))
    assert counter0.by_name.get("cat_file", 0) == reads, "the polls reread unchanged markers"
    # A node that uploads again is read again, once, and the step commits.
    for r in range(1, 8):
        nodes[r][0].upload_step(locals_[r].step_dir(100), step=100, epoch=1)
    assert tier0.commit_parts(100, epoch=1, marker=b"ok") == []
    assert counter0.by_name["cat_file"] == reads + 7
    assert tier0.committed_steps() == [100]


def test_the_merged_root_of_many_databases_is_one_version(tmp_path: Path) -> None:
    """A transaction per database wrote one version and one data file per node into the
    merged root, and node 0 read each back; and a key several nodes hold (a replicated
    array) keeps the lowest rank's entry."""
    import tensorstore as ts

    root = tmp_path / "state"
    context = ts.Context()

    def kv(path: Path) -> ts.KvStore:
        spec = {"driver": "ocdbt", "base": {"driver": "file", "path": f"{path}/"}}
        return ts.KvStore.open(spec, context=context).result()

    children = []
    for rank in range(64):
        child = kv(root / f"ocdbt.process_{rank}")
        with ts.Transaction() as txn:
            child.with_transaction(txn).write(f"w/c/{rank}", os.urandom(64)).result()
            child.with_transaction(txn).write("b/c/0", f"node {rank}".encode()).result()
        children.append(f"ocdbt.process_{rank}")
    merge_roots([(f"file://{root}", children)], None)
    merged = kv(root)
    assert len(merged.list().result()) == 65
    assert merged.read("b/c/0").result().value == b"node 0"
    assert len(os.listdir(root / "d")) <= 2, sorted(os.listdir(root / "d"))
    manifest = (root / "manifest.ocdbt").stat().st_size
    assert manifest < 4096, json.dumps({"manifest.ocdbt": manifest})

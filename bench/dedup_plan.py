"""``python -m bench dedup``: the dedup's planning at 16 to 1,024 nodes, one machine.

Each node's index (``tiered-parts/index-<r>.json``) is written as its daemon writes it, for a
data-parallel state of ``KEYS`` replicated keys (every node holds them) and one sharded key of
its own; then node 0's own code (``tiered.storage.dedup``) plans once every index is there, as
it does while it waits for its own plan: one listing, N index reads, the assignment, N plan
writes. Each other node then reads its plan once. Measured per N: node 0's planning time and
store calls, the calls per other node, the largest upload over the mean, and the bytes of the
step's keys uploaded over the unique bytes (1.00 when each key goes up once).

What it does not run: the tensorstore child each node starts to list its keys and build the
database of the keys it owns (one per node, on that node's CPU, the same at any N; measured by
``python -m bench bytes`` and tests/test_dedup.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.scale import NODE_COUNTS, STEP, open_node
from tiered.manifest import Manifest
from tiered.storage import dedup, keyindex, parts
from tiered.storage.dedup import index_name, plan_name

KEYS = 200
"""Replicated keys of the state: a model's arrays, each one chunk."""


def _index(rank: int, nodes: int) -> dict[str, Any]:
    keys = {f"layer{i}/c/0": [(1 + i % 7) << 20, f"{i:032x}"] for i in range(KEYS)}
    keys[f"emb/c/{rank}"] = [4 << 20, f"{rank + 10**6:032x}"]
    return {
        "version": dedup.VERSION,
        "step": STEP,
        "node": rank,
        "nodes": nodes,
        "epoch": 0,
        "databases": {"state": f"ocdbt.process_{rank}"},
        "roots": {"state": keys},
    }


def one(url: str, options: dict[str, Any], nodes: int) -> dict[str, Any]:
    tiers = [open_node(url, options, r, nodes) for r in range(nodes)]
    for tier, _counter in tiers:
        tier.store.write_small(
            tier.object_path(STEP, index_name(tier.topology.rank)),
            json.dumps(_index(tier.topology.rank, nodes)).encode(),
        )
    node0, counter0 = tiers[0]
    before0 = counter0.n
    began = time.perf_counter()
    plan0 = dedup.make_plans(node0, STEP, 0, final=False)
    plan_s = time.perf_counter() - began
    assert plan0 is not None and "roots" in plan0, plan0
    node0_calls = counter0.n - before0
    others = []
    loads = []
    for tier, counter in tiers:
        rank = tier.topology.rank
        before = counter.n
        text = tier.store.read_text(f"{STEP}/{plan_name(rank)}")
        if rank:
            others.append(counter.n - before + 1)  # its own index PUT, then this GET
        plan = json.loads(text or "{}")
        index = _index(rank, nodes)["roots"]["state"]
        loads.append(sum(index[k][0] for k in plan["roots"].get("state", [])))
    unique = sum((1 + i % 7) << 20 for i in range(KEYS)) + nodes * (4 << 20)
    mean = sum(loads) / nodes
    # The key index at the commit: node 0 reads the N indexes once (the merge's check reads the
    # same ones) and writes one object; a process of a job of another shape reads it once.
    before0 = counter0.n
    began = time.perf_counter()
    docs = dedup.read_index_docs(node0, STEP, list(range(nodes)))
    entry = parts.write_key_index(node0, STEP, list(range(nodes)), docs, {"state"}, 0)
    key_index_s = time.perf_counter() - began
    assert entry is not None
    node0_calls_after = counter0.n - before0
    # A process of a job of another shape that needs one node's shard of the sharded array:
    # the header, then the block that names that key.
    reader, reader_counter = open_node(url, options, 0, nodes * 2)
    before = reader_counter.n
    manifest = Manifest(step=STEP, nodes=nodes, key_index=entry)
    index = keyindex.KeyIndex(reader, STEP, manifest)
    found = index.lookup("state", [f"emb/c/{nodes // 2}"])
    assert list(found) == [f"emb/c/{nodes // 2}"], found
    body_size = sum(b[3] for r in index.roots.values() for b in r.blocks)
    return {
        "nodes": nodes,
        "keys_per_node": KEYS + 1,
        "node0_plan_seconds": plan_s,
        "node0_calls": node0_calls,
        "calls_per_other_node": max(others) if others else None,
        "upload_max_over_mean": max(loads) / mean,
        "uploaded_over_unique": sum(loads) / unique,
        "key_index_seconds": key_index_s,
        "key_index_node0_calls": node0_calls_after,
        "key_index_header_bytes": entry.size,
        "key_index_body_bytes": body_size,
        "key_index_keys": KEYS + nodes,
        "key_index_reader_calls": reader_counter.n - before,
        "key_index_reader_bytes": index.header_bytes + index.block_bytes,
    }


SCALE_ARRAYS = 200
SCALE_CHUNKS = 5000
SCALE_NEEDED = 11
"""The key index at a million keys: 200 arrays of 5,000 chunks each (fully sharded arrays of a
5,000-device job), read by a process that needs 11 chunks of each."""


def key_index_scale(work: Path) -> dict[str, Any]:
    """Node 0 writes the index of ``SCALE_ARRAYS`` x ``SCALE_CHUNKS`` keys; a process of another
    job's shape looks up its ``SCALE_NEEDED`` chunks of every array and the arrays' metadata."""
    roots = {
        "state": {
            f"layer{a}/c/{c}": [1 << 20, f"{a * SCALE_CHUNKS + c:032x}"]
            for a in range(SCALE_ARRAYS)
            for c in range(SCALE_CHUNKS)
        }
    }
    for a in range(SCALE_ARRAYS):
        roots["state"][f"layer{a}/zarr.json"] = [400, f"{a:032x}"]
    url = f"file://{work / 'key-index-scale'}"
    node0, counter0 = open_node(url, {}, 0, 2)
    began = time.perf_counter()
    entry = keyindex.write(node0, STEP, roots)
    write_s = time.perf_counter() - began
    write_calls = counter0.n
    reader, counter = open_node(url, {}, 1, 4)
    began = time.perf_counter()
    index = keyindex.KeyIndex(reader, STEP, Manifest(step=STEP, nodes=2, key_index=entry))
    start = SCALE_CHUNKS // 2
    asked = [
        f"layer{a}/c/{c}" for a in range(SCALE_ARRAYS) for c in range(start, start + SCALE_NEEDED)
    ] + [f"layer{a}/zarr.json" for a in range(SCALE_ARRAYS)]
    found = index.lookup("state", asked)
    read_s = time.perf_counter() - began
    assert len(found) == len(asked)
    body = sum(b[3] for r in index.roots.values() for b in r.blocks)
    return {
        "keys": len(roots["state"]),
        "asked": len(asked),
        "write_seconds": write_s,
        "write_calls": write_calls,
        "header_bytes": entry.size,
        "body_bytes": body,
        "reader_seconds": read_s,
        "reader_calls": counter.n,
        "reader_bytes": index.header_bytes + index.block_bytes,
    }


def dedup_plan(*, work: Path, node_counts: tuple[int, ...] = NODE_COUNTS) -> dict[str, Any]:
    from bench.common import drop_bucket, gcs_emulator, new_bucket

    rows = []
    for n in node_counts:
        store = work / f"dedup-{n}"
        row = one(f"file://{store}", {}, n)
        row["backend"] = "file"
        rows.append(row)
        print(f"   {n} nodes, file: {json.dumps(row)}", flush=True)
    with gcs_emulator():
        for n in node_counts:
            bucket = new_bucket()
            row = one(f"gs://{bucket}/run", {"token": "anon"}, n)
            row["backend"] = "gs"
            rows.append(row)
            print(f"   {n} nodes, gs: {json.dumps(row)}", flush=True)
            drop_bucket(bucket)
    scale = key_index_scale(work)
    print(f"   key index at scale: {json.dumps(scale)}", flush=True)
    return {
        "params": {"keys_per_node": KEYS + 1, "step": STEP},
        "rows": rows,
        "key_index_scale": scale,
    }


def render(r: dict[str, Any]) -> list[str]:
    out = [
        f"Node 0's planning of a deduplicated step (`bench/dedup_plan.py`): every node's index "
        f"of {r['params']['keys_per_node']} keys ({r['params']['keys_per_node'] - 1} replicated "
        "on every node, as a data-parallel state's arrays, and one sharded key of its own) is "
        "written as its daemon writes it; then node 0's own code plans (one listing, the N "
        "indexes read in parallel, the assignment, N plans written) and each node reads its "
        "plan. Store calls are counted on each node's filesystem, as in section 10. The "
        "tensorstore child each node runs to list and copy its keys is the same at any N and "
        "is not part of this table (section 12 runs it).",
        "",
        "| backend | nodes | node 0's planning (s) | node 0's store calls | calls per other "
        "node | largest upload / mean | bytes uploaded / unique | key index: node 0 (s) | "
        "key index: node 0's calls | key index: keys, header / body (KiB) | key index, a "
        "reader of one shard: calls, KiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        out.append(
            f"| {row['backend']} | {row['nodes']} | {row['node0_plan_seconds']:.2f} | "
            f"{row['node0_calls']} | {row['calls_per_other_node']} | "
            f"{row['upload_max_over_mean']:.2f} | {row['uploaded_over_unique']:.2f} | "
            f"{row['key_index_seconds']:.2f} | {row['key_index_node0_calls']} | "
            f"{row['key_index_keys']}, {row['key_index_header_bytes'] / 1024:.0f} / "
            f"{row['key_index_body_bytes'] / 1024:.0f} | {row['key_index_reader_calls']}, "
            f"{row['key_index_reader_bytes'] / 1024:.0f} |"
        )
    out += [
        "",
        "Node 0's calls are one listing plus one read and one write per node: linear, with a "
        "constant of about 2, and its planning takes 2 to 3 ms per node. Every other node "
        "makes two calls for the dedup whatever N (its index, and its plan once it is there; "
        "one more read a second while it waits). Each byte goes up once at every N. The balance "
        "is bounded by the keys: a key is never split, so the largest upload is at most the "
        "mean plus one key. Here every node's own 4 MiB shard plus at most one replicated key "
        "of up to 7 MiB, against a mean that falls towards the shard as N grows (800 MiB of "
        "replicated keys over 1,024 nodes is 0.8 MiB each): max / mean 2.30 at 1,024 nodes, "
        "that is 11 MiB, where one node uploading all the replicated state would send 800 "
        "MiB. Smaller chunks (`tiered.local_data_file_size` bounds them) even it out further.",
        "",
        'The key index (docs/multinode.md, "Reading only what a node needs"): at the commit '
        "node 0 reads the N indexes once (the merge's key check uses the same reads) and "
        "writes two objects, every key of the step with its value's size and digest in blocks "
        "(the body) and where each block is (the header); a process of a job of another shape "
        "that needs one shard reads the header and one block, two calls whatever N. Its size "
        "follows the step's keys (here the replicated keys and one shard per node), not the "
        "readers.",
    ]
    k = r.get("key_index_scale")
    if k:
        out += [
            "",
            f"At a million keys ({SCALE_ARRAYS} arrays of {SCALE_CHUNKS:,} chunks, as fully "
            "sharded arrays of a 5,000-device job; `file://`), node 0 writes the index and a "
            f"process of another shape looks up {SCALE_NEEDED} chunks of every array and each "
            "array's metadata:",
            "",
            "| keys | node 0 writes (s) | its calls | header (KiB) | body (MiB) | keys asked | "
            "the reader (s) | its calls | it reads (MiB) | of the whole index |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| {k['keys']:,} | {k['write_seconds']:.1f} | {k['write_calls']} | "
            f"{k['header_bytes'] / 1024:.0f} | {k['body_bytes'] / 2**20:.1f} | {k['asked']:,} | "
            f"{k['reader_seconds']:.2f} | {k['reader_calls']} | "
            f"{k['reader_bytes'] / 2**20:.1f} | "
            f"{k['reader_bytes'] / (k['header_bytes'] + k['body_bytes']):.2f} |",
            "",
            "The reader fetches the header and the blocks that name its keys (one ranged read "
            "each, in parallel), not the index: before the blocks, each process read and parsed "
            "the whole of it (96 MiB and 8.6 s at this size, measured by the review).",
        ]
    return out

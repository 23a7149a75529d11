"""Each byte of a multi-node step stored once (``tiered.storage.dedup``): every OCDBT key is
uploaded by exactly one of the nodes that hold it, node 0's merge checks that every key is
there, and a replaced node rebuilds its own database from the merged root.

The ownership rule is a pure function (``tiered.policy.ownership``), tested by table. The
protocol runs here with one ``DurableTier`` per node (its own rank and local directory, each
uploading from its own thread, as each node's daemon does) against a plain directory and the
GCS emulator, over real OCDBT databases written by tensorstore. The runs with real JAX
processes and daemons are in ``test_multiprocess.py`` and ``python -m bench bytes``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tiered import DurableTier, LocalTier
from tiered.errors import CommitError
from tiered.layout import COMMIT_MARKER
from tiered.manifest import build_manifest
from tiered.policy.ownership import KeyFacts, assign
from tiered.storage import dedup

ts = pytest.importorskip("tensorstore")


def facts(**keys: int) -> dict[str, dict[str, KeyFacts]]:
    return {"state": {k.replace("_", "/"): KeyFacts(size, f"d{size}") for k, size in keys.items()}}


@pytest.mark.parametrize(
    ("indexes", "owned"),
    [
        # keys only one node holds stay with it
        ({0: facts(a=5), 1: facts(b=7)}, {0: ["a"], 1: ["b"]}),
        # replicated keys, largest first, to the least loaded holder (ties: lowest rank)
        ({0: facts(r1=8, r2=4, r3=4), 1: facts(r1=8, r2=4, r3=4)}, {0: ["r1"], 1: ["r2", "r3"]}),
        # each node's own shard counts before the replicated keys are shared out
        (
            {0: facts(s0=10, r1=6, r2=6), 1: facts(s1=2, r1=6, r2=6)},
            {0: ["s0"], 1: ["r1", "r2", "s1"]},
        ),
        # a key held by a subset goes to the least loaded node of that subset
        (
            {0: facts(a=9, x=3), 1: facts(x=3, y=3), 2: facts(y=3)},
            {0: ["a"], 1: ["x"], 2: ["y"]},
        ),
        # a node holding nothing of a root owns nothing of it
        ({0: facts(a=1), 1: {}}, {0: ["a"], 1: []}),
    ],
)
def test_ownership(indexes: dict, owned: dict) -> None:
    got = assign(indexes)
    assert {r: got.owned[r].get("state", []) for r in indexes} == owned
    # every key of every index has exactly one owner, and that owner holds it
    owners = [(k, r) for r, roots in got.owned.items() for k in roots.get("state", [])]
    held = {k for index in indexes.values() for k in index.get("state", {})}
    assert sorted(k for k, _ in owners) == sorted(held)
    assert all(k in indexes[r]["state"] for k, r in owners)
    # the same answer whatever order the indexes come in
    again = assign({r: indexes[r] for r in reversed(list(indexes))})
    assert again.owned == got.owned


def test_ownership_is_even_for_a_data_parallel_job() -> None:
    """1,024 nodes holding the same 4,096 chunks of 1 to 4 MB: each node uploads within one
    chunk of the mean, and every chunk once."""
    chunks = {f"p/c/{i}": KeyFacts((1 + i % 4) << 20, f"d{i}") for i in range(4096)}
    indexes = {r: {"state": chunks} for r in range(1024)}
    got = assign(indexes)
    loads = [got.bytes_of(r, indexes) for r in range(1024)]
    mean = sum(loads) / len(loads)
    assert sum(loads) == sum(f.size for f in chunks.values())
    assert max(loads) - mean <= 4 << 20 and max(loads) / mean < 1.5


def test_a_divergent_replica_goes_to_the_lowest_rank() -> None:
    indexes = {
        0: {"state": {"k": KeyFacts(4, "aa")}},
        1: {"state": {"k": KeyFacts(4, "bb")}},
    }
    got = assign(indexes)
    assert got.owned[0]["state"] == ["k"] and got.owned[1] == {}
    assert got.divergent == [("state", "k", [0, 1])]


# --- the protocol, over real storage -------------------------------------------------------

REPLICATED = {"b/c/0": b"bias" * 64, "b/zarr.json": b'{"shape": [256]}'} | {
    f"big/c/{i}": os.urandom(1) * (20_000 + i) for i in range(6)
}


def local_step(root: Path, rank: int, step: int, *, replicated: dict[str, bytes]) -> Path:
    """A committed local step as orbax writes it for one process: its OCDBT database
    (``state/ocdbt.process_<r>``: its own shard and every replicated key) and the root over it,
    metadata, a stray file of its own in the database folder, and the commit marker."""
    d = root / f"node{rank}" / str(step)
    child = d / "state" / f"ocdbt.process_{rank}"
    child.mkdir(parents=True)
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{child}/"}).result()
    txn = ts.Transaction()
    for key, value in {f"w/c/{rank}": f"rows of node {rank}".encode() * 500, **replicated}.items():
        kv.with_transaction(txn)[key] = value
    txn.commit_async().result()
    from tiered.storage.merge import merge_into

    merge_into({"driver": "file", "path": f"{d}/state/"}, [child.name], ts.Context())
    (child / "notes.txt").write_text(f"node {rank}")
    (d / "state" / "_METADATA").write_text('{"tree": "same on every node"}')
    (d / COMMIT_MARKER).write_text("committed")
    return d


def keys_of(path: Path | str, options: dict | None = None) -> dict[str, bytes]:
    """Every key and value of an OCDBT database (a local folder or a durable URL)."""
    from tiered.storage.merge import kvstore_spec

    base = kvstore_spec(str(path), options) if "://" in str(path) else f"file://{path}/"
    kv = ts.KvStore.open({"driver": "ocdbt", "base": base}).result()
    return {k.decode(): bytes(kv.read(k).result().value) for k in kv.list().result()}


def nodes_of(url: tuple[str, dict], n: int, **kw: Any) -> list[DurableTier]:
    return [
        DurableTier(url[0], storage_options=url[1], node_rank=r, num_nodes=n, dedup=True, **kw)
        for r in range(n)
    ]


def upload_all(nodes: list[DurableTier], dirs: list[Path], step: int) -> list[Any]:
    """Every node uploads its part at once, from its own thread, as the daemons do."""
    results: list[Any] = [None] * len(nodes)

    def run(r: int) -> None:
        try:
            results[r] = nodes[r].upload_step(dirs[r], step=step)
        except BaseException as err:
            results[r] = err

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_each_key_is_uploaded_once_and_every_node_restores_its_own(
    url: tuple[str, dict], tmp_path: Path
) -> None:
    n = 3
    nodes = nodes_of(url, n)
    dirs = [local_step(tmp_path, r, 50, replicated=REPLICATED) for r in range(n)]
    results = upload_all(nodes, dirs, 50)
    assert nodes[0].commit_parts(50, epoch=0, marker=b"ok") == []
    manifest = nodes[0].verify_step(50)
    assert manifest.merged

    # Every part holds only the keys its node owns: each key in exactly one node's database,
    # and the merged root holds them all with the values the nodes saved.
    store = url[0]
    uploaded = {r: keys_of(f"{store}/50/state/ocdbt.process_{r}", url[1]) for r in range(n)}
    owners: dict[str, list[int]] = {}
    for r, keys in uploaded.items():
        assert nodes[0].read_part(50, r).deduped
        for key in keys:
            owners.setdefault(key, []).append(r)
    every = {k: v for d in dirs for k, v in keys_of(d / "state").items()}
    assert sorted(owners) == sorted(every) and all(len(o) == 1 for o in owners.values()), owners
    assert keys_of(f"{store}/50/state", url[1]) == every
    # the replicated bytes were uploaded once: the parts' OCDBT data add up to about one copy
    unique = sum(len(v) for v in every.values())
    data = sum(
        e.size for rel, e in manifest.files.items() if "/ocdbt.process_" in rel and "/d/" in rel
    )
    assert data < 1.05 * unique + 3 * 4096, (data, unique)
    assert max(r.bytes_total for r in results) < 1.5 * sum(r.bytes_total for r in results) / n
    # what is not OCDBT data in a database folder is uploaded as it is
    assert all(f"state/ocdbt.process_{r}/notes.txt" in manifest.files for r in range(n))

    # A replaced node (nothing local) gets back every key it held, byte for byte, rebuilt from
    # the merged root; the rest of its files as they were; and its step counts as a copy.
    for r, node in enumerate(nodes):
        local = LocalTier(tmp_path / f"replaced{r}")
        dest = local.step_dir(50)
        result = node.download_step(50, dest)
        assert keys_of(dest / "state" / f"ocdbt.process_{r}") == keys_of(dirs[r] / "state")
        assert keys_of(dest / "state") == keys_of(dirs[r] / "state")
        assert (dest / "state" / f"ocdbt.process_{r}" / "notes.txt").read_text() == f"node {r}"
        assert (dest / "state" / "_METADATA").read_bytes() == (
            dirs[r] / "state" / "_METADATA"
        ).read_bytes()
        assert (dest / COMMIT_MARKER).exists()
        original = build_manifest(dirs[r], step=50)
        assert result.manifest.copy_identity == original.identity
        assert result.manifest.files == build_manifest(dest, step=50).files  # what is on disk
        [fact] = [f for f in node.scan() if f.step == 50]
        assert fact.identity == original.identity  # the durable step is a copy of the local one


def test_a_value_that_changed_on_the_store_fails_the_rebuild(tmp_path: Path) -> None:
    """The rebuild checks every value against the node's index: a key whose bytes on the store
    differ from what the node saved (here, node 0's index is made to say other bytes) is
    refused, naming the key, and nothing is left at the destination."""
    url = (f"file://{tmp_path}/durable", {})
    nodes = nodes_of(url, 2)
    dirs = [local_step(tmp_path, r, 50, replicated=REPLICATED) for r in range(2)]
    upload_all(nodes, dirs, 50)
    assert nodes[0].commit_parts(50, epoch=0, marker=b"ok") == []
    index_path = tmp_path / "durable" / "50" / "tiered-parts" / "index-1.json"
    index = json.loads(index_path.read_text())
    index["roots"]["state"]["b/c/0"][1] = "0" * 32
    index_path.write_text(json.dumps(index))
    dest = tmp_path / "replaced" / "50"
    with pytest.raises(Exception, match="b/c/0"):
        nodes[1].download_step(50, dest)
    assert not dest.exists()


def test_a_late_node_uploads_all_it_holds_and_the_step_still_commits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Node 2's daemon is busy (or down) when the others index the step: node 0 waits
    ``dedup_wait_seconds`` for it, then plans without it; nodes 0 and 1 share the keys they
    hold, node 2 (when it comes) reads that it is left out and uploads everything it holds.
    Every key is in the merged root, once per holder at worst."""
    caplog.set_level(logging.INFO, logger="tiered")
    url = (f"file://{tmp_path}/durable", {})
    nodes = nodes_of(url, 3, dedup_wait=1.0)
    dirs = [local_step(tmp_path, r, 50, replicated=REPLICATED) for r in range(3)]
    upload_all(nodes[:2], dirs[:2], 50)
    assert nodes[0].commit_parts(50, epoch=0, marker=b"ok") == [2]
    nodes[2].upload_step(dirs[2], step=50)
    assert nodes[0].commit_parts(50, epoch=0, marker=b"ok") == []
    assert [nodes[0].read_part(50, r).deduped for r in range(3)] == [True, True, False]
    assert "node(s) [2] upload all they hold" in caplog.text
    every = {k: v for d in dirs for k, v in keys_of(d / "state").items()}
    assert keys_of(f"{url[0]}/50/state") == every
    for r in range(3):
        dest = tmp_path / f"replaced{r}" / "50"
        nodes[r].download_step(50, dest)
        assert keys_of(dest / "state") == keys_of(dirs[r] / "state")


def test_without_a_plan_a_node_uploads_all_it_holds(tmp_path: Path) -> None:
    """A node whose node 0 never plans (down, or of an older version) waits its bound, then
    uploads its whole database: the step is as before the dedup."""
    url = (f"file://{tmp_path}/durable", {})
    nodes = nodes_of(url, 2, dedup_wait=0.5)
    dedup_grace = dedup.PLAN_GRACE_SECONDS
    dedup.PLAN_GRACE_SECONDS = 0.5
    try:
        dirs = [local_step(tmp_path, r, 50, replicated=REPLICATED) for r in range(2)]
        nodes[1].upload_step(dirs[1], step=50)
    finally:
        dedup.PLAN_GRACE_SECONDS = dedup_grace
    part = nodes[0].read_part(50, 1)
    assert not part.deduped and set(part.files) == set(build_manifest(dirs[1], step=50).files)


def test_the_merge_refuses_a_step_missing_a_key(tmp_path: Path) -> None:
    """A node that wrote a part marker without a key its index holds (a bug, or a writer that
    lies): node 0's merge finds the key missing and does not commit the step."""
    url = (f"file://{tmp_path}/durable", {})
    nodes = nodes_of(url, 2)
    dirs = [local_step(tmp_path, r, 50, replicated=REPLICATED) for r in range(2)]
    upload_all(nodes, dirs, 50)
    index_path = tmp_path / "durable" / "50" / "tiered-parts" / "index-1.json"
    index = json.loads(index_path.read_text())
    index["roots"]["state"]["w/c/lost"] = [3, "0" * 32]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CommitError, match="lacks 1 key"):
        nodes[0].commit_parts(50, epoch=0, marker=b"ok")
    assert nodes[0].committed_steps() == []


def test_on_a_store_the_merge_cannot_reach_every_node_uploads_all_it_holds(
    tmp_path: Path,
) -> None:
    """A deduplicated step restores only through its merged root, and tensorstore reaches only
    ``file://``, ``gs://`` and ``s3://``: on any other fsspec store node 0 plans no dedup, every
    node uploads all it holds, and the step commits unmerged, as before."""
    url = (f"memory://dedup-{os.getpid()}/run", {})
    nodes = nodes_of(url, 2)
    dirs = [local_step(tmp_path, r, 50, replicated=REPLICATED) for r in range(2)]
    upload_all(nodes, dirs, 50)
    assert nodes[0].commit_parts(50, epoch=0, marker=b"ok") == []
    assert [nodes[0].read_part(50, r).deduped for r in range(2)] == [False, False]
    plan = json.loads(nodes[0].store.read_text("50/tiered-parts/plan-1.json"))
    assert "cannot merge on this store" in plan["fallback"]
    for r in range(2):
        dest = tmp_path / f"replaced{r}" / "50"
        nodes[r].download_step(50, dest)
        assert keys_of(dest / "state") == keys_of(dirs[r] / "state")


def test_a_node_that_stays_down_holds_node_0_back_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node 1 is down: node 0 waits ``dedup_wait_seconds`` for its index of step 50, then plans
    without it. At step 60 node 1 is still down, and node 0 waits only the short bound, not the
    whole wait again, so its steps do not queue behind a dead node."""
    monkeypatch.setattr(dedup, "LATE_WAIT_SECONDS", 0.2)
    waited: list[float] = []
    real_wait = dedup._wait_plan

    def timed_wait(*args: Any, **kwargs: Any) -> Any:
        began = time.monotonic()
        try:
            return real_wait(*args, **kwargs)
        finally:
            waited.append(time.monotonic() - began)

    monkeypatch.setattr(dedup, "_wait_plan", timed_wait)
    url = (f"file://{tmp_path}/durable", {})
    [node0, _] = nodes_of(url, 2, dedup_wait=4.0)
    for step in (50, 60):
        d = local_step(tmp_path / str(step), 0, step, replicated=REPLICATED)
        node0.upload_step(d, step=step)
        assert node0.read_part(step, 0).deduped  # node 0's keys, all its own
    # the wait for the plan alone (the key listing and copy around it vary with the machine)
    assert waited[0] >= 4.0 and waited[1] < 2.0, waited
    assert node0.late_ranks == {1}


def test_a_node_with_dedup_off_does_not_stop_the_commit(tmp_path: Path) -> None:
    """Node 1 has `tiered.dedup: false` (or an older daemon): it writes no index and uploads
    all it holds; node 0 plans without it after its wait, and the step commits."""
    url = (f"file://{tmp_path}/durable", {})
    nodes = nodes_of(url, 2, dedup_wait=0.5)
    nodes[1].dedup = False
    dirs = [local_step(tmp_path, r, 50, replicated=REPLICATED) for r in range(2)]
    upload_all(nodes, dirs, 50)
    assert nodes[0].commit_parts(50, epoch=0, marker=b"ok") == []
    assert [nodes[0].read_part(50, r).deduped for r in range(2)] == [True, False]
    every = {k: v for d in dirs for k, v in keys_of(d / "state").items()}
    assert keys_of(f"{url[0]}/50/state") == every


def test_divergent_replicas_make_every_node_upload_its_own(tmp_path: Path) -> None:
    """Two nodes hold different bytes under one replicated key: each must keep its own value
    to restore its part, so node 0 plans no dedup for the step and each restores its own."""
    url = (f"file://{tmp_path}/durable", {})
    nodes = nodes_of(url, 2)
    dirs = [
        local_step(tmp_path, r, 50, replicated={**REPLICATED, "b/c/0": f"v{r}".encode()})
        for r in range(2)
    ]
    upload_all(nodes, dirs, 50)
    assert nodes[0].commit_parts(50, epoch=0, marker=b"ok") == []
    assert [nodes[0].read_part(50, r).deduped for r in range(2)] == [False, False]
    for r in range(2):
        dest = tmp_path / f"replaced{r}" / "50"
        nodes[r].download_step(50, dest)
        assert keys_of(dest / "state") == keys_of(dirs[r] / "state")


def test_a_malformed_index_is_left_out_not_fatal(tmp_path: Path) -> None:
    """An index that does not parse (a store that truncates, another version) leaves its node
    out of the plan, as if it had none, instead of crashing node 0's planning."""
    url = (f"file://{tmp_path}/durable", {})
    nodes = nodes_of(url, 2, dedup_wait=0.5)
    dirs = [local_step(tmp_path, r, 50, replicated=REPLICATED) for r in range(2)]
    bad = {"version": 1, "step": 50, "node": 1, "epoch": 0, "roots": {"state": {"k": ["x"]}}}
    nodes[1].store.write_small(
        nodes[1].object_path(50, dedup.index_name(1)), json.dumps(bad).encode()
    )
    plan = dedup.make_plans(nodes[0], 50, 0, final=True)
    assert plan is None or "fallback" in plan or "roots" in plan
    again = json.loads(nodes[0].store.read_text("50/tiered-parts/plan-1.json") or "{}")
    assert "fallback" in again
    assert dedup.make_plans(nodes[0], 50, 0, final=True) == plan  # made once per epoch
    del dirs


def test_a_daemon_that_died_building_an_upload_leaves_nothing_behind(tmp_path: Path) -> None:
    """A daemon killed while it built the database of the keys it owns left a copy of them in
    ``.tiered/dedup`` (no checkpoint): the next daemon on that disk removes it when it starts,
    instead of holding the space until that step is prepared again."""
    from daemon.service import Daemon
    from tiered.layout import DEDUP_DIR

    from conftest import write_config

    _, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    left = Path(cfg.local_dir) / ".tiered" / DEDUP_DIR / "50-4242-abcd1234" / "state"
    left.mkdir(parents=True)
    (left / "d").write_bytes(b"k" * 4096)
    (Path(cfg.local_dir) / "40").mkdir()  # a step folder is never touched
    d = Daemon(cfg)
    d.start()
    try:
        assert not (Path(cfg.local_dir) / ".tiered" / DEDUP_DIR).exists()
        assert (Path(cfg.local_dir) / "40").is_dir()
    finally:
        d.close()

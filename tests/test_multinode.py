"""Several nodes, one durable tier: part markers, the single committer, restore agreement.

Each "node" here is its own ``DurableTier`` (its own rank) and its own local directory, against
real storage: a plain directory, the GCS emulator, and moto's S3 server. The end-to-end runs
with real JAX processes and one daemon per node are in ``test_multiprocess.py``.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from tiered import CommitError, DurableTier, LocalTier
from tiered.coord import Rendezvous
from tiered.layout import COMMIT_MARKER
from tiered.policy import agree_step
from tiered.tiers import export_step

from conftest import make_bucket, s3_bucket, s3_storage_options


@pytest.fixture(params=["file", "gs", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict]:
    """(durable URL, storage options) on each real backend."""
    if request.param == "file":
        return f"file://{tmp_path}/durable", {}
    if request.param == "gs":
        request.getfixturevalue("gcs_emulator")
        return f"gs://{make_bucket()}/run", {"token": "anon"}
    endpoint = request.getfixturevalue("moto_server")
    return f"s3://{s3_bucket(endpoint)}/run", s3_storage_options(endpoint)


def tiers(backend: tuple[str, dict], nodes: int) -> list[DurableTier]:
    url, options = backend
    return [
        DurableTier(url, storage_options=options, node_rank=r, num_nodes=nodes)
        for r in range(nodes)
    ]


def local_step(root: Path, rank: int, step: int, *, salt: str = "") -> Path:
    """A committed local step of one node: its own shard file plus shared-name metadata."""
    import tensorstore as ts

    d = root / f"node{rank}" / str(step)
    (d / "state" / f"ocdbt.process_{rank}").mkdir(parents=True)
    (d / "state" / f"ocdbt.process_{rank}" / "shard").write_bytes(
        os.urandom(1000 + rank) + salt.encode()
    )
    # a real OCDBT database of this process's: what node 0 merges at commit
    db = {"driver": "file", "path": f"{d}/state/ocdbt.process_{rank}/"}
    kv = ts.KvStore.open({"driver": "ocdbt", "base": db}).result()
    kv.write(f"w/c/{rank}", f"rows of node {rank}{salt}".encode()).result()
    (d / "state" / "_METADATA").write_text(f'{{"node": {rank}, "salt": "{salt}"}}')
    (d / COMMIT_MARKER).write_text("committed")
    return d


def files_of(d: Path) -> dict[str, bytes]:
    return {
        p.relative_to(d).as_posix(): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != COMMIT_MARKER
    }


def test_step_commits_only_when_every_part_is_verified(
    backend: tuple[str, dict], tmp_path: Path
) -> None:
    nodes = tiers(backend, 3)
    dirs = [local_step(tmp_path, r, 50) for r in range(3)]

    nodes[1].upload_step(dirs[1], step=50)
    assert nodes[0].commit_parts(50, epoch=0, marker=b"ok") == [0, 2]
    nodes[0].upload_step(dirs[0], step=50)
    assert nodes[0].commit_parts(50, epoch=0, marker=b"ok") == [2]
    scan = nodes[0].scan()
    assert [(f.step, f.committed) for f in scan] == [(50, False)], "a partial step is no checkpoint"

    nodes[2].upload_step(dirs[2], step=50)
    assert nodes[0].commit_parts(50, epoch=0, marker=b"ok") == []
    for node in nodes:
        assert node.committed_steps() == [50]
    manifest = nodes[0].verify_step(50)
    assert manifest.nodes == 3 and manifest.merged
    # One orbax checkpoint: each process's shards where a global save has them, node 0's
    # metadata as the step's own, and each node's own copy of it beside them.
    assert {p for p in manifest.files if not p.startswith("tiered-parts/")} == {
        "state/_METADATA",
        "state/manifest.ocdbt",
        *(p for p in manifest.files if p.startswith("state/d/")),
        *(p for p in manifest.files if p.startswith("state/ocdbt.process_")),
    }
    assert {f"state/ocdbt.process_{r}/shard" for r in range(3)} <= set(manifest.files)
    assert {p for p in manifest.files if p.startswith("tiered-parts/")} == {
        f"tiered-parts/node-{r}/state/_METADATA" for r in range(3)
    }

    # Each node downloads exactly its own files, byte for byte, and nothing of the others'.
    for rank, node in enumerate(nodes):
        dest = tmp_path / f"restored{rank}"
        node.download_step(50, dest)
        assert files_of(dest) == files_of(dirs[rank])
        assert (dest / COMMIT_MARKER).exists()


def test_a_part_from_before_a_restart_is_never_committed(
    backend: tuple[str, dict], tmp_path: Path
) -> None:
    nodes = tiers(backend, 2)
    old = local_step(tmp_path / "old", 1, 100, salt="old")
    nodes[1].upload_step(old, step=100, epoch=0)
    # The run restarts (epoch 1) and saves step 100 again, with other bytes.
    new = [local_step(tmp_path / "new", r, 100, salt="new") for r in range(2)]
    nodes[0].upload_step(new[0], step=100, epoch=1)
    assert nodes[0].commit_parts(100, epoch=1, marker=b"ok") == [1]
    assert nodes[0].committed_steps() == []

    nodes[1].upload_step(new[1], step=100, epoch=1)
    assert nodes[0].commit_parts(100, epoch=1, marker=b"ok") == []
    dest = tmp_path / "restored"
    nodes[1].download_step(100, dest)
    assert files_of(dest) == files_of(new[1])


def test_commit_marker_is_created_only_once(backend: tuple[str, dict], tmp_path: Path) -> None:
    """The second guard: a create-only write (GCS ``ifGenerationMatch=0``, S3
    ``If-None-Match: *``, an exclusive link on file://). The GCS emulator honours the
    precondition through tests/gcs_emulator.py, as a real bucket does."""
    (node,) = tiers(backend, 1)
    path = f"{node.root}/guard/marker"
    assert node.store.create_exclusive(path, b"first")
    assert node.store.create_exclusive(path, b"second") is False
    assert node.fs.cat_file(path) == b"first"


def test_shape_mismatches_are_refused_by_name(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/durable"
    two = [DurableTier(url, node_rank=r, num_nodes=2) for r in range(2)]
    for r in range(2):
        two[r].upload_step(local_step(tmp_path, r, 10), step=10)
    three = DurableTier(url, node_rank=0, num_nodes=3)
    with pytest.raises(CommitError, match="job of 2 nodes, but this job has 3"):
        three.commit_parts(10, epoch=0, marker=b"ok")
    assert two[0].commit_parts(10, epoch=0, marker=b"ok") == []
    # A job of another shape restores the merged step whole (one orbax checkpoint), and only
    # its global files: not the nodes' own copies.
    whole = {"state/_METADATA", "state/manifest.ocdbt"} | {
        f"state/ocdbt.process_{r}/shard" for r in range(2)
    }
    for job in (DurableTier(url), DurableTier(url, node_rank=1, num_nodes=3)):
        assert job.committed_steps() == [10]
        dest = tmp_path / f"job-of-{job.topology.nodes}"
        job.download_step(10, dest)
        got = set(files_of(dest))
        assert whole <= got and not any(p.startswith("tiered-parts/") for p in got)


def test_a_merge_that_fails_still_commits_the_step(tmp_path: Path) -> None:
    """A database the merge cannot read (here node 1's manifest.ocdbt is not one): the step is
    committed without a merged root, and with nothing of a half-written one."""
    url = f"file://{tmp_path}/durable"
    two = [DurableTier(url, node_rank=r, num_nodes=2) for r in range(2)]
    dirs = [local_step(tmp_path, r, 10) for r in range(2)]
    (dirs[1] / "state" / "ocdbt.process_1" / "manifest.ocdbt").write_bytes(b"not a database")
    for r in range(2):
        two[r].upload_step(dirs[r], step=10)
    assert two[0].commit_parts(10, epoch=0, marker=b"ok") == []
    manifest = two[0].verify_step(10)
    assert not manifest.merged and "state/manifest.ocdbt" not in manifest.files
    assert not (tmp_path / "durable" / "10" / "state" / "manifest.ocdbt").exists()
    two[1].download_step(10, tmp_path / "same-shape")
    assert files_of(tmp_path / "same-shape") == files_of(dirs[1])


def test_an_unmerged_step_restores_only_on_its_own_topology(tmp_path: Path) -> None:
    """Without tensorstore beside node 0's daemon the step commits unmerged: it restores on a
    job of its own shape, and a job of another shape is told why not."""
    url = f"file://{tmp_path}/durable"
    two = [DurableTier(url, node_rank=r, num_nodes=2) for r in range(2)]
    dirs = [local_step(tmp_path, r, 10) for r in range(2)]
    for r in range(2):
        two[r].upload_step(dirs[r], step=10)
    blocker = tmp_path / "no-tensorstore"
    blocker.mkdir()
    (blocker / "tensorstore.py").write_text("raise ImportError('not here')\n")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = f"{blocker}{os.pathsep}{old}" if old else str(blocker)
    try:
        assert two[0].commit_parts(10, epoch=0, marker=b"ok") == []
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    assert not two[0].read_manifest(10).merged
    two[1].download_step(10, tmp_path / "same-shape")
    assert files_of(tmp_path / "same-shape") == files_of(dirs[1])
    single = DurableTier(url)
    assert [f.step for f in single.scan() if f.own] == []
    with pytest.raises(CommitError, match=r"no merged OCDBT root.*tiered export"):
        single.download_step(10, tmp_path / "x")
    # `tiered export` writes the whole step and merges the copy: one database, every node's keys
    import tensorstore as ts

    dest = tmp_path / "exported"
    export_step(LocalTier(tmp_path / "node0"), two[0], 10, dest)
    assert not any(p.startswith("tiered-parts") for p in files_of(dest))
    base = {"driver": "file", "path": f"{dest}/state/"}
    merged = ts.KvStore.open({"driver": "ocdbt", "base": base}).result()
    assert merged.list().result() == [b"w/c/0", b"w/c/1"]
    assert merged.read(b"w/c/1").result().value == b"rows of node 1"
    item = tmp_path / "exported-item"  # --item state: the item's folder, merged, on its own
    export_step(LocalTier(tmp_path / "node0"), two[0], 10, item, item="state")
    base = {"driver": "file", "path": f"{item}/"}
    merged = ts.KvStore.open({"driver": "ocdbt", "base": base}).result()
    assert merged.list().result() == [b"w/c/0", b"w/c/1"]


def test_agree_step_takes_the_newest_step_every_node_holds() -> None:
    assert agree_step({0: [10, 20, 30], 1: [10, 20], 2: [20, 30]}, []) == 20
    # The durable tier is newer than anything all nodes share (node 1 was replaced).
    assert agree_step({0: [10, 20, 30], 1: [], 2: [20, 30]}, [10, 25]) == 25
    assert agree_step({0: [40], 1: [40]}, [30]) == 40
    assert agree_step({0: [], 1: [5]}, []) is None


def agree_all(nodes: list[DurableTier], local: dict[int, list[int]]) -> dict:
    out: dict = {}

    def run(rank: int) -> None:
        out[rank] = Rendezvous(nodes[rank], poll_seconds=0.05).agree(local[rank], timeout=30)

    threads = [threading.Thread(target=run, args=(r,)) for r in reversed(range(len(nodes)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_restore_agreement_rounds(backend: tuple[str, dict], tmp_path: Path) -> None:
    nodes = tiers(backend, 3)
    first = agree_all(nodes, {0: [10, 20, 30], 1: [10, 20], 2: [10, 20, 30]})
    assert {d.step for d in first.values()} == {20}
    assert {d.epoch for d in first.values()} == {1}
    assert first[0].holders == frozenset({0, 1, 2})

    # Step 30 becomes durable; node 1 is then replaced by an empty machine.
    for r in range(3):
        nodes[r].upload_step(local_step(tmp_path, r, 30), step=30, epoch=1)
    assert nodes[0].commit_parts(30, epoch=1, marker=b"ok") == []
    second = agree_all(nodes, {0: [20, 30], 1: [], 2: [20, 30]})
    assert {d.step for d in second.values()} == {30}
    assert {d.epoch for d in second.values()} == {2}
    assert second[1].holders == frozenset({0, 2}), "node 1 downloads; 0 and 2 use their copy"
    assert Rendezvous(nodes[2]).current_epoch() == 2


def test_a_node_that_never_asks_holds_the_agreement(tmp_path: Path) -> None:
    from tiered.errors import AgreementTimeout

    url = f"file://{tmp_path}/durable"
    node0 = DurableTier(url, node_rank=0, num_nodes=2)
    with pytest.raises(AgreementTimeout, match=r"nodes \[1\] have not asked to restore"):
        Rendezvous(node0, poll_seconds=0.05).agree([10], timeout=0.5)


def test_a_waiting_agreement_says_which_nodes_have_not_asked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The agreement can wait 600 s: every few seconds node 0 names the nodes still missing
    (in ranges: at a thousand nodes the list must stay a line), and the others say they wait."""
    import logging

    from tiered.errors import AgreementTimeout

    url = f"file://{tmp_path}/durable"
    Rendezvous(DurableTier(url, node_rank=1, num_nodes=6)).post([10])
    node0 = Rendezvous(DurableTier(url, node_rank=0, num_nodes=6), poll_seconds=0.02)
    node0.say_every = 0.1
    caplog.set_level(logging.INFO, logger="tiered.coord")
    with pytest.raises(AgreementTimeout):
        node0.agree([10], timeout=0.5)
    said = [r.getMessage() for r in caplog.records if "Restore agreement:" in r.getMessage()]
    assert said and all("nodes 2-5 have not asked yet (6 nodes)" in m for m in said), said
    node3 = Rendezvous(DurableTier(url, node_rank=3, num_nodes=6), poll_seconds=0.02)
    node3.say_every = 0.1
    caplog.clear()
    with pytest.raises(AgreementTimeout):
        node3.agree([10], timeout=0.3)
    assert any("waiting for node 0's answer" in r.getMessage() for r in caplog.records)


def test_status_shows_what_node_0_waits_for(tmp_path: Path) -> None:
    from tiered import config_from_mapping
    from tiered.policy import Snapshot
    from tiered.report import build_status, render_table
    from tiered.types import DurableStep, LocalStep

    cfg = config_from_mapping(
        {
            "checkpoint_dir": f"file://{tmp_path}/d",
            "local_checkpoint_directory": str(tmp_path / "l"),
            "local_checkpoint_period": 10,
            "checkpoint_period": 50,
            "tiered": {"num_nodes": 4},
        },
        env={},
    )
    live = {
        "running": True,
        "health": "ok",
        "node": {
            "rank": 0,
            "nodes": 4,
            "epoch": 3,
            "committing": {"100": {"missing": [2, 3]}},
            "abandoned": [50],
        },
    }
    snapshot = Snapshot(
        now=0.0,
        local=tuple(LocalStep(step=s, committed=True, identity=f"id{s}") for s in (50, 100)),
        durable=tuple(DurableStep(step=s, committed=False) for s in (50, 100)),
        parts={100: 3},
        epoch=3,
        abandoned=frozenset({50}),
    )
    status = build_status(cfg, snapshot=snapshot, live=live)
    assert {s.step: s.state for s in status.steps} == {50: "abandoned", 100: "committing"}
    text = render_table(status)
    assert "node     0 of 4  (restore epoch 3)  step 100 waits for nodes 2, 3" in text


def test_trainer_refuses_a_node_count_jax_does_not_have(tmp_path: Path) -> None:
    import tiered
    from tiered import ConfigError, config_from_mapping

    mapping = {
        "checkpoint_dir": f"file://{tmp_path}/d",
        "local_checkpoint_directory": str(tmp_path / "l"),
        "tiered": {"num_nodes": 2, "node_rank": 1},
    }
    with pytest.raises(ConfigError, match=r"JAX runs 1 processes .* tiered.num_nodes: 2"):
        tiered.CheckpointManager(
            config_from_mapping(mapping, env={}), install_signal_handlers=False
        )
    # The refused manager let go of the directory.
    del mapping["tiered"]
    with tiered.CheckpointManager(
        config_from_mapping(mapping, env={}), install_signal_handlers=False
    ):
        pass


def test_a_root_left_by_a_killed_committer_is_merged_again(tmp_path: Path) -> None:
    """Node 0 killed mid-merge leaves a half-written root (and no marker); the next commit
    removes it and merges afresh."""
    import tensorstore as ts

    url = f"file://{tmp_path}/durable"
    two = [DurableTier(url, node_rank=r, num_nodes=2) for r in range(2)]
    for r in range(2):
        two[r].upload_step(local_step(tmp_path, r, 10), step=10)
    step_dir = tmp_path / "durable" / "10"
    (step_dir / "state" / "d").mkdir(parents=True)
    (step_dir / "state" / "d" / "half-written").write_bytes(b"junk")
    (step_dir / "state" / "manifest.ocdbt").write_bytes(b"junk")
    assert two[0].commit_parts(10, epoch=0, marker=b"ok") == []
    manifest = two[0].verify_step(10)
    assert manifest.merged and "state/d/half-written" not in manifest.files
    assert not (step_dir / "state" / "d" / "half-written").exists()
    base = {"driver": "file", "path": f"{step_dir}/state/"}
    merged = ts.KvStore.open({"driver": "ocdbt", "base": base}).result()
    assert merged.list().result() == [b"w/c/0", b"w/c/1"]


def test_a_step_holding_tiereds_own_names_is_refused(tmp_path: Path) -> None:
    """A local file named tiered-parts/0.json would be copied over node 0's part marker when
    node 0 commits: the upload refuses it, and node 0 refuses a part that lists one."""
    from tiered import LayoutError
    from tiered.storage import parts

    url = f"file://{tmp_path}/durable"
    two = [DurableTier(url, node_rank=r, num_nodes=2) for r in range(2)]
    dirs = [local_step(tmp_path, r, 10) for r in range(2)]
    (dirs[0] / "tiered-parts").mkdir()
    (dirs[0] / "tiered-parts" / "1.json").write_text('{"forged": true}')
    with pytest.raises(LayoutError, match=r"tiered-parts/1\.json, a name tiered keeps"):
        two[0].upload_step(dirs[0], step=10)
    assert two[0].part_ranks(10) == []
    # A node that did not check (an older or broken daemon) wrote such a part anyway.
    two[1].upload_step(dirs[1], step=10)
    forged = replace(two[0].read_part(10, 1), node=0)
    forged.files["tiered-parts/1.json"] = next(iter(forged.files.values()))
    parts.write(two[0], 10, forged, epoch=0)
    with pytest.raises(LayoutError, match="a name tiered keeps"):
        two[0].commit_parts(10, epoch=0, marker=b"ok")
    assert not (tmp_path / "durable" / "10" / COMMIT_MARKER).exists()
    assert json.loads(two[1].read_part(10, 1).to_json())["node"] == 1  # untouched

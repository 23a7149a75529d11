"""A restore that reads only what it needs (``tiered.storage.partial``): the key index node 0
writes at the commit of a merged step, the choice of keys from zarr metadata and the boxes a
process holds, and the copy of those keys, each checked against the index.

The choice is a pure function, tested by table (with metadata as orbax writes it, zarr v2 and
v3). The copy runs over real OCDBT databases written by tensorstore, uploaded by one
``DurableTier`` per node (``test_dedup``'s protocol) to a plain directory and the GCS emulator.
The runs with real JAX processes are in ``test_multiprocess.py`` (a job of another size, another
mesh) and ``python -m bench bytes`` (the bytes against plain orbax).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tiered import DurableTier
from tiered.errors import ChecksumMismatch, CommitError
from tiered.layout import COMMIT_MARKER
from tiered.manifest import crc32c_b64
from tiered.storage import keyindex, partial
from tiered.storage.partial import ArrayNeed, grid_of, select

ts = pytest.importorskip("tensorstore")

ZARR2 = json.dumps(
    {"chunks": [16, 8], "dimension_separator": ".", "shape": [64, 8], "zarr_format": 2}
).encode()
ZARR3 = json.dumps(
    {
        "zarr_format": 3,
        "shape": [64, 8],
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [16, 8]}},
        "chunk_key_encoding": {"name": "default"},
    }
).encode()
ROWS = [f"w/{i}.0" for i in range(4)]
METADATA = json.dumps({"tree": "same everywhere", "store_array_data_equal_to_fill_value": True})
"""An item's orbax metadata, saying that every chunk was stored (orbax then refuses a missing
one instead of reading it as the fill value)."""
ROWS3 = [f"w/c/{i}/0" for i in range(4)]


def rows(lo: int, hi: int) -> ArrayNeed:
    return ArrayNeed((64, 8), (((lo, hi), (0, 8)),))


@pytest.mark.parametrize(
    ("keys", "metas", "needs", "chosen"),
    [
        # zarr v2: the row chunks the box meets, and the metadata
        (["w/.zarray", *ROWS], {"w": ZARR2}, {"w": rows(16, 40)}, ["w/.zarray", "w/1.0", "w/2.0"]),
        # zarr v3's default key encoding (c/...), as orbax writes the local tier
        (["w/zarr.json", *ROWS3], {"w": ZARR3}, {"w": rows(0, 16)}, ["w/zarr.json", "w/c/0/0"]),
        # two boxes (two local devices)
        (
            ["w/.zarray", *ROWS],
            {"w": ZARR2},
            {"w": ArrayNeed((64, 8), (((0, 16), (0, 8)), ((48, 64), (0, 8))))},
            ["w/.zarray", "w/0.0", "w/3.0"],
        ),
        # an array the target does not name is read whole
        (
            ["b/.zarray", "b/0", *ROWS],
            {"w": ZARR2},
            {"w": rows(0, 16)},
            ["b/.zarray", "b/0", "w/0.0"],
        ),
        # a shape that differs from the target's: the whole array
        (["w/.zarray", *ROWS], {"w": ZARR2}, {"w": ArrayNeed((32, 8), ())}, ["w/.zarray", *ROWS]),
        # no metadata to read the grid from: the whole array
        (["w/.zarray", *ROWS], {}, {"w": rows(0, 16)}, ["w/.zarray", *ROWS]),
        # a key that does not parse as a chunk of the grid is kept
        (
            ["w/.zarray", "w/odd", *ROWS],
            {"w": ZARR2},
            {"w": rows(0, 1)},
            ["w/.zarray", "w/odd", "w/0.0"],
        ),
    ],
)
def test_the_keys_a_process_reads(keys: list, metas: dict, needs: dict, chosen: list) -> None:
    got = select(keys, metas, needs)
    assert sorted(got) == sorted(chosen)
    # never less than it needs: every chunk the boxes meet is there
    for name, need in needs.items():
        grid = grid_of(metas[name]) if name in metas else None
        if grid is None or grid.shape != need.shape:
            assert all(k in got for k in keys if k.startswith(f"{name}/"))


def test_a_grid_this_does_not_understand_reads_the_array_whole() -> None:
    other = json.dumps({"zarr_format": 3, "shape": [8], "chunk_grid": {"name": "irregular"}})
    assert grid_of(other.encode()) is None
    assert grid_of(b"not json") is None
    scalar = json.dumps({"chunks": [], "shape": [], "zarr_format": 2}).encode()
    assert select(["s/.zarray", "s/0"], {"s": scalar}, {"s": ArrayNeed((), ((),))}) == [
        "s/.zarray",
        "s/0",
    ]


# -- over real databases and stores --


def local_step(
    root: Path, rank: int, step: int, values: dict[str, bytes], metadata: str = METADATA
) -> Path:
    """A committed local step of one process: its OCDBT database of ``values`` (an array ``w``
    of 4 row chunks, as zarr v2 names them, and whatever else), the root over it, metadata."""
    from tiered.storage.merge import merge_into

    d = root / f"node{rank}" / str(step)
    child = d / "state" / f"ocdbt.process_{rank}"
    child.mkdir(parents=True)
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{child}/"}).result()
    txn = ts.Transaction()
    for key, value in values.items():
        kv.with_transaction(txn)[key] = value
    txn.commit_async().result()
    merge_into({"driver": "file", "path": f"{d}/state/"}, [child.name], ts.Context())
    (d / "state" / "_METADATA").write_text(metadata)
    (d / COMMIT_MARKER).write_text("committed")
    return d


def chunk(i: int) -> bytes:
    return f"rows {16 * i}:{16 * (i + 1)} ".encode() * 400


def committed_step(
    url: tuple[str, dict],
    tmp_path: Path,
    *,
    dedup: bool = True,
    differ: bool = False,
    metadata: str = METADATA,
) -> list[DurableTier]:
    """Step 50 of two nodes, each holding its two row chunks of ``w`` and the replicated
    metadata and vector ``b``, uploaded and committed."""
    from test_dedup import upload_all

    nodes = [
        DurableTier(url[0], storage_options=url[1], node_rank=r, num_nodes=2, dedup=dedup)
        for r in range(2)
    ]
    dirs = []
    for r in range(2):
        values = {"w/.zarray": ZARR2, "b/0": b"vector" * (50 + (r if differ else 0))}
        values.update({f"w/{i}.0": chunk(i) for i in (2 * r, 2 * r + 1)})
        dirs.append(local_step(tmp_path, r, 50, values, metadata))
    upload_all(nodes, dirs, 50)
    assert nodes[0].commit_parts(50, epoch=0, marker=b"ok") == []
    return nodes


def keys_in(folder: Path) -> dict[str, bytes]:
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{folder}/"}).result()
    return {k.decode(): bytes(kv.read(k).result().value) for k in kv.list().result()}


def test_a_process_of_another_job_reads_only_its_chunks(
    url: tuple[str, dict], tmp_path: Path
) -> None:
    nodes = committed_step(url, tmp_path)
    manifest = nodes[0].read_manifest(50)
    # the key index names every key of the merged root, with its value's size and digest
    assert manifest.key_index is not None and partial.readable(manifest)
    index = keyindex.KeyIndex(nodes[0], 50, manifest)
    index.in_ranges("state", [("", None)])
    assert sorted(index.read_keys("state")) == sorted(["w/.zarray", "b/0", *ROWS])
    # A process of a 4-node job holding rows 20:30 reads chunk 1 (16:32) only, with the
    # metadata and the vector it does not name; byte for byte what was saved.
    reader = DurableTier(url[0], storage_options=url[1], node_rank=1, num_nodes=4)
    dest = tmp_path / "staged" / "50"
    got = partial.stage(reader, 50, dest, {"state": {"w": rows(20, 30)}})
    assert keys_in(dest / "state") == {
        "w/.zarray": ZARR2,
        "b/0": b"vector" * 50,
        "w/1.0": chunk(1),
    }
    assert (dest / "state" / "_METADATA").read_text() == METADATA
    assert (dest / COMMIT_MARKER).exists()
    assert not list(dest.rglob("ocdbt.process_*"))  # no node's database came down whole
    assert (got.keys_read, got.keys_all) == (3, 6)
    assert got.bytes_read < got.bytes_all / 2


def test_an_item_that_reads_a_missing_chunk_as_zeros_is_read_whole(tmp_path: Path) -> None:
    """An item whose orbax metadata does not say that every chunk was stored (an older orbax)
    reads a chunk that is not there as the fill value: a choice that left one out would give
    zeros, not an error. Such an item is read whole."""
    url = (f"file://{tmp_path}/durable", {})
    committed_step(url, tmp_path, metadata='{"tree": "same everywhere"}')
    reader = DurableTier(url[0], node_rank=1, num_nodes=4)
    got = partial.stage(reader, 50, tmp_path / "staged" / "50", {"state": {"w": rows(20, 30)}})
    assert (got.keys_read, got.keys_all) == (6, 6)


def set_key_index(store: Path, entry: Any) -> None:
    """Make the step's manifest name ``entry`` as its key index's header."""
    manifest_path = store / "tiered-manifest.json"
    m = json.loads(manifest_path.read_text())
    m["key_index"] = {"size": entry.size, "crc32c": crc32c_b64(entry.crc32c), "xxh3": entry.xxh3}
    manifest_path.write_text(json.dumps(m))


def test_a_value_unlike_the_key_index_fails_the_read(tmp_path: Path) -> None:
    """Each piece is checked by the one above it: the header by the manifest, each block by
    the header, each value by its block. A header or a block that is not what the level above
    names is refused, naming the file; a value unlike the index (here the index is written
    again saying other bytes for one key, and the manifest made to name it) is refused,
    naming the key."""
    url = (f"file://{tmp_path}/durable", {})
    nodes = committed_step(url, tmp_path)
    store = tmp_path / "durable" / "50"
    need = {"state": {"w": rows(16, 17)}}
    header = store / keyindex.KEYS_NAME
    kept = header.read_bytes()
    header.write_bytes(kept.replace(b'"step": 50', b'"step": 49'))
    with pytest.raises(ChecksumMismatch, match=r"keys\.json"):
        partial.stage(nodes[0], 50, tmp_path / "a" / "50", need)
    header.write_bytes(kept)
    body = store / keyindex.body_name(0)
    good = body.read_bytes()
    body.write_bytes(good.replace(b"w/1.0", b"w/1.9"))
    with pytest.raises(ChecksumMismatch, match="header"):
        partial.stage(nodes[0], 50, tmp_path / "b" / "50", need)
    body.write_bytes(good)
    index = keyindex.KeyIndex(nodes[0], 50, nodes[0].read_manifest(50))
    index.in_ranges("state", [("", None)])
    lying = index.read_keys("state")
    lying["w/1.0"] = [lying["w/1.0"][0], "0" * 32]
    set_key_index(store, keyindex.write(nodes[0], 50, {"state": lying}))
    reader = DurableTier(url[0], node_rank=0, num_nodes=4)
    with pytest.raises(CommitError, match=r"w/1\.0"):
        partial.stage(reader, 50, tmp_path / "c" / "50", need)


def test_a_reader_fetches_only_the_blocks_that_name_its_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one key per block, a process that needs one row chunk reads the header and the
    blocks of that chunk, of the array's metadata and of the vector it does not name, not
    every block of the index."""
    monkeypatch.setattr(keyindex, "BLOCK_KEYS", 1)
    url = (f"file://{tmp_path}/durable", {})
    committed_step(url, tmp_path)
    store = tmp_path / "durable" / "50"
    reader = DurableTier(url[0], node_rank=1, num_nodes=4)
    got = partial.stage(reader, 50, tmp_path / "s" / "50", {"state": {"w": rows(20, 30)}})
    header = (store / keyindex.KEYS_NAME).stat().st_size
    lines = (store / keyindex.body_name(0)).read_bytes().splitlines(keepends=True)
    assert len(lines) == 6
    wanted = [ln for ln in lines if any(k in ln for k in (b'"w/1.0"', b'"w/.zarray"', b'"b/0"'))]
    assert got.index_bytes == header + sum(len(ln) for ln in wanted)
    assert keys_in(tmp_path / "s" / "50" / "state").keys() == {"w/.zarray", "w/1.0", "b/0"}


def test_no_key_index_where_a_node_has_no_index_or_replicas_differ(tmp_path: Path) -> None:
    """With dedup off nodes write no index, and where nodes hold different values of a key
    the merged root holds one of them: node 0 writes no key index, and a job of another shape
    reads such a step whole, as before."""
    for name, kw in (("off", {"dedup": False}), ("differ", {"differ": True})):
        url = (f"file://{tmp_path}/{name}/durable", {})
        (tmp_path / name).mkdir()
        nodes = committed_step(url, tmp_path / name, **kw)
        manifest = nodes[0].read_manifest(50)
        assert manifest.merged and manifest.key_index is None, name
        assert not partial.readable(manifest)
        assert not (tmp_path / name / "durable" / "50" / keyindex.KEYS_NAME).exists()
        with pytest.raises(CommitError, match="in part"):
            partial.stage(nodes[0], 50, tmp_path / name / "x" / "50", {})


def test_what_a_restore_says_it_needs() -> None:
    """The boxes come from the target's shardings, per item: tiered's own form is the
    ``default`` item; orbax's ``Composite`` names its items; an item that is not a PyTree of
    arrays, or a leaf with no sharding, is not named (read whole)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from tiered.loading import needs_of

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {
        "w": jax.ShapeDtypeStruct((64, 8), np.float32, sharding=one),
        "n": {"b": jax.ShapeDtypeStruct((4,), np.float32, sharding=one)},
        "plain": jax.ShapeDtypeStruct((2,), np.float32),
    }
    whole_w = ArrayNeed((64, 8), (((0, 64), (0, 8)),))
    need = needs_of(target, None, orbax_form=False)
    assert need == {"default": {"w": whole_w, "n.b": ArrayNeed((4,), (((0, 4),),))}}
    args = ocp.args.Composite(
        state=ocp.args.PyTreeRestore({"w": target["w"]}), meta=ocp.args.JsonRestore()
    )
    assert needs_of(None, args, orbax_form=True) == {"state": {"w": whole_w}}
    assert needs_of(None, ocp.args.StandardRestore({"w": target["w"]}), orbax_form=True) == {
        "default": {"w": whole_w}
    }
    # orbax reads by restore_args where they are given: their sharding and global shape
    given = ocp.args.PyTreeRestore(
        {"w": target["w"], "r": target["plain"]},
        restore_args={
            "w": ocp.ArrayRestoreArgs(sharding=one, global_shape=(32, 8)),
            "r": ocp.RestoreArgs(),
        },
    )
    assert needs_of(None, given, orbax_form=True) == {
        "default": {"w": ArrayNeed((32, 8), (((0, 32), (0, 8)),))}
    }
    # read whole: an array orbax restores as numpy (every process reads all of it), an item
    # with orbax's transforms (they read other keys, and a missing chunk as zeros)
    as_numpy = ocp.args.PyTreeRestore(
        {"w": target["w"]},
        restore_args={"w": ocp.ArrayRestoreArgs(restore_type=np.ndarray, sharding=one)},
    )
    assert needs_of(None, as_numpy, orbax_form=True) == {"default": {}}
    transformed = ocp.args.PyTreeRestore({"w": target["w"]}, transforms={})
    assert needs_of(None, transformed, orbax_form=True) is None
    # a mesh and its axes come before a sharding, as orbax takes them
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    both = ocp.args.PyTreeRestore(
        {"w": target["w"]},
        restore_args={
            "w": ocp.ArrayRestoreArgs(
                mesh=mesh,
                mesh_axes=jax.sharding.PartitionSpec("x"),
                sharding=one,
                global_shape=(64, 8),
            )
        },
    )
    picked = needs_of(None, both, orbax_form=True)
    assert picked == {"default": {"w": whole_w}}
    assert needs_of(None, None, orbax_form=False) is None  # no target: the whole step


def test_what_a_killed_restore_in_part_left_is_removed(tmp_path: Path) -> None:
    """A trainer killed while it staged a step in part leaves ``.tiered/partial``; the next
    manager on that disk (the trainer lock makes it the only one) removes it, so it does not
    hold the disk until some later restore in part."""
    from tiered import CheckpointManager
    from tiered.loading import PARTIAL_DIR

    from conftest import write_config

    _, cfg = write_config(tmp_path, f"file://{tmp_path}/durable")
    left = Path(cfg.local_dir) / ".tiered" / PARTIAL_DIR / "4242" / "50"
    left.mkdir(parents=True)
    (left / "chunk").write_bytes(b"x" * 4096)
    with CheckpointManager(cfg, install_signal_handlers=False):
        assert not left.parent.parent.exists()


def test_a_staged_step_is_read_without_a_barrier_across_the_job(tmp_path: Path) -> None:
    """Only some processes may stage a step (the others load their local part, or fell back
    to the whole step): the manager over a staged folder must not synchronise the job, or the
    processes would meet at different barriers and fail (or hang)."""
    import subprocess
    import sys

    from conftest import ROOT, free_port, subprocess_env, write_config

    config, _ = write_config(tmp_path, f"file://{tmp_path}/durable")
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "staged_manager_probe.py"),
                str(config),
                str(rank),
                port,
                str(tmp_path / "staged"),
            ],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for rank, (out, err) in enumerate(outs):
        assert f"PASSED {rank}" in out, err[-2000:]


def commit_same(url: tuple[str, dict], tmp_path: Path, values: dict, metadata: str) -> None:
    """Step 50 of two nodes that both hold ``values`` (replicated), committed."""
    from test_dedup import upload_all

    nodes = [
        DurableTier(url[0], storage_options=url[1], node_rank=r, num_nodes=2, dedup=True)
        for r in range(2)
    ]
    dirs = [local_step(tmp_path, r, 50, values, metadata) for r in range(2)]
    upload_all(nodes, dirs, 50)
    assert nodes[0].commit_parts(50, epoch=0, marker=b"ok") == []


def tree_metadata(*names: str) -> str:
    """An item's ``_METADATA`` naming these parameters, every chunk stored."""
    return json.dumps(
        {
            "tree_metadata": {
                repr((n,)): {"key_metadata": [{"key": n, "key_type": 2}]} for n in names
            },
            "store_array_data_equal_to_fill_value": True,
        }
    )


def test_an_array_inside_another_arrays_folder_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parameters ``a`` and ``a/b`` (a dict key with a slash): ``a/b``'s keys lie in ``a``'s
    folder. Asking the index only for ``a``'s chunks would leave out ``a/b``, which the target
    does not name (read whole): wherever the blocks fall (one key each here), it is read."""
    monkeypatch.setattr(keyindex, "BLOCK_KEYS", 1)
    url = (f"file://{tmp_path}/durable", {})
    small = json.dumps({"chunks": [4], "shape": [4], "zarr_format": 2}).encode()
    values = {"a/.zarray": ZARR2, **{f"a/{i}.0": chunk(i) for i in range(4)}}
    values |= {"a/b/.zarray": small, "a/b/0": b"inner" * 100}
    commit_same(url, tmp_path, values, tree_metadata("a", "a/b"))
    reader = DurableTier(url[0], node_rank=1, num_nodes=4)
    dest = tmp_path / "staged" / "50"
    partial.stage(reader, 50, dest, {"state": {"w": rows(0, 1), "a": rows(20, 30)}})
    # every block of a's folder is read: a's chunk that the box meets, and a/b whole
    assert set(keys_in(dest / "state")) == {"a/.zarray", "a/1.0", "a/b/.zarray", "a/b/0"}


def test_an_array_with_a_name_beyond_ascii_is_read_in_part(tmp_path: Path) -> None:
    """orbax names arrays in UTF-8; the index holds their bytes. An array named ``é`` is read in
    part like any other (its one needed chunk), not whole."""
    url = (f"file://{tmp_path}/durable", {})
    values = {"é/.zarray": ZARR2, **{f"é/{i}.0": chunk(i) for i in range(4)}}
    commit_same(url, tmp_path, values, tree_metadata("é"))
    reader = DurableTier(url[0], node_rank=1, num_nodes=4)
    dest = tmp_path / "staged" / "50"
    got = partial.stage(reader, 50, dest, {"state": {"é": rows(20, 30)}})
    assert set(keys_in(dest / "state")) == {"é/.zarray", "é/1.0"}
    assert got.keys_read == 2

"""The durable tier against real backends: a plain directory and the GCS emulator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiered import ChecksumMismatch, DurableTier, LayoutError, LocalTier, StorageError
from tiered.layout import COMMIT_MARKER, MANIFEST_NAME
from tiered.manifest import build_manifest, verify_local

from helpers import corrupt_largest_file, example_state, orbax_save


def tier(url: str) -> DurableTier:
    opts = {"token": "anon"} if url.startswith("gs://") else {}
    return DurableTier(url, storage_options=opts, concurrency=4)


@pytest.fixture
def local_steps(tmp_path: Path) -> LocalTier:
    state = example_state()
    for step in (10, 50):
        orbax_save(tmp_path / "local", step, state, reason="periodic")
    return LocalTier(tmp_path / "local")


def test_upload_commit_download_round_trip(
    durable_url: str, local_steps: LocalTier, tmp_path: Path
) -> None:
    durable = tier(durable_url)
    durable.check()
    assert durable.committed_steps() == []
    result = durable.upload_step(local_steps.step_dir(50), step=50)
    assert result.files_skipped == 0 and result.bytes_total > 0
    assert durable.committed_steps() == [50]
    manifest = durable.verify_step(50)
    assert manifest.reason == "periodic"
    assert manifest == build_manifest(
        local_steps.step_dir(50), step=50, reason="periodic", commit_time=manifest.commit_time
    )
    dest = tmp_path / "fetched"
    durable.download_step(50, dest)
    verify_local(dest, manifest)
    assert (dest / COMMIT_MARKER).read_bytes() == (
        local_steps.step_dir(50) / COMMIT_MARKER
    ).read_bytes()


def test_reupload_skips_files_already_there(durable_url: str, local_steps: LocalTier) -> None:
    durable = tier(durable_url)
    durable.upload_step(local_steps.step_dir(50), step=50)
    again = durable.upload_step(local_steps.step_dir(50), step=50)
    assert again.files_skipped == again.files_total and again.bytes_moved == 0


def test_partial_upload_is_not_a_checkpoint_and_is_completed(
    durable_url: str, local_steps: LocalTier
) -> None:
    durable = tier(durable_url)
    manifest = build_manifest(local_steps.step_dir(50), step=50)
    first = sorted(manifest.files)[0]
    durable.fs.put_file(str(local_steps.step_dir(50) / first), durable.object_path(50, first))
    facts = durable.scan()
    assert [(f.step, f.committed) for f in facts] == [(50, False)]
    assert durable.committed_steps() == []
    result = durable.upload_step(local_steps.step_dir(50), step=50)
    assert result.files_skipped == 1
    assert durable.committed_steps() == [50]


def test_corrupt_remote_object_fails_verification(durable_url: str, local_steps: LocalTier) -> None:
    durable = tier(durable_url)
    durable.upload_step(local_steps.step_dir(50), step=50)
    victim = corrupt_largest_file(durable, 50)
    with pytest.raises(ChecksumMismatch, match=victim):
        durable.verify_step(50)


def test_delete_removes_marker_first_then_everything(
    durable_url: str, local_steps: LocalTier
) -> None:
    durable = tier(durable_url)
    durable.upload_step(local_steps.step_dir(10), step=10)
    durable.upload_step(local_steps.step_dir(50), step=50)
    durable.delete_step(10)
    assert durable.committed_steps() == [50]
    assert [f.step for f in durable.scan()] == [50]
    with pytest.raises(FileNotFoundError):
        durable.fs.info(durable.object_path(10, MANIFEST_NAME))


def test_symlink_out_of_step_is_refused(tmp_path: Path, local_steps: LocalTier) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    (local_steps.step_dir(50) / "leak").symlink_to(secret)
    durable = tier(f"file://{tmp_path}/durable")
    with pytest.raises(LayoutError, match="symlink points outside the step directory"):
        durable.upload_step(local_steps.step_dir(50), step=50)
    assert durable.committed_steps() == []


def test_missing_bucket_is_a_clear_permanent_error(gcs_emulator: object) -> None:
    durable = tier("gs://no-such-bucket-tiered/run")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-tiered' does not exist") as info:
        durable.check()
    assert info.value.transient is False


def test_local_scan_ignores_tmp_and_non_step_names(tmp_path: Path, local_steps: LocalTier) -> None:
    root = local_steps.root
    for name in ("60.orbax-checkpoint-tmp-123", "-1", "00100", "../x".replace("/", "_"), "abc"):
        (root / name).mkdir()
    (root / "70").mkdir()  # uncommitted: no marker
    facts = local_steps.scan()
    assert [(f.step, f.committed) for f in facts] == [(10, True), (50, True), (70, False)]
    assert local_steps.committed_steps() == [10, 50]


def test_symlinked_step_promotes_and_prunes_with_its_target(
    tmp_path: Path, local_steps: LocalTier
) -> None:
    # The shape orbax's multi-tier client leaves after a restore: <step> -> .tiered/staging/<step>
    staged = local_steps.staging_dir / "50"
    staged.parent.mkdir(parents=True)
    local_steps.step_dir(50).rename(staged)
    local_steps.step_dir(50).symlink_to(".tiered/staging/50")
    facts = {f.step: f for f in local_steps.scan()}
    assert facts[50].committed and facts[50].is_link
    durable = tier(f"file://{tmp_path}/durable")
    durable.upload_step(local_steps.step_dir(50), step=50)
    assert durable.committed_steps() == [50]
    local_steps.delete_step(50)
    assert not local_steps.step_dir(50).is_symlink() and not staged.exists()
    assert local_steps.committed_steps() == [10]


def test_large_objects_download_in_ranges_and_verify(tmp_path: Path, gs_url: str) -> None:
    step_dir = tmp_path / "local" / "50"
    step_dir.mkdir(parents=True)
    (step_dir / "big.bin").write_bytes(os.urandom(70 * 1024 * 1024 + 3))  # > the range cutoff
    (step_dir / "commit_success.txt").write_text("ok")
    durable = tier(gs_url)
    durable.upload_step(step_dir, step=50)
    durable.download_step(50, tmp_path / "back")
    assert (tmp_path / "back" / "big.bin").read_bytes() == (step_dir / "big.bin").read_bytes()
    data = durable.fs.cat_file(durable.object_path(50, "big.bin"))
    durable.fs.pipe_file(durable.object_path(50, "big.bin"), data[: len(data) - 1000])
    with pytest.raises(ChecksumMismatch):
        durable.download_step(50, tmp_path / "back2")
    assert not (tmp_path / "back2").exists()


def test_gcs_emulator_reports_generations_as_gcs_does(gs_url: str) -> None:
    """tests/gcs_emulator.py: downloads carry ``x-goog-generation`` (tensorstore's conditional
    writes need it; without it orbax saving straight to gs:// failed intermittently with
    "Malformed StorageGeneration"), and ``ifGenerationMatch`` refuses a stale write."""
    import urllib.error
    import urllib.parse
    import urllib.request

    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon")
    path = f"{gs_url.removeprefix('gs://')}/obj"
    fs.pipe_file(path, b"one")
    generation = str(fs.info(path)["generation"])
    bucket, _, name = path.partition("/")
    host = os.environ["STORAGE_EMULATOR_HOST"]
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{host}/storage/v1/b/{bucket}/o/{quoted}?alt=media") as r:
        assert r.read() == b"one" and r.headers["x-goog-generation"] == generation
    stale = urllib.request.Request(
        f"{host}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={quoted}&ifGenerationMatch=1",
        data=b"two",
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(stale)
    assert info.value.code == 412
    assert fs.cat_file(path) == b"one"


def test_ocdbt_files_are_skipped_only_by_their_xxh3(durable_url: str, tmp_path: Path) -> None:
    """Every OCDBT file ends with its own crc32c, so the crc32c of each whole file is one
    constant (the CRC-32C residue). An older run's partial upload of step 10 left its
    ``manifest.ocdbt``, the same size as the new one: the upload must replace it, or the step
    would commit the old database over the new data files. Its xxh3 tells them apart; the
    same step's own OCDBT files, left by an interrupted upload, are skipped."""
    from tiered.storage.transfer import CRC32C_RESIDUE

    from helpers import assert_trees_equal, orbax_restore

    old, new = tmp_path / "old", tmp_path / "new"
    orbax_save(old, 10, example_state(1), reason="periodic")
    orbax_save(new, 10, example_state(2), reason="periodic")
    m_old, m_new = build_manifest(old / "10", step=10), build_manifest(new / "10", step=10)
    roots = [r for r in m_new.files if r.endswith("manifest.ocdbt")]
    assert roots and all(m_new.files[r].crc32c == CRC32C_RESIDUE for r in roots)
    same = [
        r
        for r in roots
        if (m_old.files[r].size, m_old.files[r].crc32c) == (m_new.files[r].size, CRC32C_RESIDUE)
    ]
    assert same, "same size and crc32c"
    assert all(m_old.files[r].xxh3 != m_new.files[r].xxh3 for r in same)
    durable = tier(durable_url)
    for rel in m_old.files:  # the older run's upload, never committed
        durable.fs.put_file(str(old / "10" / rel), durable.object_path(10, rel))
    first = durable.upload_step(new / "10", step=10)
    identical = [r for r in m_new.files if m_old.files.get(r) == m_new.files[r]]
    assert not set(identical) & set(roots)
    assert first.files_skipped == len(identical)  # no OCDBT file taken for the new one's
    durable.delete_step(10)
    for rel in roots:  # the new step's own, left by an interrupted upload
        durable.fs.put_file(str(new / "10" / rel), durable.object_path(10, rel))
    again = durable.upload_step(new / "10", step=10)
    assert again.files_skipped == len(roots)
    dest = tmp_path / "fetched" / "10"
    durable.download_step(10, dest)
    for rel in roots:
        assert (dest / rel).read_bytes() == (new / "10" / rel).read_bytes()
    restored = orbax_restore(str(dest.parent), 10, example_state(5))
    assert_trees_equal(restored, example_state(2))


def test_a_file_name_of_255_bytes_promotes_restores_and_exports(tmp_path: Path) -> None:
    """NAME_MAX is 255 bytes: a step file of exactly that name must go through every copy that
    writes under a temporary name first (the file:// upload, the restore, a local export)."""
    from tiered.tiers import export_step, fetch_step, promote_step

    long_name = "é" * 100 + "x" * 55  # 255 bytes in UTF-8
    assert len(long_name.encode()) == 255
    local = LocalTier(tmp_path / "local")
    orbax_save(tmp_path / "local", 10, example_state(), reason="periodic")
    (local.step_dir(10) / long_name).write_bytes(b"long-named bytes")
    durable = tier(f"file://{tmp_path}/durable")
    promote_step(local, durable, 10)
    assert durable.verify_step(10).files[long_name].size == 16
    export_step(local, durable, 10, tmp_path / "exported")
    assert (tmp_path / "exported" / long_name).read_bytes() == b"long-named bytes"
    fresh = LocalTier(tmp_path / "fresh")
    fresh.ensure()
    back = fetch_step(fresh, durable, 10)
    assert (back / long_name).read_bytes() == b"long-named bytes"
    leftovers = [p for p in tmp_path.rglob("*") if ".tiered-tmp-" in p.name]
    assert leftovers == []


def test_temporary_names_fit_name_max_and_two_writers_never_share_one(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tiered.layout import NAME_MAX, tmp_name, tmp_owner

    from conftest import subprocess_env

    script = "from tiered.layout import tmp_name as t; print(t('a' * 255)); print(t('é' * 128))"
    names = [tmp_name("a" * 255), tmp_name("a" * 255), tmp_name("é" * 128)]
    for _ in range(2):  # two other writers, each its own process
        out = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env=subprocess_env(),
        ).stdout
        names += out.splitlines()
    assert len(names) == 7 and len(set(names)) == 7
    for name in names:
        assert len(name.encode()) <= NAME_MAX
        assert tmp_owner(name) is not None  # cleanup still knows whose it is
        (tmp_path / name).write_bytes(b"")  # a real file system takes it
    assert tmp_owner(names[0]) == os.getpid() and tmp_owner(names[3]) != os.getpid()
    assert tmp_name("7").startswith("7.tiered-tmp-")  # short names keep their final name whole


# -- content identity: OCDBT files all share one crc32c, so the xxh3 tells them apart --------


def _same_size_ocdbt_twin(local: LocalTier, step: int, other: int, what: str) -> tuple[str, str]:
    """(a file of ``step``, the file of ``other`` that can stand in for it): both OCDBT files
    (crc32c = the residue), the same size, other bytes. ``what``: the root ``manifest.ocdbt``
    or a ``d/`` file (a b-tree node)."""
    from tiered.storage.transfer import CRC32C_RESIDUE

    mine = build_manifest(local.step_dir(step), step=step).files
    theirs = build_manifest(local.step_dir(other), step=other).files
    for rel, entry in sorted(mine.items()):
        if entry.crc32c != CRC32C_RESIDUE or (what == "manifest.ocdbt") != rel.endswith(what):
            continue
        for orel, oentry in sorted(theirs.items()):
            same_kind = rel.rsplit("/", 1)[0] == orel.rsplit("/", 1)[0]
            if same_kind and (oentry.size, oentry.crc32c) == (entry.size, entry.crc32c):
                ours = (local.step_dir(step) / rel).read_bytes()
                assert ours != (local.step_dir(other) / orel).read_bytes()
                return rel, orel
    raise AssertionError(f"no same-size {what} file in steps {step} and {other}")


@pytest.fixture
def two_runs(tmp_path: Path) -> LocalTier:
    orbax_save(tmp_path / "local", 10, example_state(1), reason="periodic")
    orbax_save(tmp_path / "local", 20, example_state(2), reason="periodic")
    return LocalTier(tmp_path / "local")


@pytest.mark.parametrize("what", ["manifest.ocdbt", "d/"])
def test_another_steps_ocdbt_file_of_the_same_size_is_caught_at_rest(
    store: tuple[str, dict], two_runs: LocalTier, tmp_path: Path, what: str
) -> None:
    """Step 20's file on the durable tier overwritten with step 10's twin (same size, same
    crc32c, other bytes): ``verify_step`` (``tiered verify``), the store's word for an in-place
    restore, and a download all catch it."""
    url, options = store
    durable = DurableTier(url, storage_options=options, concurrency=4)
    for step in (10, 20):
        durable.upload_step(two_runs.step_dir(step), step=step)
    rel, twin = _same_size_ocdbt_twin(two_runs, 20, 10, what)
    durable.fs.pipe_file(durable.object_path(20, rel), (two_runs.step_dir(10) / twin).read_bytes())
    with pytest.raises(ChecksumMismatch, match=f"{rel}: xxh3"):
        durable.verify_step(20)
    assert durable.vouched(20) is None
    assert durable.vouched(10) is not None or not url.startswith("gs://")
    with pytest.raises(ChecksumMismatch, match=f"{rel}: xxh3"):
        durable.download_step(20, tmp_path / "back" / "20")
    assert not (tmp_path / "back" / "20").exists()
    durable.verify_step(10)


@pytest.mark.parametrize("what", ["manifest.ocdbt", "d/"])
def test_another_steps_ocdbt_file_swapped_in_locally_fails_the_promotion(
    store: tuple[str, dict], two_runs: LocalTier, what: str
) -> None:
    """The daemon fingerprints a step when it first becomes due; a same-size OCDBT file of
    another step put in its place afterwards must fail the promotion, not be committed."""
    from tiered.tiers import promote_step

    url, options = store
    durable = DurableTier(url, storage_options=options, concurrency=4)
    rel, twin = _same_size_ocdbt_twin(two_runs, 20, 10, what)
    two_runs.manifest(20)  # fingerprinted, kept in .tiered/manifests
    (two_runs.step_dir(20) / rel).write_bytes((two_runs.step_dir(10) / twin).read_bytes())
    with pytest.raises(ChecksumMismatch, match="xxh3"):
        promote_step(two_runs, durable, 20)
    assert durable.committed_steps() == []


def test_a_peer_copy_carrying_another_steps_ocdbt_file_is_refused(
    two_runs: LocalTier, tmp_path: Path
) -> None:
    import io

    from tiered.storage.replicas import Header, PeerStore, encode, read_header

    rel, twin = _same_size_ocdbt_twin(two_runs, 20, 10, "manifest.ocdbt")
    header = Header(owner=0, step=20, epoch=None, marker="", manifest=two_runs.manifest(20))

    def files(name: str) -> io.BufferedReader:
        path = two_runs.step_dir(10) / twin if name == rel else two_runs.step_dir(20) / name
        return open(path, "rb")

    stream = io.BytesIO(b"".join(encode(header, files)))
    got, raw = read_header(stream)
    peers = PeerStore(tmp_path / "node-1")
    with pytest.raises(ChecksumMismatch, match=rel):
        peers.receive(stream, got, raw, "sig", free_bytes=10**9, keep=2)
    assert peers.replicas() == []


def test_a_manifest_of_before_the_xxh3_still_verifies_restores_and_keeps_its_identity(
    store: tuple[str, dict], two_runs: LocalTier, tmp_path: Path
) -> None:
    """A step committed by tiered 0.2: version 1, size and crc32c only. It verifies and
    restores by crc32c as it did, keeps the identity it had (so it is the same checkpoint as
    before the upgrade), and a step fingerprinted then still promotes."""
    import hashlib
    import json

    from tiered.manifest import FileEntry, Manifest

    url, options = store
    durable = DurableTier(url, storage_options=options, concurrency=4)
    durable.upload_step(two_runs.step_dir(20), step=20)
    data = json.loads(durable.fs.cat_file(durable.object_path(20, MANIFEST_NAME)))
    assert data["version"] == 2 and all("xxh3" in e for e in data["files"].values())
    data["version"] = 1
    for entry in data["files"].values():
        del entry["xxh3"]
    durable.fs.pipe_file(durable.object_path(20, MANIFEST_NAME), json.dumps(data).encode())
    old = durable.read_manifest(20)
    assert all(e.xxh3 is None for e in old.files.values())
    then = hashlib.sha256()  # Manifest.identity as tiered 0.2 computed it
    for rel, entry in sorted(old.files.items()):
        then.update(f"{rel}\0{entry.size}\0{entry.crc32c}\n".encode())
    assert old.identity == then.hexdigest()[:32]
    assert Manifest.from_json(old.to_json()).identity == old.identity
    assert "xxh3" not in old.to_json() and json.loads(old.to_json())["version"] == 1
    assert [f.identity for f in durable.scan()] == [old.identity]
    durable.verify_step(20)
    durable.download_step(20, tmp_path / "back" / "20")
    verify_local(tmp_path / "back" / "20", old)
    # a step fingerprinted before the upgrade promotes with its kept (old) manifest
    mine = build_manifest(two_runs.step_dir(10), step=10).files
    kept = Manifest(step=10, files={r: FileEntry(e.size, e.crc32c) for r, e in mine.items()})
    durable.upload_step(two_runs.step_dir(10), step=10, manifest=kept)
    assert durable.read_manifest(10).identity == kept.identity
    durable.verify_step(10)


_X, _Y = "a" * 32, "b" * 32


@pytest.mark.parametrize(
    ("entry", "there", "skipped"),
    [
        # a manifest of before the xxh3: a crc32c that tells files apart is enough
        ((10, 0x1234, None), (10, 0x1234, None), True),
        ((10, 0x48674BC7, None), (10, 0x48674BC7, None), False),  # every OCDBT file's crc32c
        # with the xxh3: it decides where it is known on both sides
        ((10, 0x48674BC7, _X), (10, 0x48674BC7, _X), True),
        ((10, 0x48674BC7, _X), (10, 0x48674BC7, _Y), False),
        ((10, 0x48674BC7, _X), (10, 0x48674BC7, None), False),  # a listing's word only
        ((10, 0x1234, _X), (10, 0x1234, None), True),  # GCS's crc32c of an ordinary file
        ((10, 0x1234, _X), (10, 0x1234, _Y), False),
        ((10, 0x1234, _X), (11, 0x1234, _X), False),
        ((10, 0x1234, _X), (10, 0x4321, None), False),
    ],
)
def test_an_upload_skips_only_a_file_it_knows_holds_the_same_bytes(
    entry: tuple, there: tuple, skipped: bool
) -> None:
    from tiered.manifest import FileEntry, Manifest
    from tiered.storage import RemoteFile, plan_transfer

    manifest = Manifest(step=1, files={"f": FileEntry(*entry)})
    plan = plan_transfer(manifest, {"f": RemoteFile(*there), "stray": RemoteFile(1, 0)})
    assert (plan.skip, plan.put) == ((("f",), ()) if skipped else ((), ("f",)))
    assert plan.remove == ("stray",)

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


def test_ocdbt_files_are_never_skipped_by_checksum(durable_url: str, tmp_path: Path) -> None:
    """Every OCDBT file ends with its own crc32c, so the crc32c of each whole file is one
    constant (the CRC-32C residue). An older run's partial upload of step 10 left its
    ``manifest.ocdbt``, the same size as the new one: the upload must replace it, or the step
    would commit the old database over the new data files."""
    from tiered.storage.transfer import CRC32C_RESIDUE

    from helpers import assert_trees_equal, orbax_restore

    old, new = tmp_path / "old", tmp_path / "new"
    orbax_save(old, 10, example_state(1), reason="periodic")
    orbax_save(new, 10, example_state(2), reason="periodic")
    m_old, m_new = build_manifest(old / "10", step=10), build_manifest(new / "10", step=10)
    roots = [r for r in m_new.files if r.endswith("manifest.ocdbt")]
    assert roots and all(m_new.files[r].crc32c == CRC32C_RESIDUE for r in roots)
    assert any(m_old.files.get(r) == m_new.files[r] for r in roots), "same size and crc32c"
    assert any((old / "10" / r).read_bytes() != (new / "10" / r).read_bytes() for r in roots)
    durable = tier(durable_url)
    for rel in m_old.files:  # the older run's upload, never committed
        durable.fs.put_file(str(old / "10" / rel), durable.object_path(10, rel))
    durable.upload_step(new / "10", step=10)
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

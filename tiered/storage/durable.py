"""The durable tier over any fsspec filesystem (``gs://``, ``s3://``, ``file://``, ...).

Commit ordering, stated once: a step is written data first, then ``tiered-manifest.json``, then
``commit_success.txt``; it is deleted in the reverse order (marker first), so a half-written or
half-deleted step is never mistaken for a checkpoint. Object stores have no atomic rename, which
is why the durable tier uses a marker file; how each backend writes is the store's strategy
(``tiered.storage.stores``). With several nodes each node writes its files and a part marker,
and node 0 commits (``tiered.storage.parts``).

Two fsspec traps are avoided on purpose: ``exists()`` swallows every error (an auth failure would
read as "not there"), so ``info()`` is called and real errors let through; and ``mv`` is
copy-then-delete, so nothing here relies on it being atomic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tiered import faults
from tiered.errors import ChecksumMismatch, CommitError, LayoutError
from tiered.layout import (
    COMMIT_MARKER,
    DISPLACED_DIR,
    GLOBAL_LAYOUT,
    MANIFEST_NAME,
    displaced_name,
    parse_displaced,
    parse_step,
    part_path,
    step_name,
)
from tiered.manifest import FileEntry, Manifest, check_entry, check_file, digest_of_stream
from tiered.storage import download, parts, upload
from tiered.storage.errormap import translate_errors
from tiered.storage.steps import PartCache
from tiered.storage.stores import Store, listed_crc32c, object_version, open_store
from tiered.storage.transfer import (
    TRANSFER_MEMORY,
    MemoryBudget,
    Progress,
    RateLimiter,
    TransferResult,
    listing_proves,
    run_parallel,
)
from tiered.types import Displaced, DurableStep, Topology, as_reason
from tiered.urls import normalize_url


class DurableTier:
    """Steps on the durable tier: listed, uploaded and verified, moved aside, downloaded and
    deleted, one whole step at a time, as one node of a ``Topology``."""

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        concurrency: int = 8,
        download_concurrency: int | None = None,
        bandwidth_mb_per_s: float | None = None,
        topology: Topology | None = None,
        node_rank: int = 0,
        num_nodes: int = 1,
        dedup: bool = False,
        dedup_wait: float = 60.0,
    ) -> None:
        self.store: Store = open_store(normalize_url(url), storage_options)
        self.storage_options = dict(storage_options or {})
        self.url = self.store.url  # for messages and status; never holds credentials
        self.topology = topology or Topology(node_rank, num_nodes)
        self.concurrency = concurrency
        self.download_concurrency = download_concurrency or concurrency
        self.limiter = RateLimiter(bandwidth_mb_per_s * 1e6) if bandwidth_mb_per_s else None
        self.budget = MemoryBudget(TRANSFER_MEMORY)
        self._manifests: dict[int, tuple[str, Manifest | None, str | None, bool]] = {}
        self.dedup = dedup
        self.dedup_wait = dedup_wait
        self.late_ranks: set[int] = set()
        """Node 0: the nodes whose index of the last step planned came too late."""
        """With several nodes, upload only the OCDBT keys this node owns
        (``tiered.storage.dedup``)."""
        self.parts_read = PartCache()
        """Node 0's part markers read while a commit waits (``parts.commit``)."""

    @property
    def fs(self) -> Any:
        return self.store.fs

    @property
    def root(self) -> str:
        return self.store.root

    @property
    def protocol(self) -> str:
        return self.store.protocol

    def __repr__(self) -> str:
        return f"DurableTier({self.url!r})"

    def object_path(self, step: int, rel: str | None = None) -> str:
        """The filesystem path of a step, or of an object in it."""
        base = f"{self.root}/{step_name(step)}"
        return f"{base}/{rel}" if rel else base

    def step_url(self, step: int) -> str:
        return f"{self.url}/{step_name(step)}"

    def locate(self, rel: str) -> str:
        """Where this node's file ``rel`` of a step goes on the durable tier: the same path
        with one node; with several, a process's own shards keep their path (as in a global
        orbax checkpoint) and the files every node has go under ``tiered-parts/node-<r>/``."""
        return part_path(self.topology.rank, rel) if self.topology.multi else rel

    def node_listing(self, step: int, manifest: Manifest) -> dict[str, Any]:
        """This node's objects of a step, keyed by the manifest's paths (``parts.listing``)."""
        return (
            parts.listing(self, step, manifest) if self.topology.multi else self.remote_files(step)
        )

    def parallel(self, fn: Callable[[str], None], items: list[str]) -> None:
        run_parallel(fn, items, workers=self.concurrency)

    # -- listing --

    def check(self) -> None:
        """Fail with a precise message when the tier cannot be reached or written."""
        with translate_errors(f"reaching {self.url}"):
            self.store.prepare()

    def _ls_steps(self) -> list[int]:
        with translate_errors(f"listing {self.url}"):
            self.fs.invalidate_cache(self.root)
            try:
                entries = self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                entries = []
            if not entries:
                self.store.check_missing_root()  # a missing bucket is not an empty tier
        steps = []
        for entry in entries:
            ref = parse_step(str(entry).rstrip("/").rsplit("/", 1)[-1])
            if ref is not None:
                steps.append(ref.step)
        return sorted(set(steps))

    def marker_version(self, step: int) -> str | None:
        """A token that changes whenever the step's commit marker is written again; None when
        the step has no marker."""
        with translate_errors(f"reading {self.step_url(step)}"):
            try:
                info = self.fs.info(self.object_path(step, COMMIT_MARKER))
            except FileNotFoundError:
                return None
        return object_version(info)

    def has_marker(self, step: int) -> bool:
        return self.marker_version(step) is not None

    def scan(self) -> list[DurableStep]:
        """Every step prefix on the durable tier, committed or partial, oldest first, each
        committed one with the identity of its manifest (this node's part, with several nodes)
        or the reason it has none."""
        facts = []
        for step in self._ls_steps():
            version = self.marker_version(step)
            if version is None:
                self._manifests.pop(step, None)
                facts.append(DurableStep(step=step, committed=False))
                continue
            manifest, problem, tiered = self.step_manifest(step, version)
            facts.append(
                DurableStep(
                    step=step,
                    committed=True,
                    identity=manifest.copy_identity if manifest else None,
                    reason=as_reason(manifest.reason) if manifest else "unknown",
                    commit_time=manifest.commit_time if manifest else None,
                    size=manifest.total_bytes if manifest else None,
                    problem=problem,
                    tiered=tiered,
                )
            )
        return facts

    def committed_steps(self) -> list[int]:
        """Committed steps this tier can verify (foreign ones are left out)."""
        return [f.step for f in self.scan() if f.kept]

    def step_manifest(self, step: int, version: str) -> tuple[Manifest | None, str | None, bool]:
        """(this node's manifest or None, why not, whether a tiered manifest is there). With
        several nodes that is this node's own part marker: the merged manifest lists every
        node's files, and a thousand nodes each reading it would move a thousand times its
        size. Kept per marker version, so a step written again is read again."""
        cached = self._manifests.get(step)
        if cached is not None and cached[0] == version:
            return cached[1], cached[2], cached[3]
        topo = self.topology
        manifest: Manifest | None = None
        problem: str | None = None
        tiered = True
        try:
            manifest = parts.read(self, step, topo.rank) if topo.multi else self.read_manifest(step)
        except FileNotFoundError:
            if topo.multi:
                problem = f"no part for node {topo.rank}: written by a job of another shape"
            else:
                problem, tiered = f"no {MANIFEST_NAME}: not written by tiered", False
        except LayoutError as err:
            problem, tiered = f"unreadable manifest: {err}", False
        if (manifest is None and topo.multi and tiered) or (
            manifest is not None and manifest.nodes != topo.nodes
        ):
            manifest, problem = parts.foreign_manifest(self, step)
        self._manifests[step] = (version, manifest, problem, tiered)
        return manifest, problem, tiered

    def read_manifest(self, step: int) -> Manifest:
        with translate_errors(f"reading the manifest of {self.step_url(step)}"):
            data = self.fs.cat_file(self.object_path(step, MANIFEST_NAME))
        manifest = Manifest.from_json(data)
        if manifest.step != step:
            raise LayoutError(
                f"{self.step_url(step)}: manifest is for step {manifest.step}, not {step}"
            )
        return manifest

    def remote_files(self, step: int, *, under: str = "") -> dict[str, dict[str, Any]]:
        """Relative path -> fsspec info of every object under a step (or its ``under`` folder)."""
        prefix = self.object_path(step, under.rstrip("/")) if under else self.object_path(step)
        with translate_errors(f"listing {self.step_url(step)}"):
            self.fs.invalidate_cache(prefix)
            try:
                found = self.fs.find(prefix, detail=True)
            except FileNotFoundError:
                return {}
        out = {}
        for path, info in found.items():
            path = str(path)
            if info.get("type") == "directory":
                continue
            rel = path[len(prefix) :].lstrip("/")
            if rel:
                out[rel] = info
        return out

    # -- promotion --

    def upload_step(
        self,
        step_dir: Path,
        *,
        step: int,
        progress: Progress | None = None,
        manifest: Manifest | None = None,
        epoch: int = 0,
        limiter: RateLimiter | None = None,
    ) -> TransferResult:
        """Upload, verify, write the manifest, then the commit marker; idempotent
        (``tiered.storage.upload``)."""
        return upload.upload_step(
            self,
            step_dir,
            step=step,
            progress=progress,
            manifest=manifest,
            epoch=epoch,
            limiter=limiter,
            dedup=self.dedup,
        )

    def digest_of(self, step: int, rel: str) -> FileEntry:
        """Size and checksums of one object of a step, read back in bounded reads (never the
        whole object at once), each byte once."""
        block = self.store.read_block()
        with (
            translate_errors(f"reading back {rel} of {self.step_url(step)}"),
            self.budget.reserve(block),
            self.fs.open(
                self.object_path(step, rel), "rb", **self.store.stream_options(block)
            ) as f,
        ):
            return digest_of_stream(f, chunk=block)

    # -- verification --

    def vouched(self, step: int) -> Manifest | None:
        """The step's manifest when the store itself vouches for every object: its size, and
        the crc32c the store keeps for it (GCS computes it from the bytes it received), equal
        the manifest's, so the bytes at rest are the bytes saved without reading them back.
        None when an object differs, is missing, or the store keeps no checksum (``file://``,
        and S3 as uploaded here). One listing, and reads only of the objects whose crc32c
        tells nothing (``listing_proves``): OCDBT's manifests and b-tree nodes, a few small
        files (the array data files do not end with their own crc32c)."""
        cached = self._manifests.get(step)  # read by the scan that chose this step
        manifest = cached[1] if cached is not None and cached[1] is not None else None
        if manifest is None or self.topology.multi:
            manifest = self.read_manifest(step)
        remote = self.remote_files(step)
        unproven = []
        for rel, entry in manifest.files.items():
            info = remote.get(rel)
            if info is None or int(info.get("size", -1)) != entry.size:
                return None
            crc = listed_crc32c(info)
            if crc != entry.crc32c:
                return None
            if not listing_proves(entry, crc):
                unproven.append(rel)
        differ: list[str] = []

        def read_back(rel: str) -> None:
            if self.digest_of(step, rel) != manifest.files[rel]:
                differ.append(rel)

        self.parallel(read_back, unproven)
        return None if differ else manifest

    def verify_step(
        self, step: int, manifest: Manifest | None = None, *, read_back: bool = True
    ) -> Manifest:
        """Check every object of a step against its manifest: sizes always; the checksums by
        reading each object back, unless ``read_back`` is False, except where the store's
        crc32c (GCS) shows the bytes are the manifest's (``listing_proves``)."""
        manifest = manifest or self.read_manifest(step)
        self.verify_files(step, manifest, read_back=read_back)
        return manifest

    def verify_files(
        self,
        step: int,
        manifest: Manifest,
        *,
        read_back: bool = True,
        locate: Callable[[str], str] | None = None,
    ) -> None:
        """Check the objects a manifest lists: the step's own paths, or this node's part when
        ``locate`` maps them (``DurableTier.locate``). A crc32c in the listing (GCS) is taken
        where it settles the question (``listing_proves``); with ``read_back`` every other
        object is read back: all of them where listings carry no crc32c, and on GCS the few
        small OCDBT files that share one crc32c, so a same-size file of another step is
        caught."""
        if locate is None:
            remote = self.remote_files(step)
            where: Callable[[str], str] = str
        else:
            remote = self.node_listing(step, manifest)
            where = locate
        missing = [rel for rel in manifest.files if rel not in remote]
        if missing:
            raise ChecksumMismatch(
                f"{self.step_url(step)}: {len(missing)} file(s) missing, e.g. {where(missing[0])}"
            )

        def check(rel: str) -> None:
            info, entry = remote[rel], manifest.files[rel]
            url = f"{self.step_url(step)}/{where(rel)}"
            crc = listed_crc32c(info)
            size = int(info.get("size", -1))
            check_entry(url, entry, size=size, crc32c=crc)
            if read_back and not listing_proves(entry, crc):
                check_file(url, entry, self.digest_of(step, where(rel)))

        self.parallel(check, sorted(manifest.files))

    # -- moving a step aside --

    def displace_step(self, step: int, *, now: float) -> str:
        """Move a committed step whole to ``.tiered/displaced/<step>-<time>/`` (a name no
        orbax reader takes for a step), so a different step of the same number can take its
        place; return the new name. On ``file://`` this is one rename. On object stores the
        objects are copied server-side, the marker last, and the original is then deleted
        marker first: a crash leaves the original committed or the copy whole, never neither.
        """
        if not self.has_marker(step):
            raise CommitError(f"{self.step_url(step)} is not committed: nothing to move aside")
        name = displaced_name(step, now)
        dest = f"{self.root}/{DISPLACED_DIR}/{name}"
        with translate_errors(f"moving {self.step_url(step)} aside"):
            rels = [] if self.store.renames else sorted(self.remote_files(step))
            gone = self.store.move(self.object_path(step), dest, rels, COMMIT_MARKER, self.parallel)
        if not gone:
            self.delete_step(step)
        return name

    def list_displaced(self) -> list[Displaced]:
        """Steps moved aside, oldest first."""
        out = []
        for name in self.store.list_names(DISPLACED_DIR):
            parsed = parse_displaced(name)
            if parsed is not None:
                out.append(parsed)
        return sorted(out, key=lambda d: (d.moved_at or 0.0, d.name))

    # -- multi-node --

    def is_whole(self, step: int) -> bool:
        """Whether a step is one merged orbax checkpoint of several nodes (any mesh reads it)."""
        try:
            manifest = self.read_manifest(step)
        except (FileNotFoundError, LayoutError):
            return False
        return manifest.nodes > 1 and manifest.layout == GLOBAL_LAYOUT and manifest.merged

    def read_part(self, step: int, rank: int) -> Manifest:
        """Node ``rank``'s part marker of a multi-node step: its files, as its local step has
        them."""
        return parts.read(self, step, rank)

    def part_ranks(self, step: int) -> list[int]:
        return parts.ranks(self, step)

    def commit_parts(self, step: int, *, epoch: int, marker: bytes) -> list[int]:
        return parts.commit(self, step, epoch=epoch, marker=marker)

    # -- restore --

    def download_step(
        self,
        step: int,
        dest: Path,
        *,
        progress: Progress | None = None,
        only: str | None = None,
        whole: bool = False,
    ) -> TransferResult:
        """Download a committed step into ``dest``, verified (``tiered.storage.download``)."""
        return download.download_step(self, step, dest, progress=progress, only=only, whole=whole)

    # -- deletion --

    def delete_step(self, step: int) -> None:
        """Marker first, then the manifest, then the data."""
        self._manifests.pop(step, None)
        self.parts_read.forget(step)
        for rel in (COMMIT_MARKER, MANIFEST_NAME):
            with (
                translate_errors(f"deleting {rel} of {self.step_url(step)}"),
                contextlib.suppress(FileNotFoundError),
            ):
                self.fs.rm_file(self.object_path(step, rel))
        faults.hit("prune-durable")
        with translate_errors(f"deleting {self.step_url(step)}"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.object_path(step), recursive=True)
            self.fs.invalidate_cache(self.root)

"""What the transfer modules need of a durable tier: the ``StepStore`` protocol.

``upload``, ``download`` and ``parts`` are written against this protocol, and ``DurableTier``
(``tiered.storage.durable``) implements it: the modules that move a step's bytes depend on the
shape of a step store, not on the class that composes them, so no module below ``durable``
imports it (import-linter counts type-checking imports too). ``PartCache`` is the part-marker
cache every step store carries for ``parts``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tiered.manifest import FileEntry, Manifest
    from tiered.storage.stores import Store
    from tiered.storage.transfer import MemoryBudget, RateLimiter
    from tiered.types import Topology


class PartCache:
    """Part markers already read, by step and rank, each with the version of the object it was
    read from: node 0 polls a waiting step once a second, and rereads only the markers written
    since (while a stale part waits for its node, the others are not read again and again:
    at a thousand nodes that was a thousand GETs a second)."""

    def __init__(self) -> None:
        self._parts: dict[tuple[int, int], tuple[str, Manifest]] = {}

    def get(self, step: int, rank: int, version: str) -> Manifest | None:
        kept = self._parts.get((step, rank))
        return kept[1] if kept is not None and kept[0] == version and version else None

    def put(self, step: int, rank: int, version: str, part: Manifest) -> None:
        self._parts[(step, rank)] = (version, part)

    def forget(self, step: int) -> None:
        for key in [k for k in self._parts if k[0] == step]:
            del self._parts[key]


class StepStore(Protocol):
    """A durable tier as the transfer modules use it (``DurableTier`` is the one there is)."""

    url: str
    store: Store
    storage_options: dict[str, Any]
    topology: Topology
    concurrency: int
    download_concurrency: int
    limiter: RateLimiter | None
    budget: MemoryBudget
    parts_read: PartCache
    dedup: bool
    dedup_wait: float
    late_ranks: set[int]

    @property
    def fs(self) -> Any: ...
    def object_path(self, step: int, rel: str | None = None) -> str: ...
    def step_url(self, step: int) -> str: ...
    def locate(self, rel: str) -> str: ...
    def node_listing(self, step: int, manifest: Manifest) -> dict[str, Any]: ...
    def parallel(self, fn: Callable[[str], None], items: list[str]) -> None: ...
    def marker_version(self, step: int) -> str | None: ...
    def has_marker(self, step: int) -> bool: ...
    def step_manifest(
        self, step: int, version: str
    ) -> tuple[Manifest | None, str | None, bool]: ...
    def read_manifest(self, step: int) -> Manifest: ...
    def remote_files(self, step: int, *, under: str = "") -> dict[str, dict[str, Any]]: ...
    def digest_of(self, step: int, rel: str) -> FileEntry: ...
    def verify_files(
        self,
        step: int,
        manifest: Manifest,
        *,
        read_back: bool = True,
        locate: Callable[[str], str] | None = None,
    ) -> None: ...

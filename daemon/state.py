"""The daemon's state: one immutable value, replaced (never changed in place) by the loop thread.

Everything that matters for safety is derived again from the tiers at every cycle; what lives
here is what the tiers cannot tell: the last durable listing, steps that failed and when to try
again, multi-node parts waiting for their commit, content pruned under retention (so it is never
uploaded again), and what the status reports (errors, the last promotion, recent prunes). Other
threads (the HTTP server) only ever read a whole value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, TypeVar

from tiered.sidecar import Displaced, DurableStep

K = TypeVar("K")
V = TypeVar("V")


def _empty() -> Mapping[Any, Any]:
    return MappingProxyType({})


def with_item(mapping: Mapping[K, V], key: K, value: V) -> Mapping[K, V]:
    return MappingProxyType({**mapping, key: value})


def without(mapping: Mapping[K, V], *keys: K) -> Mapping[K, V]:
    return MappingProxyType({k: v for k, v in mapping.items() if k not in keys})


@dataclass(frozen=True)
class ErrorNote:
    kind: str
    message: str
    time: float


@dataclass(frozen=True)
class Promotion:
    step: int
    time: float
    seconds: float
    bytes: int
    mb_per_s: float


@dataclass(frozen=True)
class Pruned:
    tier: str
    step: int
    time: float


@dataclass(frozen=True)
class DaemonState:
    durable: tuple[DurableStep, ...] | None = None
    """The last durable listing; None until one succeeds, and again while it fails."""
    durable_error: str | None = None
    list_failures: int = 0
    """Consecutive failed listings of the durable tier, for the backoff."""
    listed_at: float = 0.0
    """When (monotonic) the durable tier was last listed; 0 for never."""
    durable_version: int = 0
    """Counts this daemon's writes to the durable tier: a listing that started before the
    newest write is stale, and is thrown away."""
    displaced: tuple[Displaced, ...] = ()
    epoch: int = 0
    failed: Mapping[int, str] = field(default_factory=_empty)
    retry_at: Mapping[int, float] = field(default_factory=_empty)
    failures: Mapping[int, int] = field(default_factory=_empty)
    """Consecutive transient failures per step, for the backoff."""
    parts: Mapping[int, int] = field(default_factory=_empty)
    missing: Mapping[int, tuple[int, ...]] = field(default_factory=_empty)
    abandoned: frozenset[int] = frozenset()
    pruned: Mapping[int, str] = field(default_factory=_empty)
    recently_pruned: tuple[Pruned, ...] = ()
    last_error: ErrorNote | None = None
    failing_since: float | None = None
    last_promotion: Promotion | None = None
    disk_pressure: bool = False
    scan_requested: bool = False
    trainer_seen: bool = False
    """A trainer was seen while this daemon watched (its lock held, or its JAX coordinator)."""
    coordinator_up: bool = False
    """The JAX coordinator named in ``jax-init-info.txt`` accepted a connection just now."""
    peer_sent: Mapping[int, tuple[int, str | None]] = field(default_factory=_empty)
    """Per partner: the (step, identity) of the newest local step it is known to hold."""
    peer_errors: Mapping[int, str] = field(default_factory=_empty)
    peer_failures: Mapping[int, int] = field(default_factory=_empty)
    peer_retry_at: Mapping[int, float] = field(default_factory=_empty)
    """Per partner: when (monotonic) to try it again after a failure."""

    def error(self, kind: str, message: str, now: float) -> DaemonState:
        return replace(
            self,
            last_error=ErrorNote(kind, message, now),
            failing_since=self.failing_since if self.failing_since is not None else now,
        )

    def durable_with(self, step: DurableStep) -> DaemonState:
        """After a write: the durable listing with ``step`` added or replaced."""
        durable = None
        if self.durable is not None:
            rest = [d for d in self.durable if d.step != step.step]
            durable = tuple(sorted([*rest, step], key=lambda d: d.step))
        return replace(self, durable=durable, durable_version=self.durable_version + 1)

    def durable_without(self, step: int) -> DaemonState:
        """After a write: the durable listing without ``step``."""
        durable = None
        if self.durable is not None:
            durable = tuple(d for d in self.durable if d.step != step)
        return replace(self, durable=durable, durable_version=self.durable_version + 1)

    def pruned_now(self, tier: str, step: int, now: float) -> DaemonState:
        return replace(self, recently_pruned=(*self.recently_pruned, Pruned(tier, step, now))[-20:])

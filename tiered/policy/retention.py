"""Retention rules: small frozen dataclasses, each taking steps oldest first and returning
a keep-mask aligned with them, combined with ``AnyOf``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    pass


# -- preservation rules --------------------------------------------------------------------------


class PreservationRule(Protocol):
    def keep(self, steps: Sequence[int]) -> list[bool]: ...


@dataclass(frozen=True)
class LatestN:
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"LatestN needs n >= 0, got {self.n}")

    def keep(self, steps: Sequence[int]) -> list[bool]:
        newest = set(sorted(steps)[-self.n :]) if self.n else set()
        return [s in newest for s in steps]


@dataclass(frozen=True)
class EveryNSteps:
    n: int

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError(f"EveryNSteps needs n > 0, got {self.n}")

    def keep(self, steps: Sequence[int]) -> list[bool]:
        return [s % self.n == 0 for s in steps]


@dataclass(frozen=True)
class Steps:
    """Keep exactly these steps (pins)."""

    steps: frozenset[int]

    def keep(self, steps: Sequence[int]) -> list[bool]:
        return [s in self.steps for s in steps]


@dataclass(frozen=True)
class KeepAll:
    def keep(self, steps: Sequence[int]) -> list[bool]:
        return [True] * len(steps)


@dataclass(frozen=True)
class AnyOf:
    rules: tuple[PreservationRule, ...]

    def keep(self, steps: Sequence[int]) -> list[bool]:
        mask = [False] * len(steps)
        for rule in self.rules:
            mask = [a or b for a, b in zip(mask, rule.keep(steps), strict=True)]
        return mask


DISPLACED_KEEP = 2
"""Local steps set aside whole (a rollback, a restore agreement on an older step) are kept in
``.tiered/displaced`` for a human to look at: the newest two; older ones are deleted."""

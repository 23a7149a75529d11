"""Which node uploads each key of a multi-node step: the dedup's one decision.

Every node lists its OCDBT database (its index: each key, its value's size and digest). A key
one node holds is that node's. A key several nodes hold (a replicated array's chunks, every
array's metadata) goes to exactly one of them: keys in order of size, largest first (ties by
key), each to the holder with the fewest bytes so far (ties by lowest rank). That is a function
of the indexes alone, so any node computing it gets the same answer, and the upload is even to
within about one chunk where replicated keys dominate. A key whose holders disagree on its
digest is a replica divergence: it goes to the lowest rank, whose entry the merge kept before
the dedup, and is reported.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KeyFacts:
    size: int
    digest: str


Index = dict[str, dict[str, KeyFacts]]
"""root (an item folder) -> key -> facts: one node's index."""


@dataclass(frozen=True)
class Ownership:
    owned: dict[int, dict[str, list[str]]]
    """rank -> root -> the keys it uploads (sorted); every rank of the indexes is present."""
    divergent: list[tuple[str, str, list[int]]] = field(default_factory=list)
    """(root, key, holders) whose holders' digests differ."""

    def bytes_of(self, rank: int, indexes: dict[int, Index]) -> int:
        return sum(
            indexes[rank][root][key].size for root, keys in self.owned[rank].items() for key in keys
        )


def assign(indexes: dict[int, Index]) -> Ownership:
    """Give every key of the nodes' indexes one owner among its holders (see the module)."""
    holders: dict[tuple[str, str], list[int]] = {}
    for rank in sorted(indexes):
        for root, keys in indexes[rank].items():
            for key in keys:
                holders.setdefault((root, key), []).append(rank)
    owned: dict[int, dict[str, list[str]]] = {r: {} for r in indexes}
    load = {r: 0 for r in indexes}
    divergent = []
    shared = []
    for (root, key), ranks in holders.items():
        size = indexes[ranks[0]][root][key].size
        if len(ranks) == 1:
            owned[ranks[0]].setdefault(root, []).append(key)
            load[ranks[0]] += size
            continue
        if len({indexes[r][root][key] for r in ranks}) > 1:
            divergent.append((root, key, ranks))
            owned[ranks[0]].setdefault(root, []).append(key)
            load[ranks[0]] += size
            continue
        shared.append((size, root, key, ranks))
    shared.sort(key=lambda s: (-s[0], s[1], s[2]))
    every = len(indexes)
    heap = [(load[r], r) for r in sorted(indexes)]
    heapq.heapify(heap)
    for size, root, key, ranks in shared:
        if len(ranks) == every:  # held by all (data parallel): the least loaded node, O(log N)
            least, rank = heapq.heappop(heap)
            while least != load[rank]:  # a stale entry: its load grew since it was pushed
                least, rank = heapq.heappop(heap)
        else:
            rank = min(ranks, key=lambda r: (load[r], r))
        owned[rank].setdefault(root, []).append(key)
        load[rank] += size
        heapq.heappush(heap, (load[rank], rank))
    for owned_roots in owned.values():
        for owned_keys in owned_roots.values():
            owned_keys.sort()
    return Ownership(owned=owned, divergent=sorted(divergent))

"""Co-engagement: items that the same users engage with close together in time.

When a user engages positively with item ``b``, every recent positive ``a`` of
that user gains weight towards ``b`` and ``b`` towards ``a``.  Each item keeps
only its ``max_neighbours`` strongest neighbours, so memory stays bounded.

>>> pairs = coengagement_pairs(["a", "b"], "c")
>>> sorted(pairs)
[('a', 'c', 1.0), ('b', 'c', 1.0), ('c', 'a', 1.0), ('c', 'b', 1.0)]
>>> add_neighbours({"x": 1.0}, {"y": 2.0, "x": 0.5}, max_neighbours=1)
{'y': 2.0}
"""
from __future__ import annotations

import heapq
from typing import Iterable

MAX_NEIGHBOURS = 50


def coengagement_pairs(recent_positives: Iterable[str], item: str,
                       weight: float = 1.0) -> list[tuple[str, str, float]]:
    """Directed (from, to, weight) pairs created by a new positive on ``item``."""
    out = []
    for other in recent_positives:
        if other != item:
            out.append((other, item, weight))
            out.append((item, other, weight))
    return out


def add_neighbours(current: dict, deltas: dict, max_neighbours: int = MAX_NEIGHBOURS) -> dict:
    """Add weight deltas to a neighbour map and keep the strongest ``max_neighbours``."""
    merged = dict(current)
    for other, w in deltas.items():
        merged[other] = merged.get(other, 0.0) + w
    if len(merged) > max_neighbours:
        merged = dict(heapq.nlargest(max_neighbours, merged.items(), key=lambda kv: kv[1]))
    return merged

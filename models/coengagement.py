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
#: Co-engagement evidence halves every week, so lists follow current taste.
NEIGHBOUR_HALF_LIFE_S = 7 * 86400.0


def coengagement_pairs(recent_positives: Iterable[str], item: str,
                       weight: float = 1.0) -> list[tuple[str, str, float]]:
    """Directed (from, to, weight) pairs created by a new positive on ``item``."""
    out = []
    for other in recent_positives:
        if other != item:
            out.append((other, item, weight))
            out.append((item, other, weight))
    return out


def add_neighbours(current: dict, deltas: dict, max_neighbours: int = MAX_NEIGHBOURS,
                   decay: float = 1.0) -> dict:
    """Decay the current weights by ``decay``, add the deltas, keep the strongest
    ``max_neighbours``; on a tie the neighbour just seen wins (fresher evidence).

    >>> add_neighbours({"old": 1.0}, {"new": 1.0}, max_neighbours=1)
    {'new': 1.0}
    >>> add_neighbours({"old": 4.0}, {"new": 1.0}, max_neighbours=1, decay=0.2)
    {'new': 1.0}
    """
    merged = {k: w * decay for k, w in current.items()}
    for other, w in deltas.items():
        merged[other] = merged.get(other, 0.0) + w
    if len(merged) > max_neighbours:
        merged = dict(heapq.nlargest(max_neighbours, merged.items(),
                                     key=lambda kv: (kv[1], kv[0] in deltas)))
    return merged


def neighbour_decay(last_ts: float | None, now: float,
                    half_life: float = NEIGHBOUR_HALF_LIFE_S) -> float:
    """How much older co-engagement evidence counts at ``now``.

    >>> neighbour_decay(0.0, 7 * 86400.0)
    0.5
    """
    if last_ts is None or now <= last_ts:
        return 1.0
    return 0.5 ** ((now - last_ts) / half_life)

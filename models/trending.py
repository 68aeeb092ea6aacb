"""Trending: time-decayed, event-weighted engagement per surface.

Each event adds its type's weight to the item's score on that surface; scores
halve every ``half_life`` seconds, so "trending" means "engaged with a lot,
recently" (an exponentially weighted window).  Reports and see_less count
against an item.

>>> board = TrendingBoard(half_life=60.0)
>>> for _ in range(3): board.add("hot", 1.0, ts=0.0)
>>> board.add("cold", 1.0, ts=-600.0)
>>> [item for item, _ in board.top(2, now=0.0)]
['hot', 'cold']
"""
from __future__ import annotations

import heapq
from typing import Iterable, Optional

EVENT_WEIGHTS = {
    "impression": 0.05, "click": 1.0, "dwell": 0.5, "like": 2.0, "save": 3.0,
    "share": 3.0, "comment": 2.0, "follow": 2.0, "see_less": -2.0, "report": -5.0,
}
DEFAULT_HALF_LIFE_S = 3600.0


def event_weight(event_type: str, dwell_ms: Optional[int] = None) -> float:
    """Trending weight of one event; long dwells count more, capped at 30 s."""
    w = EVENT_WEIGHTS[event_type]
    if event_type == "dwell" and dwell_ms is not None:
        w *= min(dwell_ms, 30_000) / 10_000.0
    return w


def decayed(score: float, since: float, now: float, half_life: float) -> float:
    """``score`` observed at ``since``, as seen at ``now``."""
    if now <= since:
        return score
    return score * 0.5 ** ((now - since) / half_life)


def merge_score(old: Optional[list], weight: float, ts: float, half_life: float) -> list:
    """Add ``weight`` at ``ts`` to a stored ``[score, ts]`` pair; out-of-order safe."""
    if old is None:
        return [weight, ts]
    score, at = old
    if ts >= at:
        return [decayed(score, at, ts, half_life) + weight, ts]
    return [score + decayed(weight, ts, at, half_life), at]


class TrendingBoard:
    """Scores for one surface on one partition, bounded to the best ``capacity`` items."""

    def __init__(self, half_life: float = DEFAULT_HALF_LIFE_S, capacity: int = 2000):
        self.half_life = half_life
        self.capacity = capacity
        self.scores: dict[str, list] = {}
        self.authors: dict[str, Optional[str]] = {}

    def add(self, item: str, weight: float, ts: float, author: Optional[str] = None) -> None:
        self.scores[item] = merge_score(self.scores.get(item), weight, ts, self.half_life)
        if author is not None:
            self.authors[item] = author
        if len(self.scores) > 2 * self.capacity:
            self._prune()

    def set(self, item: str, score_ts: list, author: Optional[str] = None) -> None:
        self.scores[item] = list(score_ts)
        if author is not None:
            self.authors[item] = author
        if len(self.scores) > 2 * self.capacity:
            self._prune()

    def top(self, n: int, now: float) -> list[tuple[str, float]]:
        ranked = ((item, decayed(s, t, now, self.half_life)) for item, (s, t) in self.scores.items())
        return heapq.nlargest(n, ((i, s) for i, s in ranked if s > 0), key=lambda x: x[1])

    def _prune(self) -> None:
        # Compare every item at the board's latest time: decayed() never decays
        # a score stamped later than "now", so an earlier "now" would be unfair.
        now = max(t for _, t in self.scores.values())
        keep = dict(self.top(self.capacity, now))
        self.scores = {i: v for i, v in self.scores.items() if i in keep}
        self.authors = {i: a for i, a in self.authors.items() if i in keep}

    def snapshot(self, n: int, now: float) -> dict:
        """The compact record other workers read: top ``n`` as of ``now``."""
        return {"ts": now, "half_life": self.half_life,
                "items": [[i, s, self.authors.get(i)] for i, s in self.top(n, now)]}


def merge_snapshots(snapshots: Iterable[dict], n: int, now: float) -> list[tuple[str, float, Optional[str]]]:
    """Combine per-partition snapshots of one surface into one top-``n`` list."""
    best: dict[str, tuple[float, Optional[str]]] = {}
    for snap in snapshots:
        for item, score, author in snap["items"]:
            s = decayed(score, snap["ts"], now, snap["half_life"])
            if item not in best or s > best[item][0]:
                best[item] = (s, author)
    top = heapq.nlargest(n, best.items(), key=lambda kv: kv[1][0])
    return [(item, s, author) for item, (s, author) in top]

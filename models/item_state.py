"""The item-side fold: events -> per-item deltas -> each item's stored stats.

Ingest turns each event into deltas of the items it touches
(:func:`add_item_deltas`: trending per surface and region, quality counts,
co-engagement with the user's recent positives); the item-stats agent folds
each delta into the item's stats (:func:`apply_delta`) and publishes their
compact :func:`profile`.  Pure functions of plain arguments, so the agents and
the offline benchmarks run the same fold.

Two likes by one user, folded:

>>> h, deltas = UserHistory(), {}
>>> for ev in (EngagementEvent("e1", "u", "a", "like", "explore", 0.0, author_id="A"),
...            EngagementEvent("e2", "u", "b", "like", "explore", 60.0, author_id="B")):
...     add_item_deltas(deltas, h, ev, half_life=3600.0)
...     h.apply(ev.item_id, ev.event_type, ev.ts, ev.author_id)
>>> stats, changed = apply_delta(None, deltas["a"], half_life=3600.0)
>>> profile(stats), changed
({'author': 'A', 'q': {'pos': 1}, 'first': 0.0, 'nbrs': [['b', 1.0, 'B']]}, True)
"""
from __future__ import annotations

import orjson

from models.coengagement import MAX_NEIGHBOURS, add_neighbours, coengagement_pairs, neighbour_decay
from models.history import UserHistory
from models.trending import decayed, event_weight, merge_score
from schemas.events import EngagementEvent, NEGATIVE_TYPES, POSITIVE_TYPES

#: How many of a user's recent positives pair with a new one for co-engagement.
COENGAGEMENT_LOOKBACK = 10
#: Event type -> the quality counter it feeds (:mod:`models.quality` reads them).
QUALITY_KEYS = {**{t: "pos" for t in sorted(POSITIVE_TYPES)}, "impression": "imp",
                **{t: t for t in sorted(NEGATIVE_TYPES)}}


def add_item_deltas(deltas: dict, history: UserHistory, ev: EngagementEvent, half_life: float,
                    lookback: int = COENGAGEMENT_LOOKBACK) -> None:
    """Fold one event into a batch's per-item deltas; ``history`` is the user's
    history *before* ``ev`` (the caller applies ``ev`` to it afterwards).

    >>> deltas = {}
    >>> add_item_deltas(deltas, UserHistory(),
    ...                 EngagementEvent("e", "u", "i", "click", "home", 5.0, region="eu"), 60.0)
    >>> deltas["i"]["trend"], deltas["i"]["counts"]
    ({'home': [1.0, 5.0], 'home@eu': [1.0, 5.0]}, {'click': 1})
    """
    d = deltas.setdefault(ev.item_id, {"author": ev.author_id, "trend": {}, "co": {}})
    if ev.author_id is not None:
        d["author"] = ev.author_id
    counts = d.setdefault("counts", {})
    counts[ev.event_type] = counts.get(ev.event_type, 0) + 1
    weight = event_weight(ev.event_type, ev.dwell_ms)
    # Trending per surface, and per surface and region when the event names one.
    for key in (ev.surface, f"{ev.surface}@{ev.region}") if ev.region else (ev.surface,):
        d["trend"][key] = merge_score(d["trend"].get(key), weight, ev.ts, half_life)
    if ev.event_type in POSITIVE_TYPES:
        recent = history.positives[-lookback:]
        authors = {p[0]: p[2] for p in recent}
        for src, dst, w in coengagement_pairs([p[0] for p in recent], ev.item_id):
            dd = deltas.setdefault(src, {"author": None, "trend": {}, "co": {}})
            dst_author = ev.author_id if dst == ev.item_id else authors.get(dst)
            prev = dd["co"].get(dst)
            dd["co"][dst] = [(prev[0] if prev else 0.0) + w, dst_author]


def decode_bundle(raw: bytes):
    """A ``{item: delta}`` bundle, or a string saying why ``raw`` is not one.

    >>> decode_bundle(b'{"i1": {"trend": {"explore": [1.0, 5.0]}}}')["i1"]["trend"]
    {'explore': [1.0, 5.0]}
    >>> decode_bundle(b'{"i1": {"trend": 3}}')
    "item delta for 'i1' is malformed: 'trend' must map surface to [score, ts]"
    """
    try:
        bundle = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return f"item delta bundle is not JSON: {exc}"
    if not isinstance(bundle, dict):
        return "item delta bundle must be a JSON object {item_id: delta}"
    for item, delta in bundle.items():
        if not isinstance(delta, dict):
            return f"item delta for {item!r} must be an object"
        trend = delta.get("trend", {})
        if not isinstance(trend, dict) or not all(
                isinstance(v, list) and len(v) == 2 for v in trend.values()):
            return f"item delta for {item!r} is malformed: 'trend' must map surface to [score, ts]"
        co = delta.get("co", {})
        if not isinstance(co, dict) or not all(
                isinstance(v, list) and len(v) == 2 for v in co.values()):
            return f"item delta for {item!r} is malformed: 'co' must map item to [weight, author]"
    return bundle


def apply_delta(stats: dict | None, delta: dict, half_life: float,
                max_neighbours: int = MAX_NEIGHBOURS) -> tuple[dict, bool]:
    """Merge one item delta into the item's stored stats; says if its profile changed.

    Trend scores decay with ``half_life``; neighbour weights decay by the event
    time between deltas (:func:`~models.coengagement.neighbour_decay`), so the
    lists follow current taste.

    >>> stats, _ = apply_delta(None, {"author": "A", "trend": {"explore": [2.0, 0.0]},
    ...                               "counts": {"like": 1}}, half_life=60.0)
    >>> stats, changed = apply_delta(stats, {"trend": {"explore": [1.0, 60.0]}}, half_life=60.0)
    >>> stats["trend"], stats["q"], changed
    ({'explore': [2.0, 60.0]}, {'pos': 1}, False)
    """
    stats = stats or {"author": None, "trend": {}, "nbrs": {}}
    author_changed = delta.get("author") is not None and delta["author"] != stats["author"]
    if author_changed:
        stats["author"] = delta["author"]
    counts = delta.get("counts") or {}
    if counts:
        q = stats.setdefault("q", {})
        for event_type, n in counts.items():
            key = QUALITY_KEYS.get(event_type)
            if key is not None:
                q[key] = q.get(key, 0) + n
    for surface, (score, ts) in delta.get("trend", {}).items():
        if ts < stats.get("first", float("inf")):
            stats["first"] = ts  # when the item was first engaged with: its age
        old = stats["trend"].get(surface)
        if old is None:
            stats["trend"][surface] = [score, ts]
        else:
            stats["trend"][surface] = merge_score(old, score, ts, half_life)
    co = delta.get("co") or {}
    if co:
        weights = {k: v[0] for k, v in stats["nbrs"].items()}
        authors = {k: v[1] for k, v in stats["nbrs"].items()}
        for other, (_, author) in co.items():
            if author is not None or other not in authors:
                authors[other] = author
        now = max((ts for _, ts in delta.get("trend", {}).values()), default=None)
        decay = neighbour_decay(stats.get("nbrs_ts"), now) if now is not None else 1.0
        kept = add_neighbours(weights, {k: v[0] for k, v in co.items()}, max_neighbours,
                              decay=decay)
        stats["nbrs"] = {k: [w, authors.get(k)] for k, w in kept.items()}
        if now is not None:
            stats["nbrs_ts"] = max(now, stats.get("nbrs_ts") or now)
    return stats, bool(co) or bool(counts) or author_changed


def total_score(trend: dict, half_life: float) -> list:
    """An item's engagement over all surfaces as one ``[score, ts]``.

    >>> total_score({"a": [1.0, 10.0], "b": [2.0, 10.0]}, 60.0)
    [3.0, 10.0]
    """
    latest = max(ts for _, ts in trend.values())
    return [sum(decayed(s, ts, latest, half_life) for s, ts in trend.values()), latest]


def profile(stats: dict) -> dict:
    """The compact, shared view of an item: author, quality counts, first engagement,
    neighbours strongest first (what every worker reads from ``item.profiles``).

    >>> profile({"author": "A", "trend": {}, "nbrs": {"x": [1.0, "X"], "y": [2.0, None]}})
    {'author': 'A', 'q': {}, 'first': None, 'nbrs': [['y', 2.0, None], ['x', 1.0, 'X']]}
    """
    ranked = sorted(stats["nbrs"].items(), key=lambda kv: -kv[1][0])
    return {"author": stats.get("author"), "q": stats.get("q", {}), "first": stats.get("first"),
            "nbrs": [[o, w, a] for o, (w, a) in ranked]}

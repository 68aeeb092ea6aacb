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
    bundle = _load_bundle(raw)
    return bundle if isinstance(bundle, str) else _items_error(bundle) or bundle


def _load_bundle(raw: bytes):
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return f"item delta bundle is not JSON: {exc}"


def _items_error(bundle) -> str | None:
    """Why ``bundle`` is not ``{item: delta}``, or None."""
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
    return None


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


# --------------------------------------------------------------------------- exactly-once deltas
#
# A delta says which events it folds: its source (``"events/3"``, the ingest topic
# partition) and the first and last position there (``[offset, index in the
# message]``).  Each item's stats keep, per source, the last position applied to
# that item (``stats["src"]``), inside the same record as the counts, so the
# count and its high-water mark are one table write and land or vanish together.
# A delta at or below the mark was applied already (a redelivery) and is skipped.
# This needs two things from the sender, which streams.ingest guarantees: deltas of
# one source reach an item's partition in position order (one producer per source
# partition at a time, Kafka keeps order within a partition), and a delta never
# straddles the mark (a range folded once is never re-folded with other bounds:
# events that may have been sent before go one per delta).

#: Bundle format version; a bundle without one is the unsourced format before it.
BUNDLE_VERSION = 2
#: Bundles are split so a message stays far below the broker's 1 MB limit.
MAX_BUNDLE_BYTES = 256 * 1024


class SourcedDeltas:
    """A batch's item deltas, each part tagged with the source positions it folds.

    Events of a source in ``single`` mode get one part each (their range may have
    been folded before with other bounds); otherwise all of the batch's events of
    the source fold into one part whose range covers every position the batch
    held, used or not.

    >>> parts = SourcedDeltas(single={"events/1"})
    >>> h = UserHistory()
    >>> for pos, src in (([7, 0], "events/0"), ([9, 0], "events/0"), ([4, 1], "events/1")):
    ...     parts.add(src, pos, h, EngagementEvent(f"e{pos}", "u", "i", "click", "home", 5.0), 60.0)
    >>> [(p["src"], p["from"], p["to"], p["items"]["i"]["counts"]) for p in parts.parts()]
    [('events/0', [7, 0], [9, 0], {'click': 2}), ('events/1', [4, 1], [4, 1], {'click': 1})]
    """

    def __init__(self, single=()):
        self.single = set(single)
        self._folded: dict[str, dict] = {}
        self._singles: list[dict] = []

    def note(self, source: str, pos: list) -> None:
        """Widen the folded range of ``source`` to ``pos`` (an event that adds no delta)."""
        if source in self.single:
            return
        part = self._folded.setdefault(source, {"src": source, "from": pos, "to": pos, "items": {}})
        part["from"], part["to"] = min(part["from"], pos), max(part["to"], pos)

    def add(self, source: str, pos: list, history: UserHistory, ev: EngagementEvent,
            half_life: float, *, single: bool = False) -> None:
        """Fold ``ev`` (at ``pos`` in ``source``; ``history`` as before it) into its part."""
        if single or source in self.single:
            part = {"src": source, "from": pos, "to": pos, "items": {}}
            self._singles.append(part)
        else:
            self.note(source, pos)
            part = self._folded[source]
        add_item_deltas(part["items"], history, ev, half_life)

    def parts(self) -> list[dict]:
        """Every part, in position order within each source."""
        return sorted(self._singles + list(self._folded.values()),
                      key=lambda p: (p["src"], p["to"]))

    def count(self) -> int:
        return sum(len(p["items"]) for p in self._singles + list(self._folded.values()))


def bundle_parts(parts: list[dict], partition_of, max_bytes: int = MAX_BUNDLE_BYTES
                 ) -> dict[int, list[bytes]]:
    """Encoded bundles per item partition: each part's items split by the partition
    that owns them, parts kept in order, a new message whenever one grows past
    ``max_bytes`` (a part too big alone is split by item: each item's mark is its own).

    >>> part = {"src": "events/0", "from": [1, 0], "to": [2, 0], "items": {"a": {}, "b": {}}}
    >>> out = bundle_parts([part], lambda item: 0, max_bytes=60)
    >>> [len(decode_parts(raw)) for raw in out[0]]
    [1, 1]
    """
    out: dict[int, list[bytes]] = {}
    pending: dict[int, list] = {}  # partition -> [parts of the message being built, size]

    def flush(partition: int) -> None:
        msg_parts, _ = pending.pop(partition)
        out.setdefault(partition, []).append(
            orjson.dumps({"v": BUNDLE_VERSION, "parts": msg_parts}))

    for part in parts:
        by_partition: dict[int, dict] = {}
        for item, delta in part["items"].items():
            by_partition.setdefault(partition_of(item), {})[item] = delta
        for partition, items in by_partition.items():
            head = {"src": part["src"], "from": part["from"], "to": part["to"]}
            chunk: dict = {}
            size = len(orjson.dumps(head)) + 20
            for item, delta in items.items():
                item_size = len(orjson.dumps({item: delta}))
                if chunk and size + item_size > max_bytes:
                    _add_part(pending, partition, {**head, "items": chunk}, size, max_bytes, flush)
                    chunk, size = {}, len(orjson.dumps(head)) + 20
                chunk[item] = delta
                size += item_size
            _add_part(pending, partition, {**head, "items": chunk}, size, max_bytes, flush)
    for partition in list(pending):
        flush(partition)
    return out


def _add_part(pending: dict, partition: int, part: dict, size: int, max_bytes: int, flush) -> None:
    if partition in pending and pending[partition][1] + size > max_bytes:
        flush(partition)
    entry = pending.setdefault(partition, [[], 0])
    entry[0].append(part)
    entry[1] += size


def decode_parts(raw: bytes):
    """The sourced parts of a bundle, or a string saying why ``raw`` is not one.

    A bundle of the unsourced format before :data:`BUNDLE_VERSION` becomes one
    part with source ``None`` (applied as before, without the redelivery check);
    a bundle of a newer format is refused, never guessed at.

    >>> decode_parts(b'{"i": {"trend": {"explore": [1.0, 5.0]}}}')[0]["src"] is None
    True
    >>> decode_parts(b'{"v": 3, "parts": []}')
    'item delta bundle version 3 is newer than this worker reads (2)'
    """
    bundle = _load_bundle(raw)
    if isinstance(bundle, str):
        return bundle
    if not (isinstance(bundle, dict) and isinstance(bundle.get("v"), int)
            and isinstance(bundle.get("parts"), list)):
        error = _items_error(bundle)
        return error or [{"src": None, "from": None, "to": None, "items": bundle}]
    if bundle["v"] != BUNDLE_VERSION:
        return (f"item delta bundle version {bundle['v']} is newer than this worker reads "
                f"({BUNDLE_VERSION})" if bundle["v"] > BUNDLE_VERSION
                else f"item delta bundle version {bundle['v']} is not one this worker reads")
    parts = bundle["parts"]
    for part in parts:
        if not (isinstance(part, dict) and isinstance(part.get("src"), str)
                and _is_position(part.get("from")) and _is_position(part.get("to"))):
            return "item delta part must name its source and its first and last position"
        error = _items_error(part.get("items"))
        if error:
            return error
    return parts


def _is_position(pos) -> bool:
    return isinstance(pos, list) and len(pos) == 2 and all(isinstance(x, int) for x in pos)


def apply_sourced(stats: dict | None, delta: dict, source: str | None, first: list | None,
                  last: list | None, half_life: float) -> tuple[dict | None, bool, str]:
    """:func:`apply_delta` once per source position: ``(stats, profile changed, verdict)``.

    The verdict is ``"applied"``, ``"duplicate"`` (everything up to ``last`` was
    applied to this item already: skipped) or ``"overlap"`` (the delta starts at
    or below the item's mark and ends above it: the sender broke its promise;
    applied, since it holds events never applied, and counted by the caller).

    >>> d = {"trend": {"home": [1.0, 5.0]}, "counts": {"click": 1}}
    >>> s, _, v1 = apply_sourced(None, d, "events/0", [3, 0], [3, 0], 60.0)
    >>> s, _, v2 = apply_sourced(s, d, "events/0", [3, 0], [3, 0], 60.0)
    >>> s, _, v3 = apply_sourced(s, d, "events/0", [4, 0], [4, 0], 60.0)
    >>> v1, v2, v3, s["q"], s["src"]
    ('applied', 'duplicate', 'applied', {'pos': 2}, {'events/0': [4, 0]})
    """
    mark = (stats or {}).get("src", {}).get(source) if source is not None else None
    if mark is not None and last <= mark:
        return stats, False, "duplicate"
    verdict = "overlap" if mark is not None and first <= mark else "applied"
    stats, changed = apply_delta(stats, delta, half_life)
    if source is not None:
        stats.setdefault("src", {})[source] = last
    return stats, changed, verdict


def seed_board(board, snapshot: dict | None) -> int:
    """Put a published snapshot's items on ``board`` where the board has none yet.

    A board made after a restart holds only what was applied since; the last
    published snapshot holds the rest.  Items on the board already came from the
    item's own stats and are newer, so they are kept.  Returns how many were added.

    >>> from models.trending import TrendingBoard
    >>> board = TrendingBoard(60.0)
    >>> board.set("new", [1.0, 10.0], "A")
    >>> seed_board(board, {"ts": 5.0, "items": [["old", 2.0, "B"], ["new", 9.0, "A"]]})
    1
    >>> sorted(board.scores.items())
    [('new', [1.0, 10.0]), ('old', [2.0, 5.0])]
    """
    added = 0
    for item, score, author in (snapshot or {}).get("items", []):
        if item not in board.scores:
            board.set(item, [score, snapshot["ts"]], author)
            added += 1
    return added

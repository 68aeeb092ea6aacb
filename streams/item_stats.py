"""Item-side state, owned by the item's partition and shared with every worker.

Consumes ``item.deltas`` (bundles of per-item deltas, each on the partition
that owns its items, see :func:`models.item_state.bundle_parts`), keeps
each item's trending scores, quality counts and co-engagement neighbours in
the ``item_stats`` table (the fold is :mod:`models.item_state`), and publishes what every worker needs, coalesced per
interval: per-partition trending snapshots (``trending.snapshots``), each
changed item's profile (``item.profiles``) and each author's best recent items
per partition (``author.items``).

Exactly once on the item side: a redelivered bundle (ingest killed after
sending it, before committing its input offsets; or this agent killed after
applying it, before committing ``item.deltas`` offsets) must not count twice.
Each part of a bundle names its source (the ``events`` partition) and the
positions it folds, and each item's record in ``item_stats`` keeps, per source,
the last position applied to it (:func:`models.item_state.apply_sourced`).
The mark lives in the item's own record, so the counts and the mark are one
table write, one changelog message: both land or neither does.  What this relies
on: Kafka keeps order within a partition, so one source's parts reach an item's
partition in position order; Faust sends a table's changelog writes before it
commits the input offsets they came from (a committed input implies its writes
landed); and ingest never folds a range it may have sent before with new bounds
(see :mod:`streams.ingest`).  Records written before marks existed have none and
take every delta, as before; bundles of the unsourced format are applied
unchecked and counted in ``item_deltas_unsourced``.

A batch that fails is retried bundle by bundle, and only the bundles that fail
alone go to the dead-letter topic (:mod:`streams.agent_errors`).  A re-drive sends
them back by key, so a bundle that lands on a partition not owning its items is
re-routed to theirs with its marks (``item_deltas_rerouted``).

Trending boards live in memory.  After a restart they are seeded from the
last published snapshot, but only once the shared view has caught up with the
snapshot topic: a board made before that is not published until it is seeded,
so an empty board never overwrites the compacted snapshot.
"""
from __future__ import annotations

import time

import orjson

# The fold is pure (models.item_state); this module keeps table I/O, boards and publishing.
from models.item_state import (apply_delta, apply_sourced, bundle_parts, decode_parts,  # noqa: F401
                               profile, seed_board, total_score)
from models.trending import TrendingBoard
from schemas.topics import (AUTHOR_ITEMS, ITEM_DELTAS, ITEM_PROFILES, TRENDING_SNAPSHOTS,
                            item_deltas_key, partition_for)
from streams import metrics
from streams.agent_errors import Policy, guarded
from streams.app import app
from streams.context import use_event
from streams.deadletters import send_dead_letter
from streams.settings import settings
from streams.view import view

item_deltas_topic = app.topic(ITEM_DELTAS)
trending_topic = app.topic(TRENDING_SNAPSHOTS)
profiles_topic = app.topic(ITEM_PROFILES)
author_items_topic = app.topic(AUTHOR_ITEMS)
item_stats = app.Table("item_stats", default=None, partitions=settings.partitions)

SNAPSHOT_SIZE = 500
AUTHOR_ITEMS_SIZE = 50
#: (surface, partition) -> board; in memory, re-seeded from the last snapshot.
boards: dict[tuple[str, int], TrendingBoard] = {}
#: (author, partition) -> board of the author's items by total engagement.
author_boards: dict[tuple[str, int], TrendingBoard] = {}
_dirty: set[tuple[str, int]] = set()
_dirty_authors: set[tuple[str, int]] = set()
#: item -> stats of items whose profile changed since the last publish.
_dirty_profiles: dict[str, dict] = {}
_last_publish = 0.0
#: Boards made before the shared view caught up, as ("trend"|"author", key): seeded,
#: and only then published, once it has (see seed_late).
_unseeded: set[tuple[str, tuple[str, int]]] = set()


def board_for(surface: str, partition: int) -> TrendingBoard:
    key = (surface, partition)
    board = boards.get(key)
    if board is None:
        board = boards[key] = TrendingBoard(settings.trending_half_life_s)
        _seed_or_defer("trend", key, board)
    return board


def author_board_for(author: str, partition: int) -> TrendingBoard:
    key = (author, partition)
    board = author_boards.get(key)
    if board is None:
        board = author_boards[key] = TrendingBoard(settings.trending_half_life_s,
                                                   capacity=AUTHOR_ITEMS_SIZE)
        _seed_or_defer("author", key, board)
    return board


def _seed_or_defer(kind: str, key: tuple[str, int], board: TrendingBoard) -> None:
    if view.caught_up:
        seed_board(board, _last_snapshot(kind, key))
    else:
        _unseeded.add((kind, key))


def _last_snapshot(kind: str, key: tuple[str, int]):
    name = f"{key[0]}/{key[1]}"
    return view.trending_snapshot(name) if kind == "trend" else view.author_snapshot(name)


def seed_late() -> None:
    """Seed the boards made before the shared view caught up, now that it has."""
    if not _unseeded or not view.caught_up:
        return
    for kind, key in sorted(_unseeded):
        seed_board((boards if kind == "trend" else author_boards)[key], _last_snapshot(kind, key))
        metrics.counters["boards_seeded_late"] += 1
    _unseeded.clear()


@app.agent(item_deltas_topic)
async def item_stats_agent(stream):
    async for batch in stream.take_events(settings.item_batch, within=0.05):
        # Sourced bundles are applied at most once (their marks), so retrying a failed
        # batch's bundles one by one is safe; only those that fail alone are parked.
        await guarded("item_stats", apply_batch, batch, Policy.ONE_BY_ONE)
        # A failed publish loses no data: the stats are in the table, and what was not
        # sent stays marked for the next publish (the timer's, at the latest).
        await guarded("item_stats_publish", lambda _: publish_due(), [], Policy.DROP)


async def apply_batch(batch) -> None:
    # item -> (an event from the item's partition, [(part, delta) in arrival order])
    merged: dict[str, tuple] = {}
    for event in batch:
        parts = decode_parts(event.value)
        if isinstance(parts, str):
            # Only the ingest agent writes here, so this is a bug or a stray producer.
            metrics.counters["bad_item_deltas"] += 1
            await send_dead_letter(event.value, parts, event.message)
            continue
        if misrouted(event.message, parts, item_partition):
            await reroute(parts)
            continue
        for part in parts:
            for item, delta in part["items"].items():
                merged.setdefault(item, (event, []))[1].append((part, delta))
    applied = 0
    for item, (event, deltas) in merged.items():
        use_event(event)
        partition = event.message.partition
        stats = item_stats.get(item)
        profile_changed = touched = False
        for part, delta in deltas:
            stats, changed, verdict = apply_sourced(stats, delta, part["src"], part["from"],
                                                    part["to"], settings.trending_half_life_s)
            if verdict == "duplicate":
                metrics.counters["item_deltas_skipped"] += 1
                continue
            if verdict == "overlap":
                metrics.counters["item_deltas_overlapping"] += 1
            if part["src"] is None:
                metrics.counters["item_deltas_unsourced"] += 1
            applied += 1
            touched = True
            profile_changed |= changed
            for surface in delta.get("trend", {}):
                board_for(surface, partition).set(item, stats["trend"][surface], stats["author"])
                _dirty.add((surface, partition))
        if not touched:
            continue
        item_stats[item] = stats
        if profile_changed:
            _dirty_profiles[item] = stats
        if stats["author"] is not None and stats["trend"]:
            author_board_for(stats["author"], partition).set(
                item, total_score(stats["trend"], settings.trending_half_life_s), stats["author"])
            _dirty_authors.add((stats["author"], partition))
    metrics.counters["item_deltas_applied"] += applied


def misrouted(msg, parts: list[dict], partition_of) -> bool:
    """Some of the bundle's items belong to another partition: a re-driven dead letter
    lands where its key hashes, not where ingest sent it.  The key is looked at
    first (hashing every item of every bundle would slow the hot path); unsourced
    parts (from before marks) are applied where they arrive, as they always were.

    >>> from types import SimpleNamespace as Msg
    >>> part = {"src": "events/0", "from": [1, 0], "to": [1, 0], "items": {"a": {}}}
    >>> [misrouted(Msg(key=b"items-p2", partition=p), [part], {"a": 2}.get) for p in (2, 0)]
    [False, True]
    """
    return (msg.key != item_deltas_key(msg.partition)
            and all(p["src"] is not None for p in parts)
            and any(partition_of(item) != msg.partition for p in parts for item in p["items"]))


def item_partition(item: str) -> int:
    return partition_for(item, settings.partitions)


async def reroute(parts: list[dict]) -> None:
    """Send parts to their items' partitions, marks kept: applied there at most once."""
    for partition, messages in bundle_parts(parts, item_partition).items():
        for value in messages:
            await item_deltas_topic.send(key=item_deltas_key(partition), value=value,
                                         partition=partition)
            metrics.counters["item_deltas_rerouted"] += 1


async def publish_due() -> None:
    """Publish what changed, at most once per ``snapshot_interval_s``."""
    global _last_publish
    now = time.time()
    if (_dirty or _dirty_profiles or _dirty_authors) and now - _last_publish >= settings.snapshot_interval_s:
        await publish_snapshots(now)
        _last_publish = now


async def publish_snapshots(now: float) -> None:
    """Publish what changed since the last call: trending boards and neighbour lists.

    Coalescing to one message per item per interval keeps a hot item, which
    changes in nearly every batch, from flooding every worker's shared view.
    """
    seed_late()
    # Take the pending sets first: the timer and the agent may both publish, and
    # whatever is marked while we await sends belongs to the next round.  A board
    # not seeded yet stays marked: publishing it would overwrite the last snapshot.
    profiles = dict(_dirty_profiles)
    boards_due = sorted(k for k in _dirty if ("trend", k) not in _unseeded)
    authors_due = sorted(k for k in _dirty_authors if ("author", k) not in _unseeded)
    _dirty_profiles.clear()
    _dirty.difference_update(boards_due)
    _dirty_authors.difference_update(authors_due)
    try:
        for item, stats in profiles.items():
            await profiles_topic.send(key=item.encode(), value=orjson.dumps(profile(stats)))
        for author, partition in authors_due:
            snap = author_boards[(author, partition)].snapshot(AUTHOR_ITEMS_SIZE, now)
            await author_items_topic.send(key=f"{author}/{partition}".encode(),
                                          value=orjson.dumps(snap), partition=0)
        for surface, partition in boards_due:
            snap = boards[(surface, partition)].snapshot(SNAPSHOT_SIZE, now)
            await trending_topic.send(key=f"{surface}/{partition}".encode(),
                                      value=orjson.dumps(snap), partition=0)
    except Exception:
        # Mark it all again for the next round: the topics are compacted, so what
        # did go out is only sent twice (a profile marked since is the newer one).
        for item, stats in profiles.items():
            _dirty_profiles.setdefault(item, stats)
        _dirty.update(boards_due)
        _dirty_authors.update(authors_due)
        raise
    metrics.counters["profiles_published"] += len(profiles)
    metrics.counters["author_snapshots"] += len(authors_due)
    metrics.counters["trending_snapshots"] += len(boards_due)


@app.timer(1.0)
async def flush_snapshots():
    """Publish boards that changed after the last batch's rate-limited publish."""
    global _last_publish
    if _dirty or _dirty_profiles or _dirty_authors:
        now = time.time()
        await publish_snapshots(now)
        _last_publish = now

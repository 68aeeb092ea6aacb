"""Item-side state, owned by the item's partition and shared with every worker.

Consumes ``item.deltas`` (bundles of per-item deltas, each on the partition
that owns its items, see :func:`streams.ingest.bundle_by_partition`), keeps
each item's trending scores, quality counts and co-engagement neighbours in
the ``item_stats`` table (the fold is :mod:`models.item_state`), and publishes what every worker needs, coalesced per
interval: per-partition trending snapshots (``trending.snapshots``), each
changed item's profile (``item.profiles``) and each author's best recent items
per partition (``author.items``).
"""
from __future__ import annotations

import time

import orjson

# The fold is pure (models.item_state); this module keeps table I/O, boards and publishing.
from models.item_state import apply_delta, decode_bundle, profile, total_score
from models.trending import TrendingBoard
from schemas.topics import AUTHOR_ITEMS, ITEM_DELTAS, ITEM_PROFILES, TRENDING_SNAPSHOTS
from streams import metrics
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


def board_for(surface: str, partition: int) -> TrendingBoard:
    key = (surface, partition)
    board = boards.get(key)
    if board is None:
        board = boards[key] = TrendingBoard(settings.trending_half_life_s)
        last = view.trending_snapshot(f"{surface}/{partition}")
        for item, score, author in (last or {}).get("items", []):
            board.set(item, [score, last["ts"]], author)
    return board


def author_board_for(author: str, partition: int) -> TrendingBoard:
    key = (author, partition)
    board = author_boards.get(key)
    if board is None:
        board = author_boards[key] = TrendingBoard(settings.trending_half_life_s,
                                                   capacity=AUTHOR_ITEMS_SIZE)
        last = view.author_snapshot(f"{author}/{partition}")
        for item, score, _ in (last or {}).get("items", []):
            board.set(item, [score, last["ts"]], author)
    return board


@app.agent(item_deltas_topic)
async def item_stats_agent(stream):
    async for batch in stream.take_events(500, within=0.05):
        try:
            await apply_batch(batch)
        except Exception:
            metrics.counters["item_stats_errors"] += 1
            app.logger.exception("item stats batch of %d messages failed", len(batch))


async def apply_batch(batch) -> None:
    global _last_publish
    # item -> (an event from the item's partition, [deltas in arrival order])
    merged: dict[str, tuple] = {}
    for event in batch:
        bundle = decode_bundle(event.value)
        if isinstance(bundle, str):
            # Only the ingest agent writes here, so this is a bug or a stray producer.
            metrics.counters["bad_item_deltas"] += 1
            await send_dead_letter(event.value, bundle, event.message)
            continue
        for item, delta in bundle.items():
            merged.setdefault(item, (event, []))[1].append(delta)
    for item, (event, deltas) in merged.items():
        use_event(event)
        partition = event.message.partition
        stats = item_stats.get(item)
        profile_changed = False
        for delta in deltas:
            stats, changed = apply_delta(stats, delta, settings.trending_half_life_s)
            profile_changed |= changed
            for surface in delta.get("trend", {}):
                board_for(surface, partition).set(item, stats["trend"][surface], stats["author"])
                _dirty.add((surface, partition))
        item_stats[item] = stats
        if profile_changed:
            _dirty_profiles[item] = stats
        if stats["author"] is not None and stats["trend"]:
            author_board_for(stats["author"], partition).set(
                item, total_score(stats["trend"], settings.trending_half_life_s), stats["author"])
            _dirty_authors.add((stats["author"], partition))
    metrics.counters["item_deltas_applied"] += sum(len(d) for _, d in merged.values())
    now = time.time()
    if (_dirty or _dirty_profiles or _dirty_authors) and now - _last_publish >= settings.snapshot_interval_s:
        await publish_snapshots(now)
        _last_publish = now


async def publish_snapshots(now: float) -> None:
    """Publish what changed since the last call: trending boards and neighbour lists.

    Coalescing to one message per item per interval keeps a hot item, which
    changes in nearly every batch, from flooding every worker's shared view.
    """
    # Take the pending sets first: the timer and the agent may both publish, and
    # whatever is marked while we await sends belongs to the next round.
    profiles, boards_due = dict(_dirty_profiles), sorted(_dirty)
    authors_due = sorted(_dirty_authors)
    _dirty_profiles.clear()
    _dirty.clear()
    _dirty_authors.clear()
    for item, stats in profiles.items():
        await profiles_topic.send(key=item.encode(), value=orjson.dumps(profile(stats)))
    for author, partition in authors_due:
        snap = author_boards[(author, partition)].snapshot(AUTHOR_ITEMS_SIZE, now)
        await author_items_topic.send(key=f"{author}/{partition}".encode(),
                                      value=orjson.dumps(snap), partition=0)
    for surface, partition in boards_due:
        snap = boards[(surface, partition)].snapshot(SNAPSHOT_SIZE, now)
        await trending_topic.send(key=f"{surface}/{partition}".encode(), value=orjson.dumps(snap),
                                  partition=0)
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

"""Ingest: validate events, keep per-user history, emit item-side deltas.

Events arrive keyed by user id.  Each batch is validated (bad messages go to
the dead-letter topic with the reason), re-routed if an event landed on the
wrong partition for its user, folded into ``user_history`` with one table
write per user, and turned into per-item deltas (trending weight,
co-engagement) sent to ``item.deltas`` keyed by item, where
:mod:`streams.item_stats` owns them.
"""
from __future__ import annotations

import time

import orjson

from models.history import UserHistory
from models.item_state import add_item_deltas
from schemas.events import SchemaError, parse_events
from schemas.topics import EVENTS, ITEM_DELTAS, partition_for
from streams import labels, metrics
from streams.app import app
from streams.context import use_event
from streams.deadletters import send_dead_letter
from streams.settings import settings
from streams.tables import user_history

events_topic = app.topic(EVENTS)
item_deltas_topic = app.topic(ITEM_DELTAS)


@app.agent(events_topic)
async def ingest(stream):
    async for batch in stream.take_events(settings.ingest_batch, within=settings.ingest_within_s):
        try:
            await ingest_batch(batch)
        except Exception as exc:
            # Input is validated before this point, so this is a bug or an outage:
            # keep the worker alive and park the batch where it can be replayed
            # (replaying is safe: duplicates are dropped by event id).
            metrics.counters["ingest_errors"] += 1
            app.logger.exception("ingest batch of %d messages failed", len(batch))
            for event in batch:
                await send_dead_letter(event.value, f"ingest failed: {exc!r}", event.message)


async def ingest_batch(batch) -> None:
    now = time.time()
    by_user: dict[str, tuple] = {}
    for event in batch:
        msg = event.message
        try:
            parsed = parse_events(event.value, now=now)
        except SchemaError as exc:
            await send_dead_letter(event.value, str(exc), msg)
            continue
        for index, ev in parsed:
            if isinstance(ev, SchemaError):
                await send_dead_letter(event.value, str(ev), msg, index=index)
                continue
            expected = partition_for(ev.user_id, settings.partitions)
            if expected != msg.partition:
                # Produced with another partitioner or key: send it where its user lives.
                await events_topic.send(key=ev.user_id.encode(), value=ev.to_json(),
                                        partition=expected)
                metrics.counters["events_rerouted"] += 1
                continue
            by_user.setdefault(ev.user_id, (event, []))[1].append(ev)
    deltas: dict[str, dict] = {}
    examples: list[dict] = []
    for user, (event, evs) in by_user.items():
        use_event(event)
        partition = event.message.partition
        history = UserHistory.from_dict(user_history.get(user))
        pending = labels.pending_for(user, partition, evs, now)
        fresh = 0
        for ev in sorted(evs, key=lambda e: e.ts):
            if history.is_duplicate(ev.event_id):
                metrics.counters["duplicates_dropped"] += 1
                continue
            if pending is not None:
                labels.label_event(pending, history, ev)
            labels.advance_watermark(partition, ev.ts, now)
            add_item_deltas(deltas, history, ev, settings.trending_half_life_s)
            history.apply(ev.item_id, ev.event_type, ev.ts, ev.author_id,
                          author_half_life_s=settings.user_author_half_life_s)
            fresh += 1
        user_history[user] = history.to_dict()
        if fresh and pending is not None:
            examples.extend(labels.close_due(user, pending, partition, now))
        metrics.counters["events_ingested"] += len(evs)
        metrics.counters["events_applied"] += fresh
    await labels.send_examples(examples)
    # One bundle per item partition instead of one message per item: Kafka's
    # per-message cost, not the arithmetic, bounds ingest (bench/ingest.py).
    for partition, bundle in bundle_by_partition(deltas, settings.partitions).items():
        await item_deltas_topic.send(key=f"items-p{partition}".encode(), value=orjson.dumps(bundle),
                                     partition=partition)
    metrics.counters["item_deltas_sent"] += len(deltas)


def bundle_by_partition(deltas: dict, partitions: int) -> dict[int, dict]:
    """Group per-item deltas by the partition that owns each item.

    >>> sorted(bundle_by_partition({"a": {}, "b": {}}, 1)[0])
    ['a', 'b']
    """
    bundles: dict[int, dict] = {}
    for item, delta in deltas.items():
        bundles.setdefault(partition_for(item, partitions), {})[item] = delta
    return bundles



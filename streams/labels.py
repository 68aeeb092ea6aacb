"""The label join's glue: open impressions per user, closed into training examples.

Ingest calls :func:`label_event` for every new event of a user and
:func:`close_due` once per user and batch.  Quiet partitions still close their
windows: every second each worker sends a tick to ``labels.ticks`` for the
partitions it owns, and :func:`label_clock` closes what is due there (table
writes need a stream event of the right partition, which a timer lacks).
Closed examples go to ``training.examples`` in one message per batch.
"""
from __future__ import annotations

import time
from collections import OrderedDict
import orjson

from models.history import UserHistory
from models.labels import HEADS
from models.labels import PendingLabels
from schemas.topics import LABEL_TICKS, TRAINING_EXAMPLES, partition_for
from streams import metrics
from streams.app import app
from streams.context import use_event
from streams.settings import settings
from streams.tables import pending_labels
from streams.view import view

ticks_topic = app.topic(LABEL_TICKS)
examples_topic = app.topic(TRAINING_EXAMPLES)

#: partition -> users with open impressions; rebuilt from the table after a restart.
open_users: dict[int, set] = {}
#: partition -> highest event time seen (the event-time watermark).
watermarks: dict[int, float] = {}
#: (request_id, item) -> {source: normalised score} of recently served items, so
#: an impression's example carries the retrieval scores it was served with.
served_scores: "OrderedDict[tuple, dict]" = OrderedDict()
SERVED_CACHE = 50_000


def remember_served(request_id: str, items, model: str = "", predictions=()) -> None:
    """Keep what serving knew about each item it served, for the impression's example:
    the retrieval scores, and the model's head probabilities when a model ranked it."""
    predicted = {item: probs for item, _stage, probs in predictions}
    for item in items:
        probs = predicted.get(item.item_id)
        served_scores[(request_id, item.item_id)] = (
            item.source_scores,
            {"model": model, "probs": dict(zip(HEADS, probs))} if probs is not None else None)
    while len(served_scores) > SERVED_CACHE:
        served_scores.popitem(last=False)


def impression_features(history: UserHistory, ev) -> dict:
    """What serving knew when the item was shown: the example's features."""
    profile_first = view.first_seen(ev.item_id)
    scores, predicted = served_scores.get((ev.request_id, ev.item_id), (None, None))
    return {
        "user_id": ev.user_id, "author_id": ev.author_id, "surface": ev.surface,
        "position": ev.position, "user_recent": history.recent_positive_items(20),
        "user_authors": history.author_counts(), "item_counts": dict(view.quality(ev.item_id) or {}),
        "user_author": history.author_stats(ev.author_id), "user_totals": history.totals(),
        "item_age_s": max(0.0, ev.ts - profile_first) if profile_first else 0.0,
        "source_scores": scores or {},
        # What the model predicted when it served this item: the stability monitor
        # compares it with the labels (not a training feature).
        **({"predicted": predicted} if predicted else {}),
    }


def users_with_open_impressions(partition: int) -> set:
    """This partition's users with open impressions (found in the table after a restart)."""
    users = open_users.get(partition)
    if users is None:
        users = open_users[partition] = {
            k for k, v in pending_labels.items()
            if v and partition_for(k, settings.partitions) == partition}
    return users


def pending_for(user: str, partition: int, events) -> "PendingLabels | None":
    """The user's open impressions, or None when this batch cannot touch any.

    Most batches of most users hold no impression and the user has none open:
    skipping the table read and write then is most of the label join's cost.
    """
    if user in users_with_open_impressions(partition) or any(
            ev.event_type == "impression" for ev in events):
        return PendingLabels(pending_labels.get(user), settings.label_window_s)
    return None


def label_event(pending: PendingLabels, history: UserHistory, ev, now: float) -> None:
    if ev.event_type == "impression":
        pending.impression(ev.item_id, ev.request_id, ts=ev.ts, arrived=now,
                           features=impression_features(history, ev))
    elif pending.engagement(ev.item_id, ev.request_id, ev.event_type, ts=ev.ts,
                            dwell_ms=ev.dwell_ms):
        metrics.counters["engagements_joined"] += 1


def close_due(user: str, pending: PendingLabels, partition: int, now: float) -> list[dict]:
    """Close what is due for one user and store the rest (call in the user's stream context)."""
    due = due_examples(pending, partition, now)
    if pending.pending:
        open_users.setdefault(partition, set()).add(user)
    else:
        open_users.get(partition, set()).discard(user)
    store(user, pending)
    return due


def store(user: str, pending: PendingLabels) -> None:
    if pending.pending:
        pending_labels[user] = pending.to_dict()
    elif user in pending_labels:
        del pending_labels[user]


def due_examples(pending: PendingLabels, partition: int, now: float) -> list[dict]:
    return pending.due(watermark=watermarks.get(partition, 0.0), now=now,
                       window_s=settings.label_window_s,
                       wall_window_s=settings.label_wall_window_s)


def advance_watermark(partition: int, ts: float) -> None:
    if ts > watermarks.get(partition, 0.0):
        watermarks[partition] = ts


#: Examples per message: each is 1-3 KB, and a message must stay under 1 MB.
EXAMPLES_PER_MESSAGE = 200


async def send_examples(examples: list[dict]) -> None:
    for start in range(0, len(examples), EXAMPLES_PER_MESSAGE):
        chunk = examples[start:start + EXAMPLES_PER_MESSAGE]
        await examples_topic.send(key=b"examples", value=orjson.dumps(chunk))
        metrics.counters["training_examples"] += len(chunk)


@app.agent(ticks_topic)
async def label_clock(stream):
    """Close label windows on quiet partitions, once per tick."""
    async for event in stream.events():
        try:
            await close_partition(event)
        except Exception:
            metrics.counters["label_clock_errors"] += 1
            app.logger.exception("closing label windows failed")


async def close_partition(event) -> None:
    partition = event.message.partition
    use_event(event)
    now = time.time()
    examples = []
    for user in list(users_with_open_impressions(partition)):
        pending = PendingLabels(pending_labels.get(user), settings.label_window_s)
        due = due_examples(pending, partition, now)
        if due:
            examples.extend(due)
            store(user, pending)
        if not pending.pending:
            open_users[partition].discard(user)
    await send_examples(examples)


@app.timer(1.0)
async def tick() -> None:
    assigned = app.assignor.assigned_actives() if app.assignor else set()
    for tp in assigned:
        if tp.topic == LABEL_TICKS:
            await ticks_topic.send(key=b"tick", value=b"1", partition=tp.partition)


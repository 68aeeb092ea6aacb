"""The label join's glue: label state per user, closed into training examples.

Ingest calls :func:`advance_watermark` and :func:`label_event` for every new
event of a user and :func:`close_due` once per user and batch.  Windows close
by each partition's :class:`~models.labels.EventClock` (the rules are in
:mod:`models.labels`).  Quiet partitions still close their windows: every
second each worker sends a tick to ``labels.ticks`` for the partitions it owns,
and :func:`label_clock` closes what is due there (table writes need a stream
event of the right partition, which a timer lacks).  Closed examples go to
``training.examples`` in one message per batch.

Counters: ``engagements_joined`` (attached to an impression, also when the
impression came later), ``engagements_waiting`` (kept for an impression yet to
come), ``late_engagements`` (their impression had closed: no label changed),
``engagements_unmatched`` (waited a window for an impression that never came).
"""
from __future__ import annotations

import time
from collections import OrderedDict
import orjson

from models.history import UserHistory
from models.labels import HEADS, EventClock, PendingLabels, heads_for
from schemas.topics import LABEL_TICKS, TRAINING_EXAMPLES, partition_for
from streams import metrics
from streams.agent_errors import Policy, guarded
from streams.app import app
from streams.context import use_event
from streams.settings import settings
from streams.tables import pending_labels
from streams.view import view

ticks_topic = app.topic(LABEL_TICKS)
examples_topic = app.topic(TRAINING_EXAMPLES)

#: partition -> users with label state; rebuilt from the table after a restart.
label_users: dict[int, set] = {}
#: partition -> its event time (the watermark windows close by).
clocks: dict[int, EventClock] = {}
#: What an engagement's fate adds to (see PendingLabels.engagement).
ENGAGEMENT_COUNTERS = {"joined": "engagements_joined", "waiting": "engagements_waiting",
                       "late": "late_engagements"}
#: (request_id, item) -> {source: normalised score} of recently served items, so
#: an impression's example carries the retrieval scores it was served with.
served_scores: "OrderedDict[tuple, dict]" = OrderedDict()
SERVED_CACHE = 50_000


def remember_served(request_id: str, items, model: str = "", predictions=(),
                    shadows=()) -> None:
    """Keep what serving knew about each item it served, for the impression's example:
    the retrieval scores, and the model's head probabilities when a model ranked it.
    ``shadows``: (model, predictions) of versions that scored the request in shadow; the
    example carries theirs too (``predicted["shadow"]``), for the stability monitor."""
    predicted = {item: probs for item, _stage, probs in predictions}
    beside = [(name, {item: probs for item, _stage, probs in preds}) for name, preds in shadows]
    for item in items:
        probs = predicted.get(item.item_id)
        record = {"model": model, "probs": dict(zip(HEADS, probs))} if probs is not None else None
        shadow = [{"model": name, "probs": dict(zip(HEADS, by_item[item.item_id]))}
                  for name, by_item in beside if item.item_id in by_item]
        if record is not None and shadow:
            record["shadow"] = shadow
        served_scores[(request_id, item.item_id)] = (item.source_scores, record)
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


def users_with_label_state(partition: int, now: float) -> set:
    """This partition's users with label state (found in the table after a restart,
    when the partition's clock restarts from the newest event time stored there)."""
    users = label_users.get(partition)
    if users is None:
        users = label_users[partition] = set()
        for user, state in pending_labels.items():
            if state and partition_for(user, settings.partitions) == partition:
                users.add(user)
                latest = PendingLabels(state).latest_ts()
                if latest is not None:
                    advance_watermark(partition, latest, now)
    return users


def pending_for(user: str, partition: int, events, now: float) -> "PendingLabels | None":
    """The user's label state, or None when this batch cannot touch any.

    Most batches of most users hold no impression and the user has no state:
    skipping the table read and write then is most of the label join's cost.
    An engagement that names a request answers a served list, whose impression
    may still be on its way, so it may wait for it.  One that names none, of a
    user with no label state, comes from a producer that logs no impressions (a
    ratings replay) far more often than ahead of its impression; keeping those
    would cost a table write for every such engagement, so they are skipped.
    """
    if user in users_with_label_state(partition, now) or any(
            ev.event_type == "impression"
            or (ev.request_id and heads_for(ev.event_type, ev.dwell_ms)) for ev in events):
        return PendingLabels(pending_labels.get(user), settings.label_window_s)
    return None


def label_event(pending: PendingLabels, history: UserHistory, ev) -> None:
    if ev.event_type == "impression":
        metrics.counters["engagements_joined"] += pending.impression(
            ev.item_id, ev.request_id, ts=ev.ts, features=impression_features(history, ev))
        return
    fate = pending.engagement(ev.item_id, ev.request_id, ev.event_type, ts=ev.ts,
                              dwell_ms=ev.dwell_ms)
    if fate in ENGAGEMENT_COUNTERS:
        metrics.counters[ENGAGEMENT_COUNTERS[fate]] += 1


def close_due(user: str, pending: PendingLabels, partition: int, now: float) -> list[dict]:
    """Close what is due for one user and store the rest (call in the user's stream context)."""
    due = due_examples(pending, partition, now)
    if pending.empty:
        label_users.get(partition, set()).discard(user)
    else:
        label_users.setdefault(partition, set()).add(user)
    store(user, pending)
    return due


def store(user: str, pending: PendingLabels) -> None:
    if not pending.empty:
        pending_labels[user] = pending.to_dict()
    elif user in pending_labels:
        del pending_labels[user]


def clock_of(partition: int) -> EventClock:
    clock = clocks.get(partition)
    if clock is None:
        clock = clocks[partition] = EventClock(idle_s=settings.label_wall_window_s)
    return clock


def due_examples(pending: PendingLabels, partition: int, now: float) -> list[dict]:
    due = pending.due(watermark=clock_of(partition).at(now))
    metrics.counters["engagements_unmatched"] += pending.unmatched
    pending.unmatched = 0
    return due


def advance_watermark(partition: int, ts: float, now: float) -> None:
    """Move the partition's event time (held to ``now`` plus the allowed clock skew)."""
    clock_of(partition).advance(ts, now)


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
        # A tick carries no data, and the next one (a second later) closes the same windows.
        await guarded("label_clock", lambda events: close_partition(events[0]), [event],
                      Policy.DROP)


async def close_partition(event) -> None:
    partition = event.message.partition
    use_event(event)
    now = time.time()
    examples = []
    for user in list(users_with_label_state(partition, now)):
        pending = PendingLabels(pending_labels.get(user), settings.label_window_s)
        sizes = (len(pending.orphans), len(pending.closed))
        due = due_examples(pending, partition, now)
        # Write only when something closed or was forgotten: most ticks change nothing.
        if due or sizes != (len(pending.orphans), len(pending.closed)):
            examples.extend(due)
            store(user, pending)
        if pending.empty:
            label_users[partition].discard(user)
    await send_examples(examples)


@app.timer(1.0)
async def tick() -> None:
    assigned = app.assignor.assigned_actives() if app.assignor else set()
    for tp in assigned:
        if tp.topic == LABEL_TICKS:
            await ticks_topic.send(key=b"tick", value=b"1", partition=tp.partition)


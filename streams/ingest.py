"""Ingest: validate events, keep per-user history, emit item-side deltas.

Events arrive keyed by user id.  Each batch is validated (bad messages go to
the dead-letter topic with the reason), re-routed if an event landed on the
wrong partition for its user, folded into ``user_history`` with one table
write per user, and turned into per-item deltas (trending weight,
co-engagement) sent to ``item.deltas`` keyed by item, where
:mod:`streams.item_stats` owns them.

Counting every event once on the item side.  Input offsets are committed a
few seconds after the batch, so a worker killed in between has its batch
delivered again, to itself after a restart or to another worker.  Its user
histories may or may not have been written, its delta bundles may or may not
have been sent.  So:

- Every delta part names the positions it folds (``events`` partition, offset,
  index in the message), and the item side skips what it has applied
  (:func:`models.item_state.apply_sourced`).
- A position that may have been processed before is never folded with other
  bounds: when this process is given a partition it notes the partition's end
  offset (:func:`note_replay_zone`), and events below it go one per part.
  Beyond it, batches are this process's own, folded once.
- Each user's record keeps the position of each recent event id.  An event
  whose id is there *at the same position* is a redelivery: it is not applied to
  the history again, but its delta is sent again (one per part; the item side
  skips it if it arrived).  At another position it is a real duplicate: dropped.

A batch is planned in memory first (:func:`plan_batch`), then its tables are
written, then its messages sent.  Planning fails only on a bug or on input the
validator let through: then nothing is written, and the batch is planned one
message at a time so only the messages that fail alone are dead-lettered,
unapplied, and a re-drive (``streamrec deadletters redrive``) counts them once.
Sending fails on an outage: it is retried until it succeeds, which is a
redelivery like any other.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import partial

from models.history import UserHistory
from models.item_state import SourcedDeltas, add_item_deltas, bundle_parts  # noqa: F401 (the fold, re-exported)
from schemas.events import SchemaError, parse_events
from schemas.topics import EVENTS, ITEM_DELTAS, item_deltas_key, partition_for
from streams import labels, metrics
from streams.agent_errors import Policy, guarded
from streams.app import app
from streams.context import use_event
from streams.deadletters import send_dead_letter
from streams.settings import settings
from streams.tables import user_history

events_topic = app.topic(EVENTS)
item_deltas_topic = app.topic(ITEM_DELTAS)

#: (topic, partition) -> its end offset when this process was given it: events below
#: may have been processed, and their deltas sent, by whoever had it before.
replay_below: dict = {}
#: Seconds between attempts to send a planned batch while the broker is away.
SEND_RETRY_S = (0.5, 1.0, 2.0, 5.0)


@app.agent(events_topic)
async def ingest(stream):
    async for batch in stream.take_events(settings.ingest_batch, within=settings.ingest_within_s):
        await ingest_reliably(batch)


@app.on_partitions_revoked.connect
async def forget_replay_zone(sender, revoked, **kwargs) -> None:
    """A partition given back later may have been processed by another worker meanwhile."""
    for tp in revoked:
        replay_below.pop(tp, None)


async def note_replay_zone(batch) -> None:
    new = {event.message.tp for event in batch} - set(replay_below)
    if new:
        ends = await end_offsets(new)
        for tp in new:
            replay_below[tp] = ends.get(tp) or 0
            # The first offset says where this worker resumed: a gap from the offset
            # committed before is events nobody will process (the drill looks for it).
            first = min(e.message.offset for e in batch if e.message.tp == tp)
            app.logger.info("ingest %s: starts at offset %d; offsets below %d may be "
                            "redeliveries", tp, first, replay_below[tp])


async def end_offsets(tps) -> dict:
    return await app.consumer.highwaters(*tps)


def mark_replayed(batch) -> None:
    """A failed attempt may have written or sent part of ``batch``: treat it as replayed."""
    for event in batch:
        tp = event.message.tp
        replay_below[tp] = max(replay_below.get(tp, 0), event.message.offset + 1)


async def ingest_reliably(batch) -> None:
    await note_replay_zone(batch)
    # A failure is a bug, or input the validator let through: nothing of the batch
    # was sent, so the guard retries its messages one by one and parks, unapplied,
    # only those that fail alone (a failed attempt may have written tables, hence
    # mark_replayed).
    await guarded("ingest", partial(apply_and_send, now=time.time()), batch,
                  Policy.ONE_BY_ONE, before_retry=mark_replayed)


async def apply_and_send(batch, now: float) -> None:
    plan = await plan_batch(batch, now)
    commit_tables(plan, now)
    await send_reliably(plan)


async def send_reliably(plan: "BatchPlan") -> None:
    attempt = 0
    while True:
        try:
            await send_plan(plan)
            return
        except Exception:
            # An outage.  Sending the same plan again is safe: the item side skips the
            # parts that arrived, and the tables hold the same values.
            metrics.counters["ingest_send_retries"] += 1
            app.logger.exception("ingest could not send a batch's output (attempt %d)", attempt + 1)
            await asyncio.sleep(SEND_RETRY_S[min(attempt, len(SEND_RETRY_S) - 1)])
            attempt += 1


@dataclass
class BatchPlan:
    """A batch worked out in memory: nothing is written until it is complete."""
    #: user -> (an event of the user's, history, record of positions)
    users: dict = field(default_factory=dict)
    #: user -> label state (only users the batch can touch; see labels.pending_for)
    pending: dict = field(default_factory=dict)
    deltas: SourcedDeltas = field(default_factory=SourcedDeltas)
    examples: list = field(default_factory=list)


async def plan_batch(batch, now: float) -> BatchPlan:
    by_user: dict[str, tuple] = {}
    single: set[str] = set()
    for event in batch:
        msg = event.message
        source = f"{msg.topic}/{msg.partition}"
        if msg.offset < replay_below.get(msg.tp, 0):
            single.add(source)
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
            by_user.setdefault(ev.user_id, (event, []))[1].append((ev, source, [msg.offset, index]))
    plan = BatchPlan(deltas=SourcedDeltas(single=single))
    for user, (event, evs) in by_user.items():
        use_event(event)
        partition = event.message.partition
        record = user_history.get(user)
        history = UserHistory.from_dict(record)
        # Positions of recent event ids, under keys UserHistory does not use.  A
        # record from before they were kept has none: its redeliveries count as
        # duplicates, as they did then.
        positions = positions_of(record)
        pending = labels.pending_for(user, partition, [e for e, _, _ in evs], now)
        fresh = 0
        for ev, source, pos in sorted(evs, key=lambda e: e[0].ts):
            if history.is_duplicate(ev.event_id):
                if positions.get(ev.event_id) == (source, pos):
                    # Applied by an attempt that may not have sent its deltas: send them again.
                    metrics.counters["events_redelivered"] += 1
                    plan.deltas.add(source, pos, history_before(history, ev), ev,
                                    settings.trending_half_life_s, single=True)
                else:
                    metrics.counters["duplicates_dropped"] += 1
                    plan.deltas.note(source, pos)
                continue
            positions[ev.event_id] = (source, pos)
            if pending is not None:
                labels.label_event(pending, history, ev)
            labels.advance_watermark(partition, ev.ts, now)
            plan.deltas.add(source, pos, history, ev, settings.trending_half_life_s)
            history.apply(ev.item_id, ev.event_type, ev.ts, ev.author_id,
                          author_half_life_s=settings.user_author_half_life_s)
            fresh += 1
        kept = set(history.event_ids)
        plan.users[user] = (event, history, {i: p for i, p in positions.items() if i in kept}, fresh)
        if pending is not None:
            plan.pending[user] = pending
        metrics.counters["events_ingested"] += len(evs)
    return plan


def positions_of(record) -> dict:
    """event id -> (source, [offset, index]) as kept by :func:`with_positions`.

    >>> positions_of(with_positions({}, {"e1": ("events/0", [5, 0]), "e0": ("events/2", [1, 0])},
    ...                             "events/0"))
    {'e1': ('events/0', [5, 0])}
    """
    record = record or {}
    source = record.get("id_src")
    return {i: (source, at) for i, at in record.get("id_at", {}).items()}


def with_positions(record: dict, positions: dict, source: str) -> dict:
    """``record`` with the positions in ``source``, its user's partition (a user's
    events come from one partition; others, from before a re-partitioning, go)."""
    return {**record, "id_src": source,
            "id_at": {i: at for i, (s, at) in positions.items() if s == source}}


def history_before(history: UserHistory, ev) -> UserHistory:
    """The part of ``history`` a redelivered ``ev`` was folded against: its positives
    before the event's time (co-engagement pairs it with them)."""
    return UserHistory(positives=[p for p in history.positives if p[1] < ev.ts])


def commit_tables(plan: BatchPlan, now: float) -> None:
    for user, (event, history, positions, fresh) in plan.users.items():
        use_event(event)
        user_history[user] = with_positions(history.to_dict(), positions,
                                            f"{event.message.topic}/{event.message.partition}")
        pending = plan.pending.get(user)
        if fresh and pending is not None:
            plan.examples.extend(labels.close_due(user, pending, event.message.partition, now))
        metrics.counters["events_applied"] += fresh


async def send_plan(plan: BatchPlan) -> None:
    await labels.send_examples(plan.examples)
    plan.examples = []  # sent: a retry of the rest must not send them twice
    # One bundle per item partition instead of one message per item: Kafka's
    # per-message cost, not the arithmetic, bounds ingest (bench/ingest.py).
    bundles = bundle_parts(plan.deltas.parts(), lambda item: partition_for(item, settings.partitions))
    for partition, messages in bundles.items():
        for value in messages:
            await item_deltas_topic.send(key=item_deltas_key(partition), value=value,
                                         partition=partition)
    metrics.counters["item_deltas_sent"] += plan.deltas.count()

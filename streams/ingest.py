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
  (:func:`models.item_state.fold_sourced`).
- A batch's table writes have landed before any of its output is sent
  (:func:`flush_table_writes` first, then the bundles).  So an event its user's
  history does not hold was never sent by anyone, and all such events of a
  batch and a source fold into one part, one delta per item.
- Each user's record keeps the position of each recent event id.  An event
  whose id is there *at the same position* is a redelivery: it is not applied to
  the history again, but its delta is sent again one event per part (it may or
  may not have been sent; the item side skips it if it arrived).  At another
  position it is a real duplicate: dropped.

A batch is planned in memory first (:func:`plan_batch`), then its tables are
written, then its messages sent.  Planning fails only on a bug or on input the
validator let through: then nothing is written, and the batch is planned one
message at a time so only the messages that fail alone are dead-lettered,
unapplied, and a re-drive (``streamrec deadletters redrive``) counts them once.
Sending fails on an outage: it is retried until it succeeds, which is a
redelivery like any other.

Batches, not events: a user's record is read and written once per batch, a
partition is hashed once per user and per item, and each item gets one delta
per batch and source however many events touched it.
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

#: Partitions this process has started (the log says at which offset).
started: set = set()
#: Seconds between attempts to send a planned batch while the broker is away.
SEND_RETRY_S = (0.5, 1.0, 2.0, 5.0)


@app.agent(events_topic)
async def ingest(stream):
    async for batch in stream.take_events(settings.ingest_batch, within=settings.ingest_within_s):
        await ingest_reliably(batch)


@app.on_partitions_revoked.connect
async def forget_started(sender, revoked, **kwargs) -> None:
    """A partition given back later is logged again where it starts."""
    for tp in revoked:
        started.discard(tp)


def note_start(batch) -> None:
    """Log where this worker starts each partition it was given: a gap from the offset
    committed before is events nobody will process (the drill looks for it)."""
    new = {event.message.tp for event in batch} - started
    for tp in new:
        started.add(tp)
        first = min(e.message.offset for e in batch if e.message.tp == tp)
        app.logger.info("ingest %s: starts at offset %d", tp, first)


async def ingest_reliably(batch) -> None:
    note_start(batch)
    # A failure is a bug, or input the validator let through: nothing of the batch
    # was sent, so the guard retries its messages one by one and parks, unapplied,
    # only those that fail alone (what a failed attempt wrote to the tables, the
    # retry finds there and sends one event per part).
    await guarded("ingest", partial(apply_and_send, now=time.time()), batch, Policy.ONE_BY_ONE)


async def apply_and_send(batch, now: float) -> None:
    plan = await plan_batch(batch, now)
    commit_tables(plan, now)
    await send_reliably(plan)


async def flush_table_writes() -> None:
    """Wait until every table write made so far has reached the broker."""
    await app.producer.flush()


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
    #: Whether the table writes were flushed (before the first send).
    flushed: bool = False


async def plan_batch(batch, now: float) -> BatchPlan:
    by_user: dict[str, tuple] = {}
    user_partition: dict[str, int] = {}  # the murmur2 hash once per user, not per event
    for event in batch:
        msg = event.message
        source = f"{msg.topic}/{msg.partition}"
        try:
            parsed = parse_events(event.value, now=now)
        except SchemaError as exc:
            await send_dead_letter(event.value, str(exc), msg)
            continue
        for index, ev in parsed:
            if isinstance(ev, SchemaError):
                await send_dead_letter(event.value, str(ev), msg, index=index)
                continue
            expected = user_partition.get(ev.user_id)
            if expected is None:
                expected = user_partition[ev.user_id] = partition_for(ev.user_id, settings.partitions)
            if expected != msg.partition:
                # Produced with another partitioner or key: send it where its user lives.
                await events_topic.send(key=ev.user_id.encode(), value=ev.to_json(),
                                        partition=expected)
                metrics.counters["events_rerouted"] += 1
                continue
            by_user.setdefault(ev.user_id, (event, []))[1].append((ev, source, [msg.offset, index]))
    plan = BatchPlan()
    half_life = settings.trending_half_life_s
    for user, (event, evs) in by_user.items():
        use_event(event)
        partition = event.message.partition
        source = f"{event.message.topic}/{partition}"  # the user's: others were re-routed
        record = user_history.get(user)
        history = UserHistory.from_dict(record)
        # Positions of recent event ids, under keys UserHistory does not use.  A
        # record from before they were kept has none: its redeliveries count as
        # duplicates, as they did then.
        at = ids_at(record, source)
        pending = labels.pending_for(user, partition, [e for e, _, _ in evs], now)
        fresh = 0
        if len(evs) > 1:
            evs.sort(key=_event_time)
        for ev, _, pos in evs:
            if history.is_duplicate(ev.event_id):
                if at.get(ev.event_id) == pos:
                    # Applied by an attempt that may not have sent its deltas: send them again.
                    metrics.counters["events_redelivered"] += 1
                    plan.deltas.add(source, pos, history_before(history, ev), ev, half_life,
                                    single=True)
                else:
                    metrics.counters["duplicates_dropped"] += 1
                    plan.deltas.note(source, pos)
                continue
            at[ev.event_id] = pos
            if pending is not None:
                labels.label_event(pending, history, ev)
            labels.advance_watermark(partition, ev.ts, now)
            plan.deltas.add(source, pos, history, ev, half_life)
            history.apply(ev.item_id, ev.event_type, ev.ts, ev.author_id,
                          author_half_life_s=settings.user_author_half_life_s)
            fresh += 1
        if len(at) > len(history.event_ids):  # ids forgotten: their positions go too
            kept = set(history.event_ids)
            at = {i: p for i, p in at.items() if i in kept}
        plan.users[user] = (event, history, at, fresh)
        if pending is not None:
            plan.pending[user] = pending
        metrics.counters["events_ingested"] += len(evs)
    return plan


def _event_time(entry) -> float:
    return entry[0].ts


def ids_at(record, source: str) -> dict:
    """event id -> [offset, index] in ``source`` of the user's recent events, as
    stored beside the history (``id_src``, ``id_at``); a copy.  Positions in another
    source (from before a re-partitioning) are not the user's any more: none.

    >>> record = {"id_src": "events/0", "id_at": {"e1": [5, 0]}}
    >>> ids_at(record, "events/0"), ids_at(record, "events/2"), ids_at(None, "events/0")
    ({'e1': [5, 0]}, {}, {})
    """
    if not record or record.get("id_src") != source:
        return {}
    return dict(record.get("id_at") or {})


def history_before(history: UserHistory, ev) -> UserHistory:
    """The part of ``history`` a redelivered ``ev`` was folded against: its positives
    before the event's time (co-engagement pairs it with them)."""
    return UserHistory(positives=[p for p in history.positives if p[1] < ev.ts])


def commit_tables(plan: BatchPlan, now: float) -> None:
    for user, (event, history, positions, fresh) in plan.users.items():
        use_event(event)
        record = history.to_dict()
        record["id_src"] = f"{event.message.topic}/{event.message.partition}"
        record["id_at"] = positions
        user_history[user] = record
        pending = plan.pending.get(user)
        if fresh and pending is not None:
            plan.examples.extend(labels.close_due(user, pending, event.message.partition, now))
        metrics.counters["events_applied"] += fresh


async def send_plan(plan: BatchPlan) -> None:
    if not plan.flushed:
        # The batch's history must have landed before its deltas go: a restart that
        # finds an event in no history then knows its deltas were never sent.
        await flush_table_writes()
        plan.flushed = True
    await labels.send_examples(plan.examples)
    plan.examples = []  # sent: a retry of the rest must not send them twice
    # One bundle per item partition instead of one message per item: Kafka's
    # per-message cost, not the arithmetic, bounds ingest (bench/ingest.py).
    bundles = bundle_parts(plan.deltas.parts(), item_partitions())
    for partition, messages in bundles.items():
        for value in messages:
            await item_deltas_topic.send(key=item_deltas_key(partition), value=value,
                                         partition=partition)
    metrics.counters["item_deltas_sent"] += plan.deltas.count()


def item_partitions():
    """``item -> partition``, each item hashed once (one batch's bundles)."""
    cache: dict[str, int] = {}

    def partition_of(item: str) -> int:
        p = cache.get(item)
        if p is None:
            p = cache[item] = partition_for(item, settings.partitions)
        return p
    return partition_of

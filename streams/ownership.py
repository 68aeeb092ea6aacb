"""Write a partition's table state only while this worker owns the partition.

The app does not wait for agents to finish their batch when partitions are
revoked (``stream_wait_empty=False``: with it, stopping could hang).  So an
agent can still be working on a batch read from a partition that a rebalance
has just handed to another worker.  If it wrote its table keys then, those
changelog records would land after the new owner restored the table, and a
later restore would bring back the stale record: every event the new owner
applied to that key in between would be lost (the two-worker drill lost
hundreds of events this way).

So an agent that writes tables calls :func:`owned` after its last ``await``
and before it reads and writes them: it waits out a rebalance in progress,
then returns the partitions this worker holds now.  The agent drops the part
of its batch that came from other partitions (their offsets are not committed
for a worker that lost them; the new owner processes those events again), then
reads and writes the rest with no ``await`` in between.  The revocation
handler runs on the same event loop, so it can only start after the writes,
and it flushes them before another worker restores the table.

>>> import asyncio
>>> class App:  # a stand-in with what owned() reads
...     rebalancing = False
...     class consumer:
...         @staticmethod
...         def assignment():
...             return {("events", 0)}
>>> asyncio.run(owned(App()))
{('events', 0)}

Acknowledgements need the same care.  Faust forgets a partition's acked
offsets when a rebalance revokes it (every partition, with the eager protocol)
and seeks each partition it gets to the committed offset, so what a batch
fetched before the rebalance comes again.  An ack that arrives after the
rebalance lands in the fresh bookkeeping all the same, and can later let a
commit jump past events this worker skipped or has not processed again yet: a
kill then loses them.  :func:`forget_stale_acks` makes such acks no-ops.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
#: How often to look whether a rebalance has finished.
POLL_S = 0.02
#: Seeks back of one partition to one committed offset before the check gives up on it
#: (a message there that never arrives must not stall the partition for good).
MAX_REWINDS = 50
_rewinds: Counter = Counter()
log = logging.getLogger(__name__)


async def owned(app, poll_s: float = POLL_S) -> set:
    """The partitions (``TP``) this worker owns, once no rebalance is in progress.

    Faust sets ``app.rebalancing`` on the consumer's thread as soon as a
    revocation starts, and clears it when the new assignment's tables are
    recovered.
    """
    while app.rebalancing:
        await asyncio.sleep(poll_s)
    return set(app.consumer.assignment())


def forget_stale_acks(app, events) -> int:
    """Mark the messages of ``events`` fetched before the current consumer generation as
    acknowledged without telling the consumer: they will be delivered again (redeliveries
    are idempotent downstream), and their late acks must not advance a commit.  Returns
    how many.

    >>> from types import SimpleNamespace as NS
    >>> app = NS(consumer_generation_id=7)
    >>> old, new = NS(generation_id=6, acked=False), NS(generation_id=7, acked=False)
    >>> forget_stale_acks(app, [NS(message=old), NS(message=new)]), old.acked, new.acked
    (1, True, False)
    """
    generation = getattr(app, "consumer_generation_id", None)
    stale = 0
    for event in events:
        message = event.message
        fetched_in = getattr(message, "generation_id", None)
        if fetched_in is not None and fetched_in != generation and not message.acked:
            message.acked = True
            stale += 1
    return stale


def skipped_ahead(first_offsets: dict, committed: dict) -> dict:
    """Partitions whose first delivered offset lies beyond the group's committed one:
    ``{tp: committed}`` for each, where the consumer must go back to.

    A worker given a partition must resume at the committed offset.  Seen in the
    two-worker drill: after a rebalance that interrupted another, a worker
    started a partition near its end instead, and Faust, which takes a jump in
    offsets for a gap (compaction, transaction markers), would commit past the
    events in between: nobody would ever process them.

    >>> skipped_ahead({"p0": 1566, "p1": 1240, "p2": 7}, {"p0": 1240, "p1": 1240, "p2": None})
    {'p0': 1240}
    """
    return {tp: committed[tp] for tp, first in first_offsets.items()
            if committed.get(tp) is not None and first > committed[tp]}


def committed_offsets(bootstrap: str, group: str, tps) -> dict:
    """The group's committed offset of each ``tp`` (faust ``TP``), None where it has
    none, read from the broker (blocking: run it in an executor)."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient

    from streams.kafka_config import client_config
    tps = list(tps)
    admin = AdminClient(client_config(bootstrap))
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(tp.topic, tp.partition)
                                                   for tp in tps])
    result = admin.list_consumer_group_offsets([request], request_timeout=5)[group].result()
    found = {(p.topic, p.partition): p.offset for p in result.topic_partitions}
    offsets = {tp: found.get((tp.topic, tp.partition), -1) for tp in tps}
    # A negative offset is the broker's "none committed".
    return {tp: offset if offset >= 0 else None for tp, offset in offsets.items()}


async def rewind_skipped(app, batch, known, read_committed) -> set:
    """For partitions of ``batch`` not in ``known`` (the caller's partitions already
    checked since they were given to it), compare the first delivered offset with the
    group's committed one (``read_committed(tps)``, blocking, run in an executor); seek
    back those delivered from beyond it (:func:`skipped_ahead`) and mark their messages
    in ``batch`` acknowledged without telling the consumer.  Returns those partitions:
    the caller leaves their events for the redelivery."""
    new = {event.message.tp for event in batch} - set(known)
    if not new:
        return set()
    first = {tp: min(e.message.offset for e in batch if e.message.tp == tp) for tp in new}
    try:
        committed = await asyncio.get_running_loop().run_in_executor(None, read_committed, new)
    except Exception:
        # Cannot look (broker away): go on as Faust delivers, as before this check.
        log.warning("could not read the committed offsets of %s", sorted(new))
        return set()
    back = {tp: offset for tp, offset in skipped_ahead(first, committed).items()
            if _rewinds[(tp, offset)] < MAX_REWINDS}
    for tp, offset in back.items():
        _rewinds[(tp, offset)] += 1
        log.warning("%s: delivery starts at offset %d, beyond the committed offset %d: "
                    "seeking back", tp, first[tp], offset)
        await app.consumer.seek(tp, offset)
    for event in batch:
        if event.message.tp in back:
            event.message.acked = True
    return set(back)

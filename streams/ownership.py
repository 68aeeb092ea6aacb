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
#: How often to look whether a rebalance has finished.
POLL_S = 0.02


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


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

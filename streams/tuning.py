"""Faust tuned for request/reply latency, fast restarts and bounded stops.

- Faust creates its aiokafka consumer with a fixed ``fetch_max_wait_ms=1500``;
  on a broker that holds fetches for the full wait that puts up to 1.5 s into
  every request/reply round trip.  :class:`StreamrecApp` builds its transport
  with a consumer whose fetch wait comes from settings instead.
- Faust's table manager sleeps 1 s before it subscribes, for tables declared
  while the worker starts; ours are all declared at import, and that second is
  a second of every restart's outage.
- A worker told to stop exits within ``stop_timeout`` seconds whatever state it
  is in: Faust's own stop can wait far longer on a consumer still joining its
  group or a producer flushing to a broker that is gone.
- During a rebalance Faust's streams skip the messages they still hold and ack
  them, so the next commit passed offsets nobody processed: after the seek
  to the committed offsets they were never read (the drill lost user events
  and item counts around broker restarts).  :class:`_Consumer` does not ack them.
- Faust stops handing out a fetch when a rebalance begins, with the consumer
  positioned beyond it, and hands out a fetch made before a seek after it; the
  streams then see an offset beyond a hole, which Faust counts as processed, so
  the commit passed messages no agent got (two-worker drills lost hundreds of
  events).  :class:`ContiguousReads` finds each hole and it is read again.
- Before committing input offsets Faust flushes its producer, but the flush of
  the buffer that holds table changelog writes gives up after 0.1 s without
  progress, and does not count the message its sender holds.  The offsets were
  then committed with table writes still unsent, and a kill lost them (the
  drill's item counts came out short).  :class:`DrainingBuffer` waits until
  every buffered write is with the Kafka client, whose own flush follows.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from contextlib import aclosing

import faust
from faust.tables.manager import TableManager
from faust.transport.producer import ProducerBuffer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.worker import Worker

from streams import metrics
from streams.kafka_config import faust_credentials

log = logging.getLogger(__name__)


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    fetch_wait_ms = 5
    #: With the broker gone, aiokafka's consumer.stop() looks for the group
    #: coordinator without end; its connections close with the process anyway.
    stop_wait_s = 3.0

    async def on_thread_stop(self) -> None:
        # asyncio.wait, not wait_for: wait_for would wait for the cancelled stop too.
        stopping = asyncio.ensure_future(super().on_thread_stop())
        done, _ = await asyncio.wait({stopping}, timeout=self.stop_wait_s)
        if not done:
            log.warning("the consumer did not stop within %.0f s (broker gone?): "
                        "leaving it to the process exit", self.stop_wait_s)

    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        # Read by aiokafka when it builds its fetcher in start().
        consumer._fetch_max_wait_ms = self.fetch_wait_ms
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = ContiguousReads()
        #: (partition, offset) of messages a stream handed to an agent, until acked.
        self.handed_to_agents: dict = {}
        handle = self.callback

        async def hand_to_streams(message) -> None:
            await handle(message)
            self.reads.delivered(message.tp, message.offset)
        self.callback = hand_to_streams

    def _new_consumer_thread(self):
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def getmany(self, timeout):
        # Faust stops handing out a fetch when the flow stops or the generation
        # changes, and a fetch made before a seek can still be handed out after it:
        # either way the next records the streams see lie beyond ones they never got.
        reads, holes = self.reads, {}
        async with aclosing(super().getmany(timeout)) as fetched:
            async for tp, message in fetched:
                if tp in holes:
                    continue
                if self.app.topics.acks_enabled_for(tp.topic):
                    again = reads.check(tp, message.offset)
                    if again is not None:
                        holes[tp] = again
                        continue
                yield tp, message
        for tp, offset in holes.items():
            if tp in self.assignment():
                reads.rewinding(tp, offset)
                metrics.counters["reads_rewound_over_a_hole"] += 1
                log.info("%s[%d]: offsets from %d did not reach the streams (a fetch cut "
                         "short by a rebalance, or made before a seek): reading them again",
                         tp.topic, tp.partition, offset)
                await self.seek(tp, offset)

    async def seek_to_committed(self):
        committed = await super().seek_to_committed()
        for tp, offset in committed.items():
            # aiokafka moves only partitions with a committed offset above 0.
            self.reads.seeked(tp, offset if offset and offset > 0 else None)
        return committed

    async def seek(self, partition, offset):
        await super().seek(partition, offset)
        self.reads.seeked(partition, offset)

    async def on_partitions_revoked(self, revoked) -> None:
        self.reads.forget(revoked)
        revoked = set(revoked)
        for key in [key for key in self.handed_to_agents if key[0] in revoked]:
            del self.handed_to_agents[key]
        await super().on_partitions_revoked(revoked)

    async def _add_gap(self, tp, offset_from: int, offset_to: int) -> None:
        # Faust counts offsets it never read as processed (meant for compacted topics
        # and transaction markers); ContiguousReads lets a gap through only when
        # reading again from its start still skips it.
        metrics.counters["offset_gaps_counted_as_read"] += offset_to - offset_from
        log.warning("%s[%d]: offsets %d-%d do not exist (read twice from %d): counted "
                    "as processed", tp.topic, tp.partition, offset_from, offset_to - 1,
                    offset_from)
        await super()._add_gap(tp, offset_from, offset_to)

    def ack(self, message) -> bool:
        app = self.app
        processed = self.handed_to_agents.pop((message.tp, message.offset), None)
        if not processed and (not app.flow_control.is_active()
                              or message.generation_id != app.consumer_generation_id):
            # During a rebalance Faust's streams skip the messages they still hold, and
            # ack them: the next commit then passes offsets nobody processed, and the
            # seek after the rebalance starts beyond them.  Not acking them lets the
            # commit stop before them, so they are read again (a redelivery).  One an
            # agent processed is acked: read again it would be processed twice (a
            # request answered twice).
            withhold_ack(self, message)
            return False
        return super().ack(message)


class ContiguousReads:
    """Per partition, the offset the streams must get next, so none is skipped.

    Faust hands a fetch's records to the streams one at a time and stops when the
    flow stops (a rebalance begins) or the generation changes, with the consumer
    positioned beyond the records it dropped; and a fetch made before a seek can
    be handed out after it.  Either way the streams next see an offset beyond the
    one they need, and Faust's gap handling then counts the offsets in between as
    processed: the commit passes messages nobody processed.  :meth:`check` names
    such a hole, so the consumer reads again from its start; a hole still there
    after ``tries`` reads is real (compaction, transaction markers).

    >>> reads = ContiguousReads()
    >>> reads.seeked("p0", 10); reads.delivered("p0", 10)
    >>> reads.check("p0", 11), reads.check("p0", 13)   # 11 is next: 13 skips two
    (None, 11)
    >>> reads.rewinding("p0", 11); reads.rewinding("p0", 11)
    >>> reads.check("p0", 13)       # read twice from 11 and 13 came first: a real gap
    """

    def __init__(self, tries: int = 2) -> None:
        self.tries = tries
        self.expected: dict = {}
        self.rewinds: dict = {}

    def seeked(self, tp, offset) -> None:
        """The consumer was moved to ``offset`` (None: to wherever the group's
        reset policy puts it)."""
        if offset is None:
            self.expected.pop(tp, None)
        else:
            self.expected[tp] = offset

    def delivered(self, tp, offset: int) -> None:
        self.expected[tp] = max(offset + 1, self.expected.get(tp, 0))
        self.rewinds.pop(tp, None)

    def forget(self, tps) -> None:
        for tp in tps:
            self.expected.pop(tp, None)
            self.rewinds.pop(tp, None)

    def check(self, tp, offset: int):
        """None to hand the record at ``offset`` on; otherwise the offset to read
        the partition again from."""
        expected = self.expected.get(tp)
        if expected is None or offset <= expected:
            return None
        at, times = self.rewinds.get(tp, (None, 0))
        if at == expected and times >= self.tries:
            return None
        return expected

    def rewinding(self, tp, offset: int) -> None:
        at, times = self.rewinds.get(tp, (None, 0))
        self.rewinds[tp] = (offset, times + 1 if at == offset else 1)


class _Stream(faust.Stream):
    """Notes each event it hands to an agent, so that an ack during a rebalance can
    tell a message the agent processed from one the stream skipped."""

    def _handing(self, event) -> None:
        message = event.message
        self.app.consumer.handed_to_agents[(message.tp, message.offset)] = True

    async def events(self):
        async for event in super().events():
            self._handing(event)
            yield event

    async def take_events(self, max_: int, within):
        async for batch in super().take_events(max_, within):
            for event in batch:
                self._handing(event)
            yield batch


def withhold_ack(consumer, message) -> None:
    """Forget ``message`` as in flight without acking its offset."""
    message.acked = True  # never counted later either: it belongs to a past assignment
    consumer._unacked_messages.discard(message)
    metrics.counters["acks_withheld_in_rebalance"] += 1


class DrainingBuffer(ProducerBuffer):
    """Faust's buffer of messages sent with ``send_soon`` (table changelog writes),
    with a flush that returns only when none is left, neither queued nor in the
    hands of the sender task.  ``flushes_waited_for_table_writes`` in
    :data:`streams.metrics.counters` counts the flushes that waited longer than
    Faust's would have (0.1 s without progress, or a message in hand): each is a
    commit that Faust would have made with table writes unsent."""

    #: Seconds between checks that the sender still runs while waiting.
    CHECK_S = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.in_hand = 0

    async def _send_pending(self, fut) -> None:
        # The queue's size drops when the sender takes a message, before it is
        # handed to the client: count it until then.
        self.in_hand += 1
        try:
            await super()._send_pending(fut)
        finally:
            self.in_hand -= 1

    async def flush(self) -> None:
        if self.should_stop:
            # Stopping: the sender task is gone, so Faust's own checks apply.
            return await super().flush()
        cut_short, unsent, started = False, self.size + self.in_hand, time.monotonic()
        while self.size or self.in_hand:
            if self.should_stop:
                raise RuntimeError(f"producer buffer stopped with {self.size + self.in_hand} "
                                   "table writes unsent: not committing past them")
            # Faust's flush returns here with a message in hand, or after 0.1 s
            # without one sent.
            cut_short |= not self.size
            self.message_sent.clear()
            waited = time.monotonic()
            try:
                await asyncio.wait_for(self.message_sent.wait(), timeout=self.CHECK_S)
            except asyncio.TimeoutError:
                pass
            cut_short |= time.monotonic() - waited > 0.1
        if cut_short:
            metrics.counters["flushes_waited_for_table_writes"] += 1
            log.debug("flush waited %.2f s for %d table writes (Faust's would have returned "
                     "with some unsent)", time.monotonic() - started, unsent)


class _Producer(faust_aiokafka.Producer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        buffer = DrainingBuffer(loop=self.loop, beacon=self.beacon)
        buffer.app = self.buffer.app
        if self.threaded_producer is not None:
            buffer.threaded_producer = self.threaded_producer
        self.buffer = buffer


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer
    Producer = _Producer


class _TableManager(TableManager):
    async def on_start(self) -> None:
        # What Faust's on_start does after its fixed 1 s sleep.
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


def exit_after(seconds: float, reason: str, status: int = 70) -> threading.Timer:
    """Start a daemon timer that ends the process with ``status`` after ``seconds``,
    unless it is cancelled first: a stop that hangs cannot outlive it."""
    def _exit() -> None:
        log.log(logging.ERROR if status else logging.INFO,
                "%s did not finish within %.0f s: exiting now", reason, seconds)
        logging.shutdown()
        os._exit(status)
    timer = threading.Timer(seconds, _exit)
    timer.daemon = True
    timer.start()
    return timer


class _Worker(Worker):
    stop_timeout: float = 8.0

    def _schedule_shutdown(self, signum: signal.Signals) -> None:
        if not self._signal_stop_time:
            exit_after(self.stop_timeout, f"stopping on {signal.Signals(signum).name}")
        super()._schedule_shutdown(signum)

    def stop_and_shutdown(self) -> None:
        super().stop_and_shutdown()
        # Faust has stopped: offsets committed, its producer flushed. With the broker
        # gone, other clients' threads (librdkafka, executors) can still hold the
        # interpreter's exit for tens of seconds; give them a moment, not more.
        exit_after(2.0, "the interpreter's exit after the worker stopped", status=0)


class StreamrecApp(faust.App):
    def __init__(self, *args, fetch_wait_ms: int = 5, stop_timeout: float = 8.0, **kwargs):
        _ConsumerThread.fetch_wait_ms = fetch_wait_ms
        _Worker.stop_timeout = stop_timeout
        kwargs.setdefault("TableManager", _TableManager)
        kwargs.setdefault("Worker", _Worker)
        kwargs.setdefault("Stream", _Stream)
        super().__init__(*args, **kwargs)

    def _new_transport(self):
        return _Transport(self.conf.broker_consumer, self)


def kafka_options(settings) -> dict:
    """The App options that decide how a worker reads and writes Kafka: the worker's
    app and bench/noop_agent.py (the floor under ingest) both take these, so the
    floor is measured with what the worker runs."""
    return dict(
        broker=f"kafka://{settings.bootstrap}",
        # TLS and SASL/SCRAM from STREAMREC_SECURITY_PROTOCOL & co (streams/kafka_config.py).
        broker_credentials=faust_credentials(),
        topic_partitions=settings.partitions,
        topic_allow_declare=False,
        topic_disable_leader=True,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        producer_linger=settings.producer_linger_ms / 1000.0,
        # With stream_wait_empty=True, stopping after serving requests can hang.
        stream_wait_empty=False,
        fetch_wait_ms=settings.fetch_wait_ms,
        # Failover (streams/settings.py): a dead member is dropped after the session
        # timeout, not Faust's 60 s.
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_commit_interval=settings.commit_interval_s,
    )

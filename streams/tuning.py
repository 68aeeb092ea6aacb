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
    def _new_consumer_thread(self):
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def ack(self, message) -> bool:
        app = self.app
        if not app.flow_control.is_active() or message.generation_id != app.consumer_generation_id:
            # During a rebalance Faust's streams skip the messages they still hold, and
            # ack them: the next commit then passes offsets nobody processed, and the
            # seek after the rebalance starts beyond them.  Not acking them lets the
            # commit stop before them, so they are read again (a redelivery).
            withhold_ack(self, message)
            return False
        return super().ack(message)


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

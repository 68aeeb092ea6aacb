"""What streams.tuning changes in Faust's commits: every table write is handed to
the Kafka client before the input offsets it came from are committed, and every
message reaches the streams before a commit passes it."""
from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace

import pytest
from faust.transport.consumer import Consumer as FaustConsumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.producer import ProducerBuffer
from faust.types import TP
from intervaltree import IntervalTree

from streams import metrics
from streams.tuning import ContiguousReads, DrainingBuffer, _Consumer


class SlowChannel:
    """Stands in for a topic whose client takes ``delay`` s to accept each message
    (a loop busy elsewhere, a broker coming back)."""

    def __init__(self, delay: float):
        self.delay = delay
        self.published: list = []

    async def publish_message(self, fut, wait: bool = False):
        await asyncio.sleep(self.delay)
        self.published.append(fut.value)


def message(channel, value):
    return SimpleNamespace(value=value, message=SimpleNamespace(channel=channel))


async def flush_after_put(buffer_cls, delay: float, n: int) -> tuple[int, int]:
    """Put ``n`` messages, flush, and return (messages handed to the client, n)."""
    buffer = buffer_cls()
    buffer.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))
    channel = SlowChannel(delay)
    await buffer.start()
    try:
        for i in range(n):
            buffer.put(message(channel, i))
        await asyncio.sleep(0)  # the sender takes the first message
        await buffer.flush()
        sent = len(channel.published)
        while len(channel.published) < n:  # let the rest go before stopping
            await asyncio.sleep(0.05)
        return sent, n
    finally:
        await buffer.stop()


def test_faust_flush_returns_with_table_writes_unsent():
    # Why DrainingBuffer exists: Faust commits offsets after this flush.
    sent, n = asyncio.run(flush_after_put(ProducerBuffer, delay=0.25, n=3))
    assert sent < n


@pytest.mark.parametrize("delay,n", [(0.25, 3), (0.0, 50), (1.3, 1)])
def test_draining_flush_returns_when_every_write_is_with_the_client(delay, n):
    before = metrics.counters["flushes_waited_for_table_writes"]
    sent, n = asyncio.run(flush_after_put(DrainingBuffer, delay, n))
    assert sent == n
    # A flush Faust would have cut short is counted.
    assert metrics.counters["flushes_waited_for_table_writes"] - before == (1 if delay else 0)


def test_draining_flush_of_an_empty_buffer_returns_at_once():
    sent, n = asyncio.run(flush_after_put(DrainingBuffer, delay=0.0, n=0))
    assert sent == n == 0


class Flow:
    def __init__(self, active: bool):
        self.active = active

    def is_active(self) -> bool:
        return self.active


def consumer_in(flow_active: bool, generation: int):
    from streams.tuning import _Consumer
    consumer = _Consumer.__new__(_Consumer)  # only what ack reads
    consumer.app = SimpleNamespace(flow_control=Flow(flow_active),
                                   consumer_generation_id=generation)
    consumer._unacked_messages = set()
    consumer.handed_to_agents = {}
    return consumer


class Message:
    def __init__(self, generation: int):
        self.acked, self.generation_id, self.offset, self.tp = False, generation, 7, EVENTS0


@pytest.mark.parametrize("flow_active,generation", [(False, 3), (True, 4)])
def test_messages_skipped_in_a_rebalance_are_not_acked(monkeypatch, flow_active, generation):
    # Faust acks what its streams skip while a rebalance runs (flow stopped, or a
    # message fetched in the previous generation); the commit must not pass them.
    from faust.transport.drivers import aiokafka as faust_aiokafka
    acked = []
    monkeypatch.setattr(faust_aiokafka.Consumer, "ack", lambda self, m: acked.append(m) or True)
    consumer, message = consumer_in(flow_active, generation), Message(3)
    consumer._unacked_messages.add(message)
    assert consumer.ack(message) is False
    assert acked == [] and message not in consumer._unacked_messages


@pytest.mark.parametrize("flow_active,generation", [(False, 3), (True, 4)])
def test_messages_an_agent_processed_are_acked_in_a_rebalance(monkeypatch, flow_active,
                                                               generation):
    # Read again, a request would be answered twice.
    from faust.transport.drivers import aiokafka as faust_aiokafka
    acked = []
    monkeypatch.setattr(faust_aiokafka.Consumer, "ack", lambda self, m: acked.append(m) or True)
    consumer, message = consumer_in(flow_active, generation), Message(3)
    consumer.handed_to_agents[(message.tp, message.offset)] = True
    assert consumer.ack(message) is True and acked == [message]
    assert consumer.handed_to_agents == {}


def test_messages_of_the_current_assignment_are_acked(monkeypatch):
    from faust.transport.drivers import aiokafka as faust_aiokafka
    acked = []
    monkeypatch.setattr(faust_aiokafka.Consumer, "ack", lambda self, m: acked.append(m) or True)
    consumer, message = consumer_in(True, 3), Message(3)
    assert consumer.ack(message) is True and acked == [message]


# --- Reads: every message reaches the streams -------------------------------------

EVENTS0 = TP("events", 0)


def test_faust_counts_a_hole_in_the_reads_as_processed():
    # Why ContiguousReads exists: messages 12-14 never reached the streams (a fetch
    # cut short by a rebalance), 15 did; Faust's commit then passes 12-14.
    state = SimpleNamespace(_committed_offset={EVENTS0: 10}, _gap=defaultdict(IntervalTree),
                            _acked=defaultdict(list), _acked_index=defaultdict(set))
    asyncio.run(FaustConsumer._add_gap(state, EVENTS0, 12, 15))  # as _drain_messages does
    state._acked[EVENTS0] += [10, 11, 15]
    assert FaustConsumer._new_offset(state, EVENTS0) == 16


class ScriptedConsumer(_Consumer):
    """The worker's consumer over scripted fetches: only what it adds to Faust's
    hand-out of a fetch runs; the streams get what it yields."""

    def __init__(self, fetches):
        self.reads = ContiguousReads()
        self.fetches = list(fetches)
        self.seeks: list = []
        self.app = SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: True))
        self._read_offset = {}
        self.handed_to_agents = {}

    def assignment(self):
        return {EVENTS0}

    async def _seek(self, tp, offset):
        self.seeks.append(offset)

    async def handed(self) -> list:
        out = []
        async for tp, message in self.getmany(timeout=1.0):
            out.append(message.offset)
            self.reads.delivered(tp, message.offset)  # what hand_to_streams does
        return out


@pytest.fixture
def scripted_fetches(monkeypatch):
    async def faust_getmany(self, timeout):
        for offset in self.fetches.pop(0):
            yield EVENTS0, SimpleNamespace(offset=offset, tp=EVENTS0)
    monkeypatch.setattr(faust_aiokafka.Consumer, "getmany", faust_getmany)
    monkeypatch.setattr(FaustConsumer, "log", SimpleNamespace(dev=lambda *a, **k: None),
                        raising=False)


def test_a_hole_is_read_again_from_its_start(scripted_fetches):
    consumer = ScriptedConsumer([[10, 11], [15, 16], [12, 13, 14, 15, 16]])
    consumer.reads.seeked(EVENTS0, 10)
    before = metrics.counters["reads_rewound_over_a_hole"]
    assert asyncio.run(consumer.handed()) == [10, 11]
    assert asyncio.run(consumer.handed()) == []       # 12-14 missing: not handed on
    assert consumer.seeks == [12]
    assert asyncio.run(consumer.handed()) == [12, 13, 14, 15, 16]
    assert metrics.counters["reads_rewound_over_a_hole"] == before + 1


def test_a_gap_that_reading_again_does_not_fill_is_let_through(scripted_fetches):
    # Offsets that do not exist (compaction, transaction markers) stay missing.
    consumer = ScriptedConsumer([[23], [23], [23, 24]])
    consumer.reads.seeked(EVENTS0, 20)
    assert asyncio.run(consumer.handed()) == []
    assert asyncio.run(consumer.handed()) == []
    assert consumer.seeks == [20, 20]
    assert asyncio.run(consumer.handed()) == [23, 24]


def test_a_partition_never_committed_takes_what_comes(scripted_fetches):
    consumer = ScriptedConsumer([[40, 41]])
    consumer.reads.seeked(EVENTS0, None)
    assert asyncio.run(consumer.handed()) == [40, 41]
    assert consumer.seeks == []

"""The producer buffer a worker commits behind: every table write is handed to the
Kafka client before the input offsets it came from are committed."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from faust.transport.producer import ProducerBuffer

from streams import metrics
from streams.tuning import DrainingBuffer


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
    return consumer


class Message:
    def __init__(self, generation: int):
        self.acked, self.generation_id, self.offset = False, generation, 7


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


def test_messages_of_the_current_assignment_are_acked(monkeypatch):
    from faust.transport.drivers import aiokafka as faust_aiokafka
    acked = []
    monkeypatch.setattr(faust_aiokafka.Consumer, "ack", lambda self, m: acked.append(m) or True)
    consumer, message = consumer_in(True, 3), Message(3)
    assert consumer.ack(message) is True and acked == [message]

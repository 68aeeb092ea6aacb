"""streams/agent_errors.py: the one error guard every agent loop uses."""
from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest

from streams import agent_errors, metrics
from streams.agent_errors import Policy, guarded


def message(offset: int, value: bytes = b"{}"):
    return SimpleNamespace(value=value, message=SimpleNamespace(
        topic="events", partition=0, offset=offset, key=b"u"))


@pytest.fixture
def parked(monkeypatch):
    """Dead letters the guard sends, as (value, reason, offset)."""
    out = []

    async def send(raw, reason, msg, index=None):
        out.append((raw, reason, msg.offset))

    monkeypatch.setattr(agent_errors, "send_dead_letter", send)
    monkeypatch.setattr(metrics, "counters", type(metrics.counters)())
    return out


def poisoned(done: list, poison=b"poison"):
    """Work that fails on any batch holding ``poison`` and records what it applied."""
    async def work(events):
        if any(e.value == poison for e in events):
            raise KeyError("a bug")
        done.extend(e.message.offset for e in events)
    return work


def test_work_that_succeeds_is_left_alone(parked):
    done = []
    assert asyncio.run(guarded("ingest", poisoned(done), [message(1), message(2)],
                               Policy.ONE_BY_ONE)) is True
    assert done == [1, 2] and parked == [] and metrics.counters == {}


def test_one_by_one_applies_the_good_messages_and_parks_the_one_that_fails_alone(parked):
    done, retried = [], []
    batch = [message(1), message(2, b"poison"), message(3)]
    ok = asyncio.run(guarded("ingest", poisoned(done), batch, Policy.ONE_BY_ONE,
                             before_retry=lambda events: retried.extend(events)))
    assert ok is False and done == [1, 3] and retried == batch
    assert parked == [(b"poison", "ingest failed: KeyError('a bug')", 2)]
    assert metrics.counters == {"ingest_errors": 1, "ingest_messages_failed": 1}


def test_dead_letter_parks_every_message_of_the_failed_work(parked):
    batch = [message(1), message(2, b"poison")]
    asyncio.run(guarded("item_stats", poisoned([]), batch, Policy.DEAD_LETTER))
    assert [offset for _, _, offset in parked] == [1, 2]
    assert metrics.counters == {"item_stats_errors": 1, "item_stats_messages_failed": 2}


def test_drop_counts_and_logs_with_the_messages_position(parked, caplog):
    asyncio.run(guarded("serve", poisoned([]), [message(7, b"poison")], Policy.DROP))
    assert parked == [] and metrics.counters == {"serve_errors": 1}
    assert "serve failed on 1 message: events/0@7; dropped" in caplog.text


def test_cancellation_is_not_swallowed(parked):
    async def cancelled(events):
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(guarded("ingest", cancelled, [message(1)], Policy.ONE_BY_ONE))
    assert metrics.counters == {} and parked == []


def test_a_failing_training_batch_is_dropped_and_the_next_trains(parked, monkeypatch):
    from streams import trainer
    trained = []

    async def train_batch(batch):
        if batch[0].message.offset == 1:
            raise ValueError("a bad batch")
        trained.append(batch[0].message.offset)

    class Stream:
        async def take_events(self, n, within):
            for offset in (1, 2):
                yield [message(offset)]

    monkeypatch.setattr(trainer, "train_batch", train_batch)
    monkeypatch.setattr(trainer, "settings", dataclasses.replace(trainer.settings,
                                                                 online_training=True))
    asyncio.run(trainer.train.fun(Stream()))
    assert trained == [2]
    assert metrics.counters["trainer_errors"] == 1 and parked == []

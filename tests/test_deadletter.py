"""Dead-letter records stay bounded, their send never takes an agent down, and a
re-drive sends each parked original back once."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import orjson

from schemas.deadletter import EXCERPT_BYTES, dead_letter, latest_records, original_bytes
from streams import deadletters, metrics


class Topic:
    def __init__(self, fail=False):
        self.sent, self.fail = [], fail

    async def send(self, key=None, value=None):
        if self.fail:
            raise RuntimeError("MessageSizeTooLarge")
        self.sent.append((key, value))


def msg(offset=7):
    return SimpleNamespace(topic="events", partition=2, offset=offset, key=b"u1")


def park(monkeypatch, raw, reason, index=None, fail=False):
    topic = Topic(fail)
    monkeypatch.setattr(deadletters, "_dlq_topic", topic)
    asyncio.run(deadletters.send_dead_letter(raw, reason, msg(), index=index))
    return topic


def test_a_message_over_one_megabyte_is_referenced_not_copied(monkeypatch):
    raw = b'{"event_id": "' + b"x" * 1_100_000 + b'"}'
    topic = park(monkeypatch, raw, "event_id too long")
    (key, value), = topic.sent
    record = orjson.loads(value)
    assert len(value) < 2 * EXCERPT_BYTES
    assert (record["id"], record["message_bytes"], record["complete"]) == \
        ("events/2/7", len(raw), False)
    assert original_bytes(record) is None  # re-driven from the source offset instead


def test_a_failing_dead_letter_send_is_counted_not_raised(monkeypatch):
    before = metrics.counters["dead_letters_failed"]
    park(monkeypatch, b"x" * 2_000_000, "too big", fail=True)
    assert metrics.counters["dead_letters_failed"] == before + 1


def test_an_array_with_many_bad_elements_keeps_each_element_once(monkeypatch):
    elements = [{"event_id": f"e{i}", "event_type": "nope"} for i in range(5000)]
    raw = orjson.dumps(elements)
    topic = Topic()
    monkeypatch.setattr(deadletters, "_dlq_topic", topic)
    started = time.perf_counter()

    async def park_all():
        for i in range(len(elements)):
            await deadletters.send_dead_letter(raw, "bad event_type", msg(), index=i)

    asyncio.run(park_all())
    elapsed = time.perf_counter() - started
    records = [orjson.loads(v) for _, v in topic.sent]
    assert len(records) == 5000 and max(len(v) for _, v in topic.sent) < 1024
    assert orjson.loads(original_bytes(records[4321])) == elements[4321]
    assert records[4321]["id"] == "events/2/7#4321"
    assert elapsed < 5.0  # the array is parsed once, not once per element


def test_a_record_written_twice_is_one_record():
    first = dead_letter(b"{", "not JSON", "events", 0, 5)
    again = dead_letter(b"{", "not JSON", "events", 0, 5)
    other = dead_letter(b"[", "not JSON", "events", 0, 6)
    assert latest_records([first, other, again]) == [again, other]


def test_records_from_before_excerpts_still_read():
    import base64
    old = {"reason": "r", "source_topic": "events", "source_partition": 0, "source_offset": 1,
           "index": None, "key": None, "original_b64": base64.b64encode(b"abc").decode()}
    assert original_bytes(old) == b"abc" and len(latest_records([old, old])) == 1


def redrive_from(parked: list, monkeypatch) -> list:
    """Make ``parked`` the dead-letter topic (sources no longer retained); returns the
    list each re-driven (topic, key, value) is appended to."""
    sent = []

    class Producer:
        def __init__(self, bootstrap, topic):
            self.topic = topic

        def send_raw(self, key, value):
            sent.append((self.topic, key, value))

        def flush(self):
            pass

    monkeypatch.setattr(deadletters, "read_records", lambda bootstrap: parked)
    monkeypatch.setattr(deadletters, "fetch_original", lambda bootstrap, record: None)
    monkeypatch.setattr("streams.producer.EventProducer", Producer)
    return sent


def test_redrive_sends_each_recoverable_original_once(monkeypatch):
    parked = [dead_letter(b'{"a": 1}', "ingest failed: KeyError", "events", 1, 3, key=b"u1"),
              dead_letter(b'{"a": 1}', "ingest failed: KeyError", "events", 1, 3, key=b"u1"),
              dead_letter(b"x" * 10_000, "ingest failed: KeyError", "events", 1, 4),
              dead_letter(b"{", "not valid JSON", "events", 1, 5)]
    sent = redrive_from(parked, monkeypatch)
    dry = deadletters.redrive("unused:0", reason_contains="ingest failed", dry_run=True)
    assert (dry["records"], dry["redriven"], dry["unrecoverable"], sent) == (2, 1, 1, [])
    done = deadletters.redrive("unused:0", reason_contains="ingest failed")
    assert done["redriven"] == 1 and sent == [("events", b"u1", b'{"a": 1}')]


def test_redrive_sends_only_to_topics_agents_dead_letter_from(monkeypatch):
    parked = [dead_letter(b'{"a": 1}', "ingest failed: KeyError", "events", 0, 1, key=b"u1"),
              dead_letter(b'{"b": 2}', "item_stats failed: KeyError", "item.deltas", 2, 7,
                          key=b"items-p2"),
              dead_letter(b'{"c": 3}', "ingest failed: KeyError", "somebody.elses", 0, 1)]
    sent = redrive_from(parked, monkeypatch)
    done = deadletters.redrive("unused:0")
    assert (done["redriven"], done["unrecoverable"]) == (2, 1)
    assert [topic for topic, _, _ in sent] == ["events", "item.deltas"]

"""The dead-letter topic: every agent parks what it cannot use here, with the reason.

Sending a dead letter never raises: it runs in error handlers, and a record the
broker refuses must not take the agent down with it.  ``streamrec deadletters
redrive`` (:func:`redrive`) sends the parked originals back to their source
topic; that is safe with ingest's dedupe: an event applied before is dropped by
its id, one parked unapplied (see :mod:`streams.ingest`) counts once.
"""
from __future__ import annotations

import logging
import uuid
from collections import Counter
from typing import Optional

import orjson

from schemas.deadletter import dead_letter, element_of, latest_records, original_bytes
from schemas.topics import EVENTS, EVENTS_DLQ, ITEM_DELTAS, REQUESTS
from streams import metrics

log = logging.getLogger(__name__)
_dlq_topic = None
#: Where dead letters come from, so the only topics :func:`redrive` sends to: events
#: (ingest), item bundles (item_stats) and requests (serving).
SOURCE_TOPICS = (EVENTS, ITEM_DELTAS, REQUESTS)


async def send_dead_letter(raw, reason: str, msg, index=None) -> None:
    """Write ``raw`` (from Kafka message ``msg``) to ``events.dlq`` with why it was refused."""
    global _dlq_topic
    metrics.counters["dead_letters"] += 1
    try:
        element = element_of(raw, index) if index is not None and raw else None
        record = dead_letter(raw, reason, msg.topic, msg.partition, msg.offset, index=index,
                             key=msg.key, element=element)
        if _dlq_topic is None:
            from streams.app import app
            _dlq_topic = app.topic(EVENTS_DLQ)
        key = msg.key[:1024] if msg.key else msg.key
        await _dlq_topic.send(key=key, value=orjson.dumps(record))
    except Exception:
        metrics.counters["dead_letters_failed"] += 1
        log.exception("could not dead-letter %s/%s@%s (%s)", getattr(msg, "topic", "?"),
                      getattr(msg, "partition", "?"), getattr(msg, "offset", "?"), reason[:200])


def read_records(bootstrap: str, timeout: float = 60.0) -> list[dict]:
    """Every record in ``events.dlq``, oldest first."""
    from stores.topic_reader import read_to_end
    out = []
    for msg in read_to_end(bootstrap, EVENTS_DLQ, timeout=timeout):
        try:
            out.append(orjson.loads(msg.value()))
        except orjson.JSONDecodeError:
            log.warning("events.dlq holds a record that is not JSON")
    return out


def fetch_original(bootstrap: str, record: dict) -> Optional[bytes]:
    """The refused message (or element) from its source topic, if still retained."""
    from confluent_kafka import Consumer, TopicPartition
    from streams.kafka_config import client_config
    consumer = Consumer(client_config(bootstrap, {"group.id": f"redrive-{uuid.uuid4().hex}",
                                                  "enable.auto.commit": False}))
    try:
        consumer.assign([TopicPartition(record["source_topic"], record["source_partition"],
                                        record["source_offset"])])
        msg = consumer.poll(5.0)
        if msg is None or msg.error() or msg.offset() != record["source_offset"]:
            return None
        raw = msg.value() or b""
        return element_of(raw, record["index"]) if record.get("index") is not None else raw
    finally:
        consumer.close()


def redrive(bootstrap: str, reason_contains: str = "", dry_run: bool = False) -> dict:
    """Send parked originals whose reason contains ``reason_contains`` back to their topic.

    One send per refused message or element (records written twice count once);
    a record that holds only an excerpt is re-driven from its source offset when
    the topic still has it, and reported as unrecoverable otherwise, as is one
    naming a source topic no agent dead-letters from.
    """
    from streams.producer import EventProducer
    chosen = [r for r in latest_records(read_records(bootstrap))
              if reason_contains in r.get("reason", "")]
    summary = {"records": len(chosen), "redriven": 0, "unrecoverable": 0, "dry_run": dry_run,
               "reasons": Counter(r.get("reason", "")[:80] for r in chosen).most_common(10)}
    producers: dict[str, EventProducer] = {}
    try:
        for record in chosen:
            if record.get("source_topic") not in SOURCE_TOPICS:
                summary["unrecoverable"] += 1
                continue
            payload = original_bytes(record)
            if payload is None:
                payload = fetch_original(bootstrap, record)
            if payload is None:
                summary["unrecoverable"] += 1
                continue
            summary["redriven"] += 1
            if dry_run:
                continue
            topic = record["source_topic"]
            if topic not in producers:
                producers[topic] = EventProducer(bootstrap, topic=topic)
            key = record.get("key")
            producers[topic].send_raw(key.encode() if key else None, payload)
    finally:
        for producer in producers.values():
            producer.flush()
    return summary

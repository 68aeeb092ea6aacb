"""The dead-letter topic: every agent parks what it cannot use here, with the reason."""
from __future__ import annotations

import orjson

from schemas.deadletter import dead_letter
from schemas.topics import EVENTS_DLQ
from streams import metrics
from streams.app import app

dlq_topic = app.topic(EVENTS_DLQ)


async def send_dead_letter(raw, reason: str, msg, index=None) -> None:
    """Write ``raw`` (from Kafka message ``msg``) to ``events.dlq`` with why it was refused."""
    metrics.counters["dead_letters"] += 1
    record = dead_letter(raw, reason, msg.topic, msg.partition, msg.offset, index=index,
                         key=msg.key)
    await dlq_topic.send(key=msg.key, value=orjson.dumps(record))

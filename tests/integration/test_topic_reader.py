"""stores/topic_reader.py against the real broker."""
from __future__ import annotations

import time
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from stores.topic_reader import keys_since


def test_keys_since_reads_only_what_came_from_then_on(kafka):
    topic = f"keys-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka})
    for f in admin.create_topics([NewTopic(topic, 3, 1)]).values():
        f.result()
    producer = Producer({"bootstrap.servers": kafka})
    now = time.time()
    for i in range(30):  # an hour old, on every partition
        producer.produce(topic, key=b"old-%d" % i, value=b"", timestamp=int((now - 3600) * 1000))
    for i in range(20):
        producer.produce(topic, key=b"new-%d" % i, value=b"", timestamp=int(now * 1000))
    assert producer.flush(30) == 0
    assert keys_since(kafka, topic, now - 60) == {b"new-%d" % i for i in range(20)}
    assert keys_since(kafka, topic, now + 60) == set()

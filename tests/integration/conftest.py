"""Fixtures that run the real system: an Apache Kafka broker and a Faust worker.

The broker runs on its own port with a wiped data dir, so tests never touch a
broker a developer has running; the Kafka jars come from the shared cache.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import orjson
import pytest

TEST_PORT = int(os.environ.get("STREAMREC_TEST_KAFKA_PORT", "19692"))
BOOTSTRAP = f"127.0.0.1:{TEST_PORT}"
WEB_PORT = int(os.environ.get("STREAMREC_TEST_WEB_PORT", "16066"))
os.environ["STREAMREC_BOOTSTRAP"] = BOOTSTRAP


@pytest.fixture(scope="session")
def kafka():
    from streams import broker
    broker.start(port=TEST_PORT, wipe=True, timeout=120)
    from schemas.topics import catalogue
    from streams.admin import create_topics
    from streams.settings import settings
    create_topics(BOOTSTRAP, catalogue(settings.partitions, settings.app_id))
    yield BOOTSTRAP
    broker.stop(port=TEST_PORT, wipe=True)


@pytest.fixture(scope="session")
def worker_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("worker")


@pytest.fixture(scope="session")
def worker(kafka, worker_dir):
    from streams.local import WorkerProcess
    # Short label windows so the label-join test does not wait minutes; online training
    # off, so model versions appear only when a test publishes one (test_models.py
    # runs its own worker with training on).
    w = WorkerProcess(kafka, worker_dir, web_port=WEB_PORT,
                      env={"STREAMREC_LABEL_WINDOW_S": "2",
                           "STREAMREC_LABEL_WALL_WINDOW_S": "2",
                           "STREAMREC_ONLINE_TRAINING": "0"}).start()
    yield w
    w.stop()


def new_event(user, item, event_type="like", *, author=None, ts=None, **extra) -> dict:
    return {"event_id": uuid.uuid4().hex, "user_id": str(user), "item_id": str(item),
            "event_type": event_type, "surface": "explore", "ts": ts or time.time(),
            **({"author_id": author} if author else {}), **extra}


def read_topic(bootstrap: str, topic: str, *, timeout: float = 10.0, until=None) -> list:
    """All messages of ``topic`` from the start (no group), as (key, value) pairs."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}",
                  "enable.auto.commit": False})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out, deadline = [], time.time() + timeout
    while time.time() < deadline:
        for m in c.consume(500, timeout=0.2):
            if not m.error():
                out.append((m.key(), m.value()))
        if until is not None and until(out):
            break
    c.close()
    return out


def latest_by_key(messages) -> dict:
    latest = {}
    for k, v in messages:
        latest[k] = None if v is None else orjson.loads(v)
    return latest

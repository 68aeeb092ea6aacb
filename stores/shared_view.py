"""Item-side state shared with every worker through compacted topics.

Item-side aggregates (trending, co-engagement neighbours) are computed on the
partition that owns the item and published to compacted topics.  Every worker
runs a :class:`SharedItemView`: a background thread with a plain
confluent-kafka consumer (no consumer group, all partitions, from the start)
that keeps the latest value per key in memory.  Serving reads it without I/O.

A group-less reader is used rather than a Faust GlobalTable so every worker
sees every partition regardless of rebalances, and so it stays a few lines.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from models.trending import merge_snapshots
from schemas.topics import ITEM_NEIGHBOURS, TRENDING_SNAPSHOTS


class SharedItemView:
    """Implements :class:`models.funnel.ItemView` over the compacted topics."""

    def __init__(self, bootstrap: str, topics=(TRENDING_SNAPSHOTS, ITEM_NEIGHBOURS),
                 trending_ttl_s: float = 0.25):
        self.bootstrap = bootstrap
        self.topics = tuple(topics)
        #: surface -> {partition key: snapshot}
        self._trending: dict[str, dict[str, dict]] = {}
        self._neighbours: dict[str, list] = {}
        #: surface -> (n, computed at, merged list); see trending().
        self._trending_cache: dict[str, tuple] = {}
        self.trending_ttl_s = trending_ttl_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.messages = 0
        self.last_update = 0.0

    # -- ItemView ---------------------------------------------------------
    def trending(self, surface: str, n: int, now: float):
        # Merging and decaying every partition's snapshot costs milliseconds; the
        # answer barely moves within a fraction of a second, so reuse it briefly.
        cached = self._trending_cache.get(surface)
        if cached and cached[0] >= n and 0 <= now - cached[1] < self.trending_ttl_s:
            return cached[2][:n]
        with self._lock:
            snaps = list(self._trending.get(surface, {}).values())
        merged = merge_snapshots(snaps, n, now)
        self._trending_cache[surface] = (n, now, merged)
        return merged

    def neighbours(self, item: str):
        return self._neighbours.get(item, [])

    def trending_snapshot(self, key: str) -> Optional[dict]:
        surface = key.split("/", 1)[0]
        with self._lock:
            return self._trending.get(surface, {}).get(key)

    # -- lifecycle --------------------------------------------------------
    def start(self) -> "SharedItemView":
        self._thread = threading.Thread(target=self._run, name="shared-item-view", daemon=True)
        self._thread.start()
        return self

    def wait_caught_up(self, timeout: float = 30.0) -> bool:
        return self._caught_up.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def apply(self, topic: str, key: bytes, value: Optional[bytes]) -> None:
        k = key.decode()
        if topic == TRENDING_SNAPSHOTS:
            surface = k.split("/", 1)[0]
            with self._lock:
                by_part = self._trending.setdefault(surface, {})
                if value is None:
                    by_part.pop(k, None)
                else:
                    by_part[k] = orjson.loads(value)
        elif topic == ITEM_NEIGHBOURS:
            if value is None:
                self._neighbours.pop(k, None)
            else:
                self._neighbours[k] = [tuple(x) for x in orjson.loads(value)["items"]]
        self.messages += 1
        self.last_update = time.time()

    def _run(self) -> None:
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap,
            "group.id": "streamrec-shared-view",  # required by the client; never committed
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 50,  # freshness of shared state is ~0.5 s anyway
        })
        try:
            assignment, high = [], {}
            meta = consumer.list_topics(timeout=10)
            for topic in self.topics:
                if topic not in meta.topics:
                    raise RuntimeError(f"topic {topic!r} does not exist: run 'streamrec topics create'")
                for p in meta.topics[topic].partitions:
                    assignment.append(TopicPartition(topic, p, OFFSET_BEGINNING))
                    high[(topic, p)] = consumer.get_watermark_offsets(
                        TopicPartition(topic, p), timeout=10)[1]
            consumer.assign(assignment)
            pending = {tp for tp, h in high.items() if h > 0}
            if not pending:
                self._caught_up.set()
            while not self._stop.is_set():
                for msg in consumer.consume(500, timeout=0.1):
                    if msg.error():
                        if msg.error().code() != KafkaError._PARTITION_EOF:
                            continue
                        continue
                    self.apply(msg.topic(), msg.key(), msg.value())
                    tp = (msg.topic(), msg.partition())
                    if tp in pending and msg.offset() >= high[tp] - 1:
                        pending.discard(tp)
                        if not pending:
                            self._caught_up.set()
        finally:
            consumer.close()

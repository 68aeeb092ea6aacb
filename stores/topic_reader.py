"""Read a topic from its beginning to where it ends now: batch jobs and tools.

Group-less (nothing committed), every partition, stopping at the end offsets
seen when the read starts, so a busy topic still gives a finite read.
"""
from __future__ import annotations

import time
from typing import Iterator, Optional

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from streams.kafka_config import client_config


def read_to_end(bootstrap: str, topic: str, *, progress: Optional[str] = None,
                timeout: Optional[float] = None) -> Iterator:
    """Yield every message now in ``topic`` (confluent-kafka ``Message`` objects).

    ``progress``: a tqdm description to show a progress bar, or None for none.
    ``timeout``: seconds after which an unfinished read raises :class:`TimeoutError`
    (the messages yielded so far stand); None waits as long as it takes.
    """
    consumer = Consumer(client_config(bootstrap, {"group.id": "streamrec-reader",
                                               "enable.auto.commit": False}))
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        if meta.error is not None:
            raise RuntimeError(f"topic {topic!r}: {meta.error}; run 'streamrec topics create'")
        remaining = {}
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                remaining[p] = high - 1
        bar = None
        if progress is not None:
            from tqdm import tqdm
            total = 0
            for p in remaining:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                total += high - low
            bar = tqdm(total=total, unit="msg", desc=progress)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in remaining])
        deadline = None if timeout is None else time.monotonic() + timeout
        while remaining:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic!r}: {len(remaining)} partition(s) not read "
                                   f"to their end within {timeout:g} s")
            for msg in consumer.consume(1000, timeout=1.0):
                if msg.error():
                    continue
                last = remaining.get(msg.partition())
                if last is None:
                    continue
                if msg.offset() >= last:
                    del remaining[msg.partition()]
                if bar is not None:
                    bar.update(1)
                yield msg
        if bar is not None:
            bar.close()
    finally:
        consumer.close()


def keys_since(bootstrap: str, topic: str, since: float, *, timeout: float = 5.0) -> set:
    """The keys of every message ``topic`` received from ``since`` (epoch seconds) to
    where each partition ends now, read group-less.

    Raises :class:`TimeoutError` when the read does not finish within ``timeout``.
    """
    consumer = Consumer(client_config(bootstrap, {"group.id": "streamrec-reader",
                                               "enable.auto.commit": False}))
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics[topic]
        if meta.error is not None:
            raise RuntimeError(f"topic {topic!r}: {meta.error}")
        starts = consumer.offsets_for_times(
            [TopicPartition(topic, p, int(since * 1000)) for p in meta.partitions],
            timeout=timeout)
        remaining, assign = {}, []
        for tp in starts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition),
                                                       timeout=timeout)
            if 0 <= tp.offset < high:  # -1: nothing that new
                remaining[tp.partition] = high - 1
                assign.append(TopicPartition(topic, tp.partition, tp.offset))
        keys: set = set()
        consumer.assign(assign)
        deadline = time.monotonic() + timeout
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic!r} since {since:.0f}: "
                                   f"{len(remaining)} partition(s) not read within {timeout:g} s")
            for msg in consumer.consume(1000, timeout=0.5):
                if msg.error() or msg.partition() not in remaining:
                    continue
                keys.add(msg.key())
                if msg.offset() >= remaining[msg.partition()]:
                    del remaining[msg.partition()]
        return keys
    finally:
        consumer.close()

"""Read a topic from its beginning (or from a time) to where it ends now: batch jobs and tools.

Group-less (nothing committed), every partition, stopping at the end offsets
seen when the read starts, so a busy topic still gives a finite read.
"""
from __future__ import annotations

import time
from typing import Iterator, Optional

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from streams.kafka_config import client_config


def read_to_end(bootstrap: str, topic: str, *, progress: Optional[str] = None,
                timeout: Optional[float] = None, since: Optional[float] = None,
                request_timeout: float = 10.0, wait_s: float = 1.0) -> Iterator:
    """Yield every message now in ``topic`` (confluent-kafka ``Message`` objects).

    ``progress``: a tqdm description to show a progress bar, or None for none.
    ``timeout``: seconds after which an unfinished read raises :class:`TimeoutError`
    (the messages yielded so far stand); None waits as long as it takes.
    ``since``: epoch seconds; only messages the topic received from then on.
    ``request_timeout``: seconds for each metadata request before the read starts.
    ``wait_s``: how long each fetch waits for a full batch of 1,000 messages.
    """
    consumer = Consumer(client_config(bootstrap, {"group.id": "streamrec-reader",
                                               "enable.auto.commit": False}))
    try:
        meta = consumer.list_topics(topic, timeout=request_timeout).topics[topic]
        if meta.error is not None:
            raise RuntimeError(f"topic {topic!r}: {meta.error}; run 'streamrec topics create'")
        if since is None:
            starts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions]
        else:
            starts = consumer.offsets_for_times(
                [TopicPartition(topic, p, int(since * 1000)) for p in meta.partitions],
                timeout=request_timeout)
        remaining, assign, total = {}, [], 0
        for start in starts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, start.partition),
                                                       timeout=request_timeout)
            first = low if since is None else start.offset  # -1: nothing that new
            if 0 <= first < high:
                remaining[start.partition] = high - 1
                assign.append(start)
                total += high - first
        bar = None
        if progress is not None:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="msg", desc=progress)
        consumer.assign(assign)
        deadline = None if timeout is None else time.monotonic() + timeout
        while remaining:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic!r}: {len(remaining)} partition(s) not read "
                                   f"to their end within {timeout:g} s")
            for msg in consumer.consume(1000, timeout=wait_s):
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
    where each partition ends now (:func:`read_to_end` from ``since``).

    Raises :class:`TimeoutError` when the read does not finish within ``timeout``.
    """
    # Serving waits for this read when it takes a partition over: short fetch waits.
    return {msg.key() for msg in read_to_end(bootstrap, topic, timeout=timeout, since=since,
                                             request_timeout=timeout, wait_s=0.1)}

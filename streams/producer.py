"""Produce engagement events to Kafka with confluent-kafka.

Idempotent (no duplicates on retry), batched (short linger, compression),
with delivery reports counted and surfaced, and backpressure: when the local
queue is full, :meth:`EventProducer.send` waits for deliveries instead of
failing or growing without bound.

Events are keyed by user id and partitioned with murmur2, as the worker
expects (see :func:`schemas.topics.partition_for`).
"""
from __future__ import annotations

import time
from typing import Iterable, Optional, Union

import orjson
from confluent_kafka import KafkaException, Producer

from schemas.events import EngagementEvent, parse_event
from schemas.topics import EVENTS
from streams.kafka_config import client_config, refusal, security_from_env

PRODUCER_DEFAULTS = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "batch.num.messages": 10000,
    "compression.type": "lz4",
    "partitioner": "murmur2_random",
    "queue.buffering.max.messages": 200000,
}


class DeliveryError(RuntimeError):
    """Some messages could not be delivered; ``errors`` holds the first few."""

    def __init__(self, errors: list[str], failed: int):
        super().__init__(f"{failed} message(s) not delivered; first: {errors[:3]}")
        self.errors = errors
        self.failed = failed


class EventProducer:
    """Validates and sends events; call :meth:`flush` (or use ``with``) at the end.

    >>> with EventProducer("127.0.0.1:9092") as p:         # doctest: +SKIP
    ...     p.send({"event_id": "e1", "user_id": 1, "item_id": 2, "event_type": "like",
    ...             "surface": "explore", "ts": time.time()})
    """

    def __init__(self, bootstrap: str, topic: str = EVENTS, **config):
        self.topic = topic
        self._producer = Producer(client_config(bootstrap, {**PRODUCER_DEFAULTS, **config}))
        self.sent = 0
        self.delivered = 0
        self.failed = 0
        self.errors: list[str] = []

    def _on_delivery(self, err, msg) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failed += 1
            if len(self.errors) < 100:
                self.errors.append(str(err))

    def send_raw(self, key: Optional[bytes], value: bytes, on_delivery=None) -> None:
        """Send bytes as they are (the worker validates and dead-letters);
        ``on_delivery(err, msg)`` is called too when the broker acknowledges or refuses it."""
        callback = self._on_delivery
        if on_delivery is not None:
            def callback(err, msg):
                self._on_delivery(err, msg)
                on_delivery(err, msg)
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, on_delivery=callback)
                break
            except BufferError:
                # Backpressure: the local queue is full; wait for deliveries.
                self._producer.poll(0.05)
        self.sent += 1
        self._producer.poll(0)

    def send(self, event: Union[EngagementEvent, dict]) -> None:
        """Validate and send one event; raises :class:`schemas.SchemaError` if invalid."""
        if isinstance(event, dict):
            event = parse_event(event)
        self.send_raw(event.user_id.encode(), event.to_json())

    def send_user_batch(self, events: Iterable[EngagementEvent]) -> None:
        """Send one user's events as one message (a JSON array): far cheaper per event."""
        events = list(events)
        users = {e.user_id for e in events}
        if len(users) != 1:
            raise ValueError(f"a batch message must hold one user's events, got {len(users)} users")
        self.send_raw(events[0].user_id.encode(), orjson.dumps([e.to_dict() for e in events]))

    def flush(self, timeout: float = 30.0) -> None:
        remaining = self._producer.flush(timeout)
        if remaining:
            raise DeliveryError([f"{remaining} still queued after {timeout}s"], remaining)
        if self.failed:
            raise DeliveryError(self.errors, self.failed)

    def __enter__(self) -> "EventProducer":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.flush()
        else:
            self._producer.flush(5)


def check_broker(bootstrap: str, timeout: float = 5.0) -> None:
    """Raise a clear error if no broker answers at ``bootstrap`` (ConnectionError) or it
    refuses this client's credentials or TLS (:class:`streams.kafka_config.BrokerRefused`)."""
    from confluent_kafka.admin import AdminClient
    security = security_from_env()
    refused: list = []

    def on_error(err) -> None:
        why = refusal(bootstrap, security, err.name(), err.str())
        if why is not None:
            refused.append(why)

    admin = AdminClient(client_config(bootstrap, {"error_cb": on_error}))
    deadline = time.monotonic() + timeout
    while True:
        # Short tries: a refusal is known within a second; no need to wait out the timeout.
        try:
            admin.list_topics(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            return
        except KafkaException as exc:
            admin.poll(0)  # serves error_cb
            if refused:
                raise refused[0] from None
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"no Kafka broker answers at {bootstrap} ({exc}); start one with "
                    f"'streamrec broker start'") from None

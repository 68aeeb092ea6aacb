"""``streamrec pregen``: the off-peak batch job behind the pre-generated sources.

Reads every retained event from ``events`` (a group-less consumer up to the
current end), computes long-term popular items per surface and region and
item embeddings (:mod:`models.pregen`), and publishes them as one versioned
batch to ``pregen.sources``: the parts first, the manifest last.  Workers swap
to a batch only once its manifest and every part have arrived
(:class:`stores.shared_view.SharedItemView`), so they keep serving the previous
batch until the new one is complete; parts of older batches are then
tombstoned so compaction removes them.
"""
from __future__ import annotations

import time

import orjson
from confluent_kafka import Producer

from models.pregen import item_embeddings, popular
from schemas.events import SchemaError, parse_events
from schemas.topics import EVENTS, PREGEN
from stores.topic_reader import read_to_end
from streams.kafka_config import client_config

#: Bytes a chunk of embeddings may take as JSON: under the broker's 1 MB default.
CHUNK_BYTES = 600_000


def read_events(bootstrap: str, *, progress: bool = True) -> tuple[list, int]:
    """Every valid event retained in ``events`` now; returns (events, invalid count)."""
    events, invalid = [], 0
    for msg in read_to_end(bootstrap, EVENTS, progress="read events" if progress else None):
        try:
            parsed = parse_events(msg.value())
        except SchemaError:
            invalid += 1
            continue
        for _, ev in parsed:
            if isinstance(ev, SchemaError):
                invalid += 1
            else:
                events.append(ev)
    return events, invalid


def batch_parts(events: list, *, now: float, window_days: float, dim: int) -> dict[str, dict]:
    """The batch as ``{"name/key": value}`` parts (pure: no Kafka)."""
    parts: dict[str, dict] = {}
    for key, items in popular(events, now=now, window_days=window_days).items():
        parts[f"popular/{key}"] = {"items": [list(x) for x in items]}
    vectors = item_embeddings(events, dim=dim)
    ids = sorted(vectors)
    per_chunk = max(1, CHUNK_BYTES // (dim * 12 + 16))  # ~12 bytes per float as JSON
    for n, start in enumerate(range(0, len(ids), per_chunk)):
        chunk = ids[start:start + per_chunk]
        parts[f"embeddings/{n}"] = {"ids": chunk,
                                    "vectors": [vectors[i].round(6).tolist() for i in chunk]}
    return parts


def previous_keys(bootstrap: str) -> list[bytes]:
    """Keys of batches already in ``pregen.sources`` (to tombstone after a new one)."""
    live: dict[bytes, bool] = {}
    for msg in read_to_end(bootstrap, PREGEN):
        live[msg.key()] = msg.value() is not None
    return [k for k, is_live in live.items() if is_live]


def publish(bootstrap: str, parts: dict[str, dict], meta: dict) -> str:
    version = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    old = previous_keys(bootstrap)
    producer = Producer(client_config(bootstrap, {"enable.idempotence": True,
                                                   "compression.type": "lz4"}))
    for name_key, value in parts.items():
        producer.produce(PREGEN, key=f"{version}/{name_key}".encode(),
                         value=orjson.dumps({**value, "version": version}))
        producer.poll(0)
    # Parts are flushed before the manifest is written, so a manifest never
    # points at parts that could still be lost.
    if producer.flush(60):
        raise RuntimeError("pre-generated parts were not all delivered; no manifest written")
    producer.produce(PREGEN, key=f"{version}/manifest".encode(), value=orjson.dumps(
        {"version": version, "parts": len(parts), "meta": meta}))
    if producer.flush(30):
        raise RuntimeError("manifest not delivered")
    for key in old:
        producer.produce(PREGEN, key=key, value=None)
    producer.flush(30)
    return version


def run(bootstrap: str, *, window_days: float = 7.0, dim: int = 32, progress: bool = True) -> dict:
    started = time.time()
    events, invalid = read_events(bootstrap, progress=progress)
    if not events:
        raise RuntimeError("no events in the 'events' topic: nothing to pre-generate")
    now = max(ev.ts for ev in events)
    parts = batch_parts(events, now=now, window_days=window_days, dim=dim)
    meta = {"events": len(events), "invalid": invalid, "window_days": window_days, "dim": dim,
            "as_of": now}
    version = publish(bootstrap, parts, meta)
    return {"version": version, "parts": len(parts), **meta,
            "seconds": round(time.time() - started, 1)}


def set_funnel_config(bootstrap: str, surface: str, config: dict | None) -> None:
    """Publish (or with ``None`` remove) a surface's funnel config; workers apply it live."""
    if config is not None:
        from models.funnel import FunnelConfig
        FunnelConfig.from_dict(config)  # refuse a bad config here, not in every worker
    from schemas.topics import CONFIG
    producer = Producer(client_config(bootstrap))
    producer.produce(CONFIG, key=surface.encode(),
                     value=None if config is None else orjson.dumps(config))
    if producer.flush(10):
        raise RuntimeError("funnel config not delivered")

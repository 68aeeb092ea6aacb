"""The topic catalogue: every topic the system uses, in one place.

Topics are created from this list by ``streamrec topics create`` (never by
broker auto-create), so partition counts, keys and retention are deliberate.
Faust needs a table's changelog to have as many partitions as the topic that
feeds the table, so changelogs are listed here too.

>>> [t.name for t in catalogue(partitions=2)][:3]
['events', 'events.dlq', 'rec.requests']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

EVENTS = "events"
EVENTS_DLQ = "events.dlq"
REQUESTS = "rec.requests"
REPLIES = "rec.replies"
ITEM_DELTAS = "item.deltas"
TRENDING_SNAPSHOTS = "trending.snapshots"
ITEM_PROFILES = "item.profiles"
AUTHOR_ITEMS = "author.items"
PREGEN = "pregen.sources"
CONFIG = "config.funnel"
LABEL_TICKS = "labels.ticks"
MODEL_WEIGHTS = "models.weights"
MODEL_REGISTRY = "models.registry"
PREDICTIONS = "predictions"
STABILITY = "model.stability"
ALERTS = "alerts"
TRAINING_EXAMPLES = "training.examples"

HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    key: str
    value: str
    retention_ms: Optional[int] = None
    compact: bool = False

    def config(self) -> dict[str, str]:
        if self.compact:
            return {"cleanup.policy": "compact"}
        conf = {"cleanup.policy": "delete"}
        if self.retention_ms is not None:
            conf["retention.ms"] = str(self.retention_ms)
        return conf


def changelog_name(app_id: str, table: str) -> str:
    """Faust's name for a table's changelog topic."""
    return f"{app_id}-{table}-changelog"


def catalogue(partitions: int = 4, app_id: str = "streamrec") -> list[TopicSpec]:
    """All topics for a deployment whose keyed topics have ``partitions`` partitions."""
    p = partitions
    return [
        TopicSpec(EVENTS, p, "user_id", "EngagementEvent | [EngagementEvent] (JSON)", 7 * DAY_MS),
        TopicSpec(EVENTS_DLQ, 1, "original key", "dead letter (JSON)", 14 * DAY_MS),
        TopicSpec(REQUESTS, p, "user_id", "RecommendationRequest (JSON)", HOUR_MS),
        TopicSpec(REPLIES, p, "request_id", "RecommendationReply (JSON)", HOUR_MS),
        TopicSpec(ITEM_DELTAS, p, "item partition", "{item_id: delta} bundle (JSON): trending, co-engagement",
                  DAY_MS),
        TopicSpec(TRENDING_SNAPSHOTS, 1, "surface/partition", "top trending items (JSON)",
                  compact=True),
        TopicSpec(ITEM_PROFILES, p, "item_id",
                  "author, quality counts, top co-engaged neighbours (JSON)", compact=True),
        TopicSpec(AUTHOR_ITEMS, 1, "author/partition", "author's top recent items (JSON)",
                  compact=True),
        TopicSpec(PREGEN, 1, "version/name/key", "pre-generated sources, then a manifest (JSON)",
                  compact=True),
        TopicSpec(CONFIG, 1, "surface", "funnel config per surface (JSON)", compact=True),
        TopicSpec(LABEL_TICKS, p, "partition", "clock ticks that close label windows", HOUR_MS),
        # One partition: one trainer sees every example, in order.
        TopicSpec(TRAINING_EXAMPLES, 1, "user_id", "[labelled example] (JSON)", 7 * DAY_MS),
        TopicSpec(MODEL_WEIGHTS, 1, "model/version/part", "weight chunks, then a manifest",
                  compact=True),
        TopicSpec(MODEL_REGISTRY, 1, "model/version", "model version record (JSON)", compact=True),
        TopicSpec(PREDICTIONS, p, "user_id", "served predictions per request (JSON)", 7 * DAY_MS),
        TopicSpec(STABILITY, 1, "model:version", "rolling calibration and NE per head (JSON)",
                  compact=True),
        TopicSpec(ALERTS, 1, "model:version/head/metric", "SLO violations (JSON)", 30 * DAY_MS),
        TopicSpec(changelog_name(app_id, "user_history"), p, "user_id", "user history (JSON)",
                  compact=True),
        TopicSpec(changelog_name(app_id, "pending_labels"), p, "user_id",
                  "impressions waiting for engagements (JSON)", compact=True),
        TopicSpec(changelog_name(app_id, "item_stats"), p, "item_id", "item stats (JSON)",
                  compact=True),
    ]


def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner gives ``key``.

    Producers must use the same partitioner (confluent-kafka:
    ``partitioner=murmur2_random``) so a user's events and requests meet on one
    partition; the worker re-routes anything that arrives elsewhere.

    >>> partition_for("42", 4) == partition_for("42", 4)
    True
    """
    from aiokafka.partitioner import murmur2
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions

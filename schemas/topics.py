"""The topic catalogue: every topic the system uses, in one place.

Topics are created from this list by ``streamrec topics create`` (never by
broker auto-create), so partition counts, keys and retention are deliberate.
Faust needs a table's changelog to have as many partitions as the topic that
feeds the table, so changelogs are listed here too.  Each entry also names its
writers and readers (``"module: role"``), the map ``streamrec topics list``
prints; tests/test_topics.py checks it against the modules and the README.

>>> [t.name for t in catalogue(partitions=2)][:3]
['events', 'events.dlq', 'rec.requests']
>>> catalogue()[0].readers[0]
'streams.ingest: ingest agent (validate, dedupe, fold into user state)'
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
STATS = "cluster.stats"

#: Topics no module reads: operators read them (kcat, any consumer, alerting).
FOR_OPERATORS = (STABILITY, ALERTS)

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
    #: Who produces to it and who consumes it, each ``"module: role"``; no reader
    #: means only operators read it (kcat, any consumer).
    writers: tuple[str, ...] = ()
    readers: tuple[str, ...] = ()
    #: A compacted topic's records younger than this stay uncompacted (readers that
    #: start get that much history, then the latest per key).
    compaction_lag_ms: Optional[int] = None

    def config(self) -> dict[str, str]:
        if self.compact:
            if self.compaction_lag_ms is None:
                return {"cleanup.policy": "compact"}
            # Segments roll every tenth of the lag, so the cleaner can compact what is older.
            return {"cleanup.policy": "compact",
                    "min.compaction.lag.ms": str(self.compaction_lag_ms),
                    "segment.ms": str(max(60_000, self.compaction_lag_ms // 10))}
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
    shared_view = "stores.shared_view: SharedItemView on every worker"
    restore = "Faust, restoring the table after a restart or rebalance"
    return [
        TopicSpec(EVENTS, p, "user_id", "EngagementEvent | [EngagementEvent] (JSON)", 7 * DAY_MS,
                  writers=("streams.producer: EventProducer (streamrec produce, replay, demo, "
                           "simulate; the benches)",
                           "streams.ingest: ingest agent, re-routing an event to its user's partition",
                           "streams.deadletters: streamrec deadletters redrive, parked events "
                           "back"),
                  readers=("streams.ingest: ingest agent (validate, dedupe, fold into user state)",
                           "streams.pregen: streamrec pregen (every retained event)",
                           "bench.ingest: the ingest bench's raw consumer",
                           "bench.drill: --dump, to trace an item count that is off")),
        TopicSpec(EVENTS_DLQ, 1, "original key", "dead letter (JSON)", 14 * DAY_MS,
                  writers=("streams.deadletters: send_dead_letter, for what the ingest, "
                           "item_stats and serving agents cannot use (streams.agent_errors: "
                           "messages that fail alone)",),
                  readers=("streams.deadletters: streamrec deadletters redrive (read_records)",
                           "streams.cluster_stats: FlowSensor, counting reasons as they are "
                           "sent (no consumer)")),
        TopicSpec(REQUESTS, p, "user_id", "RecommendationRequest (JSON)", HOUR_MS,
                  writers=("streams.client: RecommendationClient (streamrec recommend, demo, "
                           "simulate; bench/serve.py)",
                           "streams.serving: serving agent, re-routing a request to its user's "
                           "partition",
                           "streams.deadletters: streamrec deadletters redrive, parked requests "
                           "back"),
                  readers=("streams.serving: serving agent (the funnel)",)),
        TopicSpec(REPLIES, p, "request_id", "RecommendationReply (JSON)", HOUR_MS,
                  writers=("streams.serving: serving agent, to the partition the client chose",),
                  readers=("streams.client: RecommendationClient",
                           "streams.cluster_stats: FlowSensor, counting stages and sources as "
                           "replies are sent (no consumer)")),
        TopicSpec(ITEM_DELTAS, p, "item partition", "{item_id: delta} bundle (JSON): trending, co-engagement",
                  DAY_MS,
                  writers=("streams.ingest: ingest agent, one bundle per item partition",
                           "streams.item_stats: item_stats agent, re-routing a bundle to its "
                           "items' partition",
                           "streams.deadletters: streamrec deadletters redrive, parked bundles "
                           "back"),
                  readers=("streams.item_stats: item_stats agent",
                           "bench.drill: --dump, to trace an item count that is off")),
        TopicSpec(TRENDING_SNAPSHOTS, 1, "surface/partition", "top trending items (JSON)",
                  compact=True, writers=("streams.item_stats: item_stats agent",),
                  readers=(f"{shared_view} (trending; item_stats re-seeds its boards from it)",)),
        TopicSpec(ITEM_PROFILES, p, "item_id",
                  "author, quality counts, top co-engaged neighbours (JSON)", compact=True,
                  writers=("streams.item_stats: item_stats agent",),
                  readers=(f"{shared_view} (neighbours, quality, authors)",)),
        TopicSpec(AUTHOR_ITEMS, 1, "author/partition", "author's top recent items (JSON)",
                  compact=True, writers=("streams.item_stats: item_stats agent",),
                  readers=(f"{shared_view} (author source)",)),
        TopicSpec(PREGEN, 1, "version/name/key", "pre-generated sources, then a manifest (JSON)",
                  compact=True,
                  writers=("streams.pregen: streamrec pregen (parts, the manifest, then "
                           "tombstones for older batches)",),
                  readers=(f"{shared_view} (popular lists, embedding index)",
                           "streams.pregen: streamrec pregen (older batches' keys)")),
        TopicSpec(CONFIG, 1, "surface", "funnel config per surface (JSON)", compact=True,
                  writers=("streams.pregen: streamrec config (set_funnel_config)",),
                  readers=(f"{shared_view} (funnel config per surface)",)),
        TopicSpec(LABEL_TICKS, p, "partition", "clock ticks that close label windows", HOUR_MS,
                  writers=("streams.labels: every worker's timer, for the partitions it owns",),
                  readers=("streams.labels: label_clock agent",)),
        # One partition: one trainer sees every example, in order.
        TopicSpec(TRAINING_EXAMPLES, 1, "user_id", "[labelled example] (JSON)", 7 * DAY_MS,
                  writers=("streams.labels: the label join, run by the ingest agent",),
                  readers=("streams.trainer: trainer agent; streamrec train (bootstrap)",
                           "streams.stability: stability agent",
                           "streams.evaluate: streamrec launch evaluate (recorded traffic "
                           "replayed against a candidate and production)")),
        TopicSpec(MODEL_WEIGHTS, 1, "model/version/part", "weight chunks, then a manifest",
                  compact=True,
                  writers=("stores.model_store: publish (trainer agent, streamrec train), "
                           "register (streamrec models register)",),
                  readers=(f"{shared_view} (loads every version)",
                           "stores.model_store: publish, promote, rollback (versions present); "
                           "version_blobs (streamrec models register, launch evaluate)")),
        TopicSpec(MODEL_REGISTRY, 1, "model/version", "model version record (JSON)", compact=True,
                  writers=("stores.model_store: publish (trainer agent, streamrec train), "
                           "register, promote and rollback (streamrec models)",),
                  readers=(f"{shared_view} (which version is live)",
                           "stores.model_store: read_registry (streamrec models list, the "
                           "trainer, bench/closed_loop.py)")),
        TopicSpec(PREDICTIONS, p, "user_id", "served predictions per request (JSON)", 7 * DAY_MS,
                  writers=("streams.serving: serving agent, head probabilities per request",),
                  readers=("streams.simulate: streamrec simulate (calibration against the "
                           "world's true probabilities)",)),
        TopicSpec(STABILITY, 1, "model:version", "rolling calibration and NE per head (JSON)",
                  compact=True, writers=("streams.stability: stability agent",)),
        TopicSpec(ALERTS, 1, "model:version/head/metric", "SLO violations (JSON)", 30 * DAY_MS,
                  writers=("streams.stability: stability agent",)),
        # One partition: every worker reads every worker's figures.
        TopicSpec(STATS, 1, "worker id", "a worker's figures for the cluster dashboard (JSON)",
                  compact=True, compaction_lag_ms=HOUR_MS,
                  writers=("streams.cluster_stats: every worker's stats timer (every 2 s)",),
                  readers=("streams.cluster_stats: ClusterView on every worker (/dashboard/, "
                           "/cluster/) and in `streamrec dashboard` (streams.dashboard_server)",)),
        TopicSpec(changelog_name(app_id, "user_history"), p, "user_id", "user history (JSON)",
                  compact=True, writers=("streams.ingest: ingest agent's user_history writes",),
                  readers=(f"streams.tables: {restore}",)),
        TopicSpec(changelog_name(app_id, "pending_labels"), p, "user_id",
                  "impressions waiting for engagements (JSON)", compact=True,
                  writers=("streams.labels: the label join's pending_labels writes",),
                  readers=(f"streams.tables: {restore}",)),
        TopicSpec(changelog_name(app_id, "item_stats"), p, "item_id", "item stats (JSON)",
                  compact=True, writers=("streams.item_stats: item_stats agent's table writes",),
                  readers=(f"streams.item_stats: {restore}",)),
    ]


def _duration(ms: int) -> str:
    for unit, size in (("d", DAY_MS), ("h", HOUR_MS), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size} {unit}"
    return f"{ms} ms"


def topic_map(specs: list[TopicSpec]) -> list[dict]:
    """Each topic's layout, writers and readers, as JSON-ready rows.

    >>> row = topic_map(catalogue())[0]
    >>> row["name"], row["cleanup"], row["writers"][1]
    ('events', 'retention 7 d', "streams.ingest: ingest agent, re-routing an event to its user's partition")
    """
    return [{"name": t.name, "partitions": t.partitions, "key": t.key, "value": t.value,
             "cleanup": ("compact" + (f", last {_duration(t.compaction_lag_ms)} kept whole"
                                      if t.compaction_lag_ms else "")) if t.compact else f"retention {_duration(t.retention_ms)}"
             if t.retention_ms is not None else "delete",
             "writers": list(t.writers), "readers": list(t.readers)} for t in specs]


def format_topic_map(specs: list[TopicSpec]) -> str:
    """The map as text: each topic's layout, then who writes and who reads it.

    >>> print(format_topic_map([TopicSpec("alerts", 1, "id", "alert (JSON)", DAY_MS,
    ...                                   writers=("streams.stability: stability agent",))]))
    alerts  partitions 1, key id, retention 1 d: alert (JSON)
      writes  streams.stability  stability agent
      reads   (operators only: kcat or any consumer)
    """
    rows = topic_map(specs)
    width = max((len(e.split(":", 1)[0]) for r in rows for e in r["writers"] + r["readers"]),
                default=0)
    lines = []
    for r in rows:
        lines.append(f"{r['name']}  partitions {r['partitions']}, key {r['key']}, "
                     f"{r['cleanup']}: {r['value']}")
        for label, entries in (("writes", r["writers"]), ("reads ", r["readers"])):
            if not entries:
                lines.append(f"  {label}  (operators only: kcat or any consumer)")
            for n, entry in enumerate(entries):
                module, _, role = entry.partition(":")
                lines.append(f"  {label if n == 0 else ' ' * 6}  {module:{width}s}  {role.strip()}")
    return "\n".join(lines)


def item_deltas_key(partition: int) -> bytes:
    """The key of a bundle of ``partition``'s item deltas on ``item.deltas``; a bundle
    read on another partition was not put there by ingest (a re-driven dead letter).

    >>> item_deltas_key(3)
    b'items-p3'
    """
    return f"items-p{partition}".encode()


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

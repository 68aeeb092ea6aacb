"""The worker: one Faust app, assembled here.

Run with ``streamrec worker`` or ``faust -A streams.app worker -l info``.
Topics must exist first (``streamrec topics create``): the app never declares
topics itself, so the catalogue in :mod:`schemas.topics` is the only source
of partition counts and retention.
"""
from __future__ import annotations

from schemas import codec
from streams.kafka_config import faust_credentials
from streams.settings import settings
from streams.tuning import StreamrecApp

codec.register()

app = StreamrecApp(
    settings.app_id,
    broker=f"kafka://{settings.bootstrap}",
    # TLS and SASL/SCRAM from STREAMREC_SECURITY_PROTOCOL & co (streams/kafka_config.py).
    broker_credentials=faust_credentials(),
    store="rocksdb://",
    datadir=str(settings.data_dir),
    web_port=settings.web_port,
    topic_partitions=settings.partitions,
    topic_allow_declare=False,
    topic_disable_leader=True,
    key_serializer="raw",
    value_serializer="raw",
    consumer_auto_offset_reset="earliest",
    producer_linger=settings.producer_linger_ms / 1000.0,
    # With stream_wait_empty=True, stopping after serving requests can hang.
    stream_wait_empty=False,
    fetch_wait_ms=settings.fetch_wait_ms,
    # Failover (streams/settings.py): a restarted worker rejoins as the same static
    # member and a dead one is dropped after the session timeout, not Faust's 60 s.
    consumer_group_instance_id=settings.instance_id(),
    broker_session_timeout=settings.session_timeout_s,
    broker_heartbeat_interval=settings.heartbeat_interval_s,
    broker_rebalance_timeout=settings.rebalance_timeout_s,
    broker_commit_interval=settings.commit_interval_s,
    stop_timeout=settings.stop_timeout_s,
)

# Agents, tables and pages register themselves on import.
from streams import tables, labels, ingest, item_stats, serving, trainer, stability, web  # noqa: E402,F401,I001

main = app.main

"""Create the catalogue's topics on the broker (never rely on auto-create), and read
the broker settings the worker must respect."""
from __future__ import annotations

from typing import Optional

from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from schemas.topics import TopicSpec
from streams.kafka_config import client_config


class TopicMismatch(RuntimeError):
    pass


def replication_config(replication_factor: int, min_insync_replicas: Optional[int]) -> dict:
    """Topic configs for a replicated topic: writes with acks=all need
    ``min.insync.replicas`` copies (default: all but one, at least 1).

    >>> replication_config(1, None), replication_config(3, None), replication_config(3, 1)
    ({}, {'min.insync.replicas': '2'}, {'min.insync.replicas': '1'})
    """
    if min_insync_replicas is None:
        if replication_factor == 1:
            return {}
        min_insync_replicas = max(1, replication_factor - 1)
    if not 1 <= min_insync_replicas <= replication_factor:
        raise ValueError(f"min.insync.replicas {min_insync_replicas} must be in "
                         f"1..{replication_factor} (the replication factor)")
    return {"min.insync.replicas": str(min_insync_replicas)}


def create_topics(bootstrap: str, specs: list[TopicSpec], timeout: float = 30.0, *,
                  replication_factor: Optional[int] = None,
                  min_insync_replicas: Optional[int] = None) -> dict:
    """Create missing topics; check existing ones have the catalogue's partition count.

    ``replication_factor`` and ``min_insync_replicas`` default to the settings'
    (``STREAMREC_REPLICATION_FACTOR``, ``STREAMREC_MIN_INSYNC_REPLICAS``): 1 and
    unset on one broker; on a cluster, e.g. 3 and 2.
    Returns ``{"created": [...], "existing": [...]}``.
    """
    from streams.settings import settings
    replication_factor = replication_factor or settings.replication_factor
    if min_insync_replicas is None:
        min_insync_replicas = settings.min_insync_replicas or None
    replicated = replication_config(replication_factor, min_insync_replicas)
    admin = AdminClient(client_config(bootstrap))
    existing = admin.list_topics(timeout=timeout).topics
    created, present = [], []
    for spec in specs:
        if spec.name in existing:
            have = len(existing[spec.name].partitions)
            if have != spec.partitions:
                raise TopicMismatch(
                    f"topic {spec.name!r} has {have} partitions, the catalogue says "
                    f"{spec.partitions}; delete it or set STREAMREC_PARTITIONS={have}")
            present.append(spec.name)
    new = [NewTopic(s.name, num_partitions=s.partitions, replication_factor=replication_factor,
                    config={**s.config(), **replicated})
           for s in specs if s.name not in existing]
    if new:
        for name, fut in admin.create_topics(new, operation_timeout=timeout).items():
            try:
                fut.result()
                created.append(name)
            except Exception as exc:  # already created by a concurrent caller is fine
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
                present.append(name)
    return {"created": created, "existing": present}


def delete_topics(bootstrap: str, names: list[str], timeout: float = 30.0) -> None:
    admin = AdminClient(client_config(bootstrap))
    existing = admin.list_topics(timeout=timeout).topics
    futures = admin.delete_topics([n for n in names if n in existing], operation_timeout=timeout)
    for fut in futures.values():
        fut.result()


def min_session_timeout_s(bootstrap: str, timeout: float = 10.0) -> Optional[float]:
    """The broker's ``group.min.session.timeout.ms`` in seconds (a consumer asking for a
    shorter session is refused), or None when it cannot be read (e.g. not allowed)."""
    admin = AdminClient(client_config(bootstrap))
    try:
        broker_id = next(iter(admin.list_topics(timeout=timeout).brokers))
        resource = ConfigResource(ConfigResource.Type.BROKER, str(broker_id))
        configs = admin.describe_configs([resource], request_timeout=timeout)[resource].result(
            timeout=timeout)
        return int(configs["group.min.session.timeout.ms"].value) / 1000.0
    except Exception:
        return None

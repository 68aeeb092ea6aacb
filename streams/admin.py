"""Create the catalogue's topics on the broker (never rely on auto-create)."""
from __future__ import annotations

from confluent_kafka.admin import AdminClient, NewTopic

from schemas.topics import TopicSpec


class TopicMismatch(RuntimeError):
    pass


def create_topics(bootstrap: str, specs: list[TopicSpec], timeout: float = 30.0) -> dict:
    """Create missing topics; check existing ones have the catalogue's partition count.

    Returns ``{"created": [...], "existing": [...]}``.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
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
    new = [NewTopic(s.name, num_partitions=s.partitions, replication_factor=1, config=s.config())
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
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = admin.list_topics(timeout=timeout).topics
    futures = admin.delete_topics([n for n in names if n in existing], operation_timeout=timeout)
    for fut in futures.values():
        fut.result()

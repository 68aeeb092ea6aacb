"""The worker: one Faust app, assembled here.

Run with ``streamrec worker`` or ``faust -A streams.app worker -l info``.
Topics must exist first (``streamrec topics create``): the app never declares
topics itself, so the catalogue in :mod:`schemas.topics` is the only source
of partition counts and retention.
"""
from __future__ import annotations

from schemas import codec
from streams.settings import settings
from streams.tuning import StreamrecApp, kafka_options

codec.register()

app = StreamrecApp(
    settings.app_id,
    **kafka_options(settings),
    store="rocksdb://",
    datadir=str(settings.data_dir),
    web_port=settings.web_port,
    # A restarted worker rejoins as the same static member, so it gets its partitions back at once.
    consumer_group_instance_id=settings.instance_id(),
    stop_timeout=settings.stop_timeout_s,
)

# Agents, tables and pages register themselves on import.
from streams import tables, labels, ingest, item_stats, serving, trainer, stability, web  # noqa: E402,F401,I001
from streams import heap  # noqa: E402


@app.timer(heap.FREEZE_INTERVAL_S, name="freeze_heap")
async def freeze_heap() -> None:
    # Full collections walk every tracked object with the loop stopped (see streams/heap.py).
    heap.freeze()

main = app.main

"""The worker's web pages: a dashboard at ``/dashboard/``, its data as JSON at ``/stats/``."""
from __future__ import annotations

from pathlib import Path

from streams import metrics
from streams.app import app
from streams.view import view


DASHBOARD = Path(__file__).with_name("dashboard.html")


@app.page("/dashboard/")
async def dashboard(web, request):
    return web.html(DASHBOARD.read_text())


def consumer_lag() -> dict:
    """Messages behind per topic and partition this worker consumes (end - read)."""
    monitor = app.monitor
    lag: dict = {}
    for tp, end in dict(monitor.tp_end_offsets or {}).items():
        read = (monitor.tp_read_offsets or {}).get(tp)
        if read is not None:
            lag.setdefault(tp.topic, {})[tp.partition] = max(0, end - read - 1)
    return lag


@app.page("/stats/")
async def stats(web, request):
    snap = metrics.snapshot()
    snap["lag"] = consumer_lag()
    from streams.stability import latest
    snap["stability"] = latest
    batch = view.pregen_batch
    snap["shared_view"] = {"messages": view.messages, "bad_messages": view.bad_messages,
                           "last_update": view.last_update,
                           "pregen_version": batch.version if batch else None,
                           "live_model": (f"{view.scorer.model}:{view.scorer.version}"
                                          if view.scorer else None),
                           "model_versions_loaded": sorted(f"{m}:{v}" for m, v in view.models),
                           "tower_index_items": len(view.tower_index) if view.tower_index else 0,
                           "tower_vectors_refreshed": view.tower_refreshed}
    return web.json(snap)

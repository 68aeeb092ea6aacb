"""The worker's web pages: counters and latency as JSON at ``/stats/``."""
from __future__ import annotations

from streams import metrics
from streams.app import app
from streams.view import view


@app.page("/stats/")
async def stats(web, request):
    snap = metrics.snapshot()
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

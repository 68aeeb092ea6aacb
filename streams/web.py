"""The worker's web pages.

- ``/dashboard/``: the cluster dashboard (overview, models, funnel), one static
  page polling ``/cluster/``;
- ``/cluster/``: every worker's latest figures merged, plus the last hour as
  series (``?since=<epoch s>`` for only the newer rows);
- ``/stats/``: this worker's own figures as JSON;
- ``/metrics``: the same for Prometheus;
- ``/inspect/?user=42&surface=explore&k=10``: sends a real request over
  ``rec.requests`` and returns the reply, with why each item was chosen.

The pages listen on loopback unless ``STREAMREC_WEB_BIND`` says otherwise; then
``STREAMREC_WEB_TOKEN`` must be set and every request must carry it. What these
pages share with ``streamrec dashboard`` (the token, /cluster/'s payload, the
inspector) is in :mod:`streams.dashboard_server`, which needs no Faust app.
"""
from __future__ import annotations

from streams import cluster_stats, metrics
from streams.app import app
from streams.dashboard_server import (DASHBOARD, OneClient, check_exposure, cluster_payload,
                                      inspect as inspect_reply, since_from, token_middleware)
from streams.settings import settings
from streams.view import view

#: The token in force is the settings' (read per request).
require_token = token_middleware(lambda: settings.web_token)

check_exposure(settings.web_bind, settings.web_token)
cluster_stats.install(app, view)
app.conf.web_bind = settings.web_bind
# Every route, Faust's own pages included; aiohttp freezes the list when the server starts.
app.web.web_app.middlewares.append(require_token)


@app.page("/dashboard/")
async def dashboard(web, request):
    return web.html(DASHBOARD.read_text())


def consumer_lag() -> dict:
    return cluster_stats.consumer_lag()


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
    snap["worker"] = cluster_stats.WORKER_ID
    return web.json(cluster_stats.clean(snap))


@app.page("/metrics")
async def prometheus_metrics(web, request):
    from prometheus_client import CONTENT_TYPE_LATEST
    return web.bytes(metrics.prometheus_text(cluster_stats.local_figures()),
                     headers={"Content-Type": CONTENT_TYPE_LATEST})


@app.page("/cluster/")
async def cluster(web, request):
    return web.json(cluster_payload(cluster_stats.cluster_view, cluster_stats.WORKER_ID,
                                    since_from(request.query.get("since"))))


_client = OneClient(settings.bootstrap)


@app.page("/inspect/")
async def inspect(web, request):
    status, body = await inspect_reply(_client, request.query)
    return web.json(body, status=status)

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
``STREAMREC_WEB_TOKEN`` must be set and every request must carry it.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
from pathlib import Path
from typing import Optional

from aiohttp import web as aioweb

from streams import cluster_stats, metrics
from streams.app import app
from streams.settings import settings
from streams.view import view

DASHBOARD = Path(__file__).with_name("dashboard.html")
INSPECT_TIMEOUT_S = 2.0


def is_loopback(host: str) -> bool:
    """
    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(bind: str, token: str) -> None:
    """Refuse to expose the pages beyond this machine without a token.

    >>> check_exposure("127.0.0.1", "")
    >>> check_exposure("0.0.0.0", "")
    Traceback (most recent call last):
    ...
    ValueError: STREAMREC_WEB_BIND=0.0.0.0 exposes the dashboard beyond this machine: set STREAMREC_WEB_TOKEN too
    """
    if not is_loopback(bind) and not token:
        raise ValueError(f"STREAMREC_WEB_BIND={bind} exposes the dashboard beyond this machine: "
                         "set STREAMREC_WEB_TOKEN too")


def token_ok(expected: str, authorization: Optional[str], query_token: Optional[str]) -> bool:
    """Whether a request carries the token (none needed when none is set).

    >>> token_ok("", None, None), token_ok("s3", "Bearer s3", None), token_ok("s3", None, "s3")
    (True, True, True)
    >>> token_ok("s3", "Bearer nope", None), token_ok("s3", None, None)
    (False, False)
    """
    if not expected:
        return True
    given = query_token or ""
    if authorization and authorization.startswith("Bearer "):
        given = authorization[len("Bearer "):]
    return hmac.compare_digest(given.encode(), expected.encode())


@aioweb.middleware
async def require_token(request, handler):
    if not token_ok(settings.web_token, request.headers.get("Authorization"),
                    request.query.get("token")):
        return aioweb.json_response({"error": "missing or wrong token"}, status=401)
    return await handler(request)


check_exposure(settings.web_bind, settings.web_token)
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
    try:
        since = float(request.query.get("since", "0"))
    except ValueError:
        since = 0.0
    view_ = cluster_stats.cluster_view
    return web.json(cluster_stats.clean({
        **view_.cluster(), "served_by": cluster_stats.WORKER_ID,
        "stale_s": cluster_stats.STALE_S, "history_step_s": cluster_stats.HISTORY_STEP_S,
        "history": view_.series(since=since)}))


_client: dict = {}


async def _inspector_client():
    if "client" not in _client:
        from streams.client import RecommendationClient
        _client["client"] = await asyncio.get_running_loop().run_in_executor(
            None, RecommendationClient, settings.bootstrap)
    return _client["client"]


@app.page("/inspect/")
async def inspect(web, request):
    user = (request.query.get("user") or "").strip()
    surface = (request.query.get("surface") or "explore").strip()
    try:
        k = max(1, min(50, int(request.query.get("k", "10"))))
    except ValueError:
        k = 10
    if not user:
        return web.json({"error": "name a user: /inspect/?user=42"}, status=400)
    client = await _inspector_client()
    try:
        reply = await asyncio.wrap_future(client.submit(user, surface, k,
                                                        timeout=INSPECT_TIMEOUT_S))
    except Exception as exc:
        return web.json({"error": f"{type(exc).__name__}: {exc}", "user_id": user}, status=504)
    return web.json(cluster_stats.clean(reply.to_dict()))

"""The dashboard's figures without a broker: Prometheus exposition, merging workers'
figures and history, dead-letter reasons, the sensor, and the web token."""
from __future__ import annotations

import asyncio
import random
import types

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams import cluster_stats, metrics
from streams.cluster_stats import ClusterView, FlowSensor, merge_cluster, merge_history


def scrape(text: bytes) -> dict:
    """``{(name, labels as sorted tuple): value}`` of every sample."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}


def figures(wid="w1", at=100.0, requests=0.0, latencies=(), **extra) -> dict:
    return {"worker": wid, "at": at, "counters": {"requests_served": 7, "dead_letters": 2},
            "rates": {"requests": requests, "fallbacks": requests / 4,
                      "messages_in": {"events": 10.0}},
            "latency_hist": metrics.histogram(latencies), **extra}


def test_prometheus_exposition_carries_the_figures():
    f = {"counters": {"requests_served": 12, "events_applied": 30}, "uptime_s": 5.5,
         "messages_in": {"events": 40}, "messages_out": {"rec.replies": 12},
         "latency_ms": {"n": 3, "p50": 4.0, "p95": 9.0, "p99": 9.5},
         "lag": {"events": {0: 3, 1: 0}},
         "group_lag": {"streamrec": {"events": {"0": 3}}},
         "dead_letter_reasons": {"not valid JSON: …": 2},
         "models": {"live": "mtml:v2"},
         "stability": {"report": {"mtml:v2": {"click": {"n": 50, "calibration": 1.1, "ne": 0.9}},
                                  "mtml:v1": {"click": {"n": 20, "calibration": 0.7,
                                                        "ne": float("nan")}}},
                       "alerts": [{"model": "mtml:v1"}]}}
    s = scrape(metrics.prometheus_text(f))
    assert s[("streamrec_requests_served_total", ())] == 12
    assert s[("streamrec_events_applied_total", ())] == 30
    assert s[("streamrec_messages_in_total", (("topic", "events"),))] == 40
    assert s[("streamrec_reply_latency_window_ms", (("quantile", "0.99"),))] == 9.5
    assert s[("streamrec_consumer_lag", (("partition", "0"), ("topic", "events")))] == 3
    assert s[("streamrec_group_lag", (("group", "streamrec"), ("partition", "0"),
                                      ("topic", "events")))] == 3
    assert s[("streamrec_dead_letter_reasons_total", (("reason", "not valid JSON: …"),))] == 2
    live = (("head", "click"), ("live", "true"), ("model", "mtml:v2"))
    assert s[("streamrec_model_calibration", live)] == 1.1
    assert s[("streamrec_model_ne", live)] == 0.9
    # NaN (no positives yet) is left out rather than exported as a number.
    assert ("streamrec_model_ne", (("head", "click"), ("live", "false"),
                                   ("model", "mtml:v1"))) not in s
    assert s[("streamrec_model_alerts", ())] == 1


def test_reply_latency_histogram_counts_observations():
    before = scrape(metrics.prometheus_text({})).get(("streamrec_reply_latency_seconds_count", ()), 0)
    metrics.observe_latency(3.0)
    metrics.observe_latency(300.0)
    s = scrape(metrics.prometheus_text({}))
    assert s[("streamrec_reply_latency_seconds_count", ())] == before + 2
    assert s[("streamrec_reply_latency_seconds_bucket", (("le", "0.005"),))] >= 1


def test_merged_latency_percentiles_are_within_a_bucket_of_the_exact_ones():
    rng = random.Random(3)
    a = [rng.lognormvariate(2.5, 0.8) for _ in range(3000)]
    b = [rng.lognormvariate(4.0, 0.5) for _ in range(1000)]
    merged = merge_cluster({"a": figures("a", latencies=a), "b": figures("b", latencies=b)},
                           now=101.0)["latency_ms"]
    assert merged["n"] == 4000
    for q in (50, 95, 99):
        exact = metrics.percentile(a + b, q)
        assert exact <= merged[f"p{q}"] <= exact * metrics.BUCKET_RATIO, (q, exact, merged)


def test_a_worker_with_old_figures_is_down_and_its_rates_leave_the_sum():
    c = merge_cluster({"a": figures("a", at=100.0, requests=4.0),
                       "b": figures("b", at=91.0, requests=6.0)}, now=101.0, stale_s=8.0)
    assert [(w["id"], w["up"], w["age_s"]) for w in c["workers"]] == [("a", True, 1.0),
                                                                     ("b", False, 10.0)]
    assert c["workers_up"] == 1
    assert c["rates"]["requests"] == 4.0 and c["rates"]["messages_in"] == {"events": 10.0}
    assert c["fallback_share"] == 0.25
    # Work a worker did before it died still counts.
    assert c["counters"] == {"dead_letters": 4, "requests_served": 14}


def test_history_merges_workers_per_bucket():
    history = {"a": [(100.0, {"rates": {"requests": 1.0}}), (111.0, {"rates": {"requests": 2.0}})],
               "b": [(103.0, {"rates": {"requests": 5.0}, "model": "m:v1",
                              "heads": {"click": {"calibration": 1.0}}})]}
    rows = merge_history(history, step_s=10.0)
    assert [(r["t"], r["rates"]["requests"], r["model"]) for r in rows] == [
        (100.0, 6.0, "m:v1"), (110.0, 2.0, None)]
    assert [r["t"] for r in merge_history(history, step_s=10.0, since=105.0)] == [110.0]


def test_cluster_view_keeps_latest_and_history_per_worker(monkeypatch):
    now = 1000.0
    monkeypatch.setattr(cluster_stats.time, "time", lambda: now)
    view = ClusterView("unused:1", "cluster.stats")
    for at in (990.0, 992.0, 994.0):
        view.apply(b"w1", orjson.dumps(figures("w1", at=at, requests=at - 990)))
    view.apply(b"w2", orjson.dumps(figures("w2", at=985.0, requests=1.0)))
    c = view.cluster(now)
    assert {w["id"]: w["up"] for w in c["workers"]} == {"w1": True, "w2": False}
    assert c["rates"]["requests"] == 4.0
    assert sum(len(s) for s in view.history.values()) == 4
    assert [r["t"] for r in view.series()] == [980.0, 990.0]
    view.apply(b"w2", None)  # a tombstone removes the worker
    assert [w["id"] for w in view.cluster(now)["workers"]] == ["w1"]


def test_only_the_live_version_and_a_few_recent_are_kept():
    report = {f"mtml:v{i}": {"click": {"n": i}} for i in range(1, 10)}
    kept = cluster_stats.recent_versions(report, "mtml:v2", keep=3)
    assert list(kept) == ["mtml:v2", "mtml:v7", "mtml:v8", "mtml:v9"]


def test_dead_letter_reasons_group_by_kind():
    reasons = ["'event_type' must be one of click, like; got 'poke'",
               "'event_type' must be one of click, like; got 'zap'",
               "'ts' is 901 s in the future; at most 300 s ahead"]
    assert len({cluster_stats.reason_kind(r) for r in reasons}) == 2


def test_sensor_counts_dead_letter_reasons_and_reply_stages():
    sensor = FlowSensor()
    send = lambda topic, value: sensor.on_send_initiated(  # noqa: E731
        None, topic, types.SimpleNamespace(value=orjson.dumps(value)), 0, 0)
    send("events.dlq", {"reason": "not valid JSON: line 1 column 2"})
    send("events.dlq", {"reason": "not valid JSON: line 3 column 9"})
    send("rec.replies", {"items": [{"sources": ["trending", "author"]}, {"sources": ["embedding"]}],
                         "stage_counts": {"retrieved": 40, "ranked": 30}})
    send("rec.replies", {"items": [], "error": "bad request"})
    send("events", {"reason": "ignored"})
    sensor.on_send_initiated(None, "rec.replies", types.SimpleNamespace(value=b"{oops"), 0, 0)
    assert dict(sensor.dead_letter_reasons) == {"not valid JSON: line N column N": 2}
    assert sensor.replies == 1
    assert dict(sensor.stage_sums) == {"retrieved": 40, "ranked": 30}
    assert dict(sensor.sources) == {"trending": 1, "embedding": 1}


@pytest.mark.parametrize("token, headers, query, status", [
    ("", {}, "", 200),
    ("s3cret", {}, "", 401),
    ("s3cret", {"Authorization": "Bearer s3cret"}, "", 200),
    ("s3cret", {}, "?token=s3cret", 200),
    ("s3cret", {}, "?token=guess", 401),
])
def test_the_token_guards_every_page(monkeypatch, token, headers, query, status):
    import dataclasses

    from aiohttp import web as aioweb
    from aiohttp.test_utils import TestClient, TestServer

    from streams import web
    monkeypatch.setattr(web, "settings", dataclasses.replace(web.settings, web_token=token))

    async def run():
        server = aioweb.Application(middlewares=[web.require_token])
        async def page(request):
            return aioweb.Response(text="ok")
        server.router.add_get("/metrics", page)
        async with TestClient(TestServer(server)) as client:
            return (await client.get("/metrics" + query, headers=headers)).status
    assert asyncio.run(run()) == status


def test_the_grafana_dashboard_queries_only_metrics_the_worker_exports():
    import json
    import re
    from pathlib import Path
    dashboard = Path(__file__).resolve().parents[1] / "deploy/grafana/dashboards/streamrec.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bstreamrec_\w+", e)}
    figures = {"counters": {"events_ingested": 1, "requests_served": 1, "fallbacks": 1},
               "messages_in": {"events": 1}, "messages_out": {"rec.replies": 1},
               "group_lag": {"g": {"events": {"0": 1}}}, "dead_letter_reasons": {"r": 1},
               "models": {"live": "m:v1"},
               "stability": {"report": {"m:v1": {"click": {"n": 5, "calibration": 1.0, "ne": 0.9}}}}}
    exported = set(scrape(metrics.prometheus_text(figures)).keys())
    exported = {name for name, _ in exported}
    assert used and used <= exported, used - exported

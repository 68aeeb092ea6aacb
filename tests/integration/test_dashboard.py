"""The worker's monitoring endpoints against a real broker: /metrics agrees with
/stats/, and /cluster/ shows the worker's published figures and their history."""
from __future__ import annotations

import time
import urllib.request

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.topics import STATS
from streams.client import RecommendationClient
from streams.producer import EventProducer

from .conftest import latest_by_key, new_event, read_topic

pytestmark = pytest.mark.integration


def get(worker, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}{path}", timeout=10) as r:
        return r.read()


def scrape(worker) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(get(worker, "/metrics").decode())
            for s in fam.samples}


def quiet_counters(worker, timeout: float = 30.0) -> dict:
    """The worker's counters once two reads 1 s apart agree (nothing in flight)."""
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        now = worker.stats()["counters"]
        if now == last:
            return now
        last = now
        time.sleep(1.0)
    raise TimeoutError("the worker's counters kept moving")


def test_metrics_endpoint_matches_the_workers_stats(kafka, worker):
    before = worker.counter("events_applied")
    with EventProducer(kafka) as p:
        for i in range(5):
            p.send(new_event("prom-user", f"prom-{i}", "like"))
        p.send_raw(b"prom-user", b"{not json")
    worker.wait_for("events_applied", before + 5, timeout=30)
    with RecommendationClient(kafka) as client:
        for _ in range(3):
            assert client.recommend("prom-user", "explore", k=5, timeout=5.0).error is None
    counters = quiet_counters(worker)
    samples = scrape(worker)
    assert worker.stats()["counters"] == counters, "counters moved during the scrape"
    for name, value in counters.items():
        assert samples[(f"streamrec_{name}_total", ())] == value, name
    assert samples[("streamrec_requests_served_total", ())] >= 3
    assert samples[("streamrec_reply_latency_seconds_count", ())] == counters["requests_served"]
    p50 = samples[("streamrec_reply_latency_window_ms", (("quantile", "0.5"),))]
    assert 0 < p50 <= samples[("streamrec_reply_latency_window_ms", (("quantile", "0.99"),))]
    assert samples[("streamrec_messages_in_total", (("topic", "events"),))] >= 6
    assert any(name == "streamrec_dead_letter_reasons_total" and "not valid JSON" in dict(labels)["reason"]
               for name, labels in samples)
    lag = worker.stats()["lag"]
    for topic, parts in lag.items():
        for p, v in parts.items():
            assert samples[("streamrec_consumer_lag", (("partition", str(p)), ("topic", topic)))] == v


def test_worker_publishes_its_figures_and_cluster_merges_them(kafka, worker):
    wid = worker.stats()["worker"]
    figures = latest_by_key(read_topic(kafka, STATS, timeout=10,
                                       until=lambda m: any(k == wid.encode() for k, _ in m)))
    assert figures[wid.encode()]["worker"] == wid
    counters = quiet_counters(worker)
    time.sleep(3)  # one more publication after the counters settled
    cluster = orjson.loads(get(worker, "/cluster/"))
    assert (wid, True) in [(w["id"], w["up"]) for w in cluster["workers"]]
    if len(cluster["workers"]) == 1:
        assert cluster["counters"] == counters
    assert cluster["history"], "no history rows"
    assert {"requests", "events", "messages_in"} <= set(cluster["history"][-1]["rates"])
    # The broker's committed offsets of the worker's group.
    assert "streamrec" in cluster["group_lag"]
    newer = orjson.loads(get(worker, f"/cluster/?since={cluster['history'][-1]['t']}"))
    assert newer["history"] and all(r["t"] >= cluster["history"][-1]["t"]
                                    for r in newer["history"])

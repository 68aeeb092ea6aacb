"""In-process counters and latency samples the worker exposes on its web port.

Agents count into :data:`counters` and serving calls :func:`observe_latency`;
the web pages read :func:`snapshot` (``/stats/``), :mod:`streams.cluster_stats`
publishes the same figures for the cluster dashboard, and :func:`prometheus_text`
renders them with prometheus_client for ``/metrics``.
"""
from __future__ import annotations

import math
import re
import time
from collections import Counter, deque
from typing import Iterable, Optional

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

counters: Counter = Counter()
#: (wall time, ms) of the latest replies, from request received to reply sent.
_latencies: deque = deque(maxlen=5000)
started_at = time.time()
#: Seconds of replies the cluster figures' latency histograms cover.
LATENCY_WINDOW_S = 60.0
#: Log-spaced latency buckets for merging across workers: each is ~10% wide.
BUCKET_RATIO = 1.1

#: A real Prometheus histogram beside the window, so rates and quantiles can be
#: computed by Prometheus over any range (``histogram_quantile``).
_registry = CollectorRegistry(auto_describe=True)
reply_latency = Histogram(
    "streamrec_reply_latency_seconds", "Request received to reply sent, per request",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=_registry)


def observe_latency(ms: float) -> None:
    _latencies.append((time.time(), ms))
    reply_latency.observe(ms / 1000.0)


def percentile(values: Iterable[float], q: float) -> Optional[float]:
    """Nearest-rank percentile, ``q`` in [0, 100]: the smallest of ``values`` (in any
    order) with at least ``q`` percent of them at or below it; None when there are none.

    The one percentile of the project: the worker's figures and the benches'
    summaries (bench/common.py) both use it, so their p99s mean the same thing.

    >>> percentile([4, 1, 3, 2], 50), percentile([1, 2, 3, 4], 75), percentile(range(1, 101), 99)
    (2, 3, 99)
    >>> percentile([7], 0), percentile([], 50) is None
    (7, True)
    """
    ordered = sorted(values)
    if not ordered:
        return None
    # q * n / 100 rather than q / 100 * n: exact for whole q (0.07 * 100 is 7.000000000000001).
    rank = max(1, math.ceil(q * len(ordered) / 100.0))
    return ordered[min(rank, len(ordered)) - 1]


def latency_bucket(ms: float) -> int:
    """Index of the log-spaced bucket holding ``ms`` (bucket i covers up to 1.1**i ms).

    >>> latency_bucket(1.0), latency_bucket(1.05), latency_bucket(100.0)
    (0, 1, 49)
    """
    if ms <= 1.0:
        return 0
    return math.ceil(math.log(ms) / math.log(BUCKET_RATIO) - 1e-9)


def histogram(values: Iterable[float]) -> dict[str, int]:
    """Sparse bucket counts (JSON keys are strings) of latencies in ms.

    >>> histogram([0.5, 0.9, 100.0])
    {'0': 2, '49': 1}
    """
    out: Counter = Counter(str(latency_bucket(v)) for v in values)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def merge_histograms(hists: Iterable[dict]) -> dict[str, int]:
    """Sum sparse histograms, e.g. one per worker.

    >>> merge_histograms([{"0": 1, "3": 2}, {"3": 1}])
    {'0': 1, '3': 3}
    """
    out: Counter = Counter()
    for h in hists:
        out.update({k: int(v) for k, v in (h or {}).items()})
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def histogram_percentile(hist: dict, q: float) -> Optional[float]:
    """Nearest-rank percentile from a sparse histogram: the upper edge of its bucket,
    so within 10% above the exact value (None when empty).

    >>> round(histogram_percentile(histogram([1, 2, 3, 4, 50]), 50), 2)
    3.14
    >>> histogram_percentile({}, 99) is None
    True
    """
    total = sum(hist.values())
    if not total:
        return None
    rank = max(1, math.ceil(q / 100.0 * total))
    seen = 0
    for k in sorted(hist, key=int):
        seen += hist[k]
        if seen >= rank:
            return BUCKET_RATIO ** int(k)
    return BUCKET_RATIO ** max(int(k) for k in hist)


def recent_latencies(now: Optional[float] = None, window_s: float = LATENCY_WINDOW_S) -> list:
    now = time.time() if now is None else now
    return [ms for t, ms in _latencies if now - t <= window_s]


def snapshot() -> dict:
    lat = [ms for _, ms in _latencies]
    return {
        "uptime_s": round(time.time() - started_at, 1),
        "counters": dict(counters),
        "serve_latency_ms": {"n": len(lat), "p50": percentile(lat, 50),
                             "p95": percentile(lat, 95), "p99": percentile(lat, 99)},
    }


# --------------------------------------------------------------------------- Prometheus

_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(counter: str) -> str:
    """The Prometheus name of one of :data:`counters`.

    >>> metric_name("events_applied"), metric_name("model_versions_live")
    ('streamrec_events_applied_total', 'streamrec_model_versions_live_total')
    """
    return f"streamrec_{_UNSAFE.sub('_', counter)}_total"


class FiguresCollector:
    """Turns one worker's figures (the dict :func:`streams.cluster_stats.local_figures`
    builds) into Prometheus metric families at scrape time."""

    def __init__(self, figures: dict):
        self.figures = figures

    def collect(self):
        f = self.figures
        for name, value in sorted(f.get("counters", {}).items()):
            c = CounterMetricFamily(metric_name(name)[:-len("_total")],
                                    f"streamrec counter {name}")
            c.add_metric([], value)
            yield c
        for direction in ("in", "out"):
            c = CounterMetricFamily(f"streamrec_messages_{direction}",
                                    f"Kafka messages {'consumed' if direction == 'in' else 'produced'}"
                                    " by this worker, per topic", labels=["topic"])
            for topic, n in sorted(f.get(f"messages_{direction}", {}).items()):
                c.add_metric([topic], n)
            yield c
        g = GaugeMetricFamily("streamrec_uptime_seconds", "Seconds since the worker started")
        g.add_metric([], f.get("uptime_s", 0.0))
        yield g
        g = GaugeMetricFamily("streamrec_reply_latency_window_ms",
                              f"Reply latency percentiles over the last {LATENCY_WINDOW_S:.0f} s",
                              labels=["quantile"])
        for q, v in sorted((f.get("latency_ms") or {}).items()):
            if q.startswith("p") and v is not None:
                g.add_metric([str(int(q[1:]) / 100)], v)
        yield g
        g = GaugeMetricFamily("streamrec_consumer_lag",
                              "Messages behind the end, this worker's partitions (Faust's monitor)",
                              labels=["topic", "partition"])
        for topic, parts in sorted(f.get("lag", {}).items()):
            for p, lag in sorted(parts.items()):
                g.add_metric([topic, str(p)], lag)
        yield g
        g = GaugeMetricFamily("streamrec_group_lag",
                              "Messages behind the end per consumer group (committed offsets)",
                              labels=["group", "topic", "partition"])
        for group, topics in sorted((f.get("group_lag") or {}).items()):
            for topic, parts in sorted(topics.items()):
                for p, lag in sorted(parts.items()):
                    g.add_metric([group, topic, str(p)], lag)
        yield g
        c = CounterMetricFamily("streamrec_dead_letter_reasons",
                                "Dead letters by reason (numbers and quoted values blanked)",
                                labels=["reason"])
        for reason, n in sorted(f.get("dead_letter_reasons", {}).items()):
            c.add_metric([reason], n)
        yield c
        stability = f.get("stability") or {}
        live = (f.get("models") or {}).get("live")
        fams = {m: GaugeMetricFamily(f"streamrec_model_{m}", desc, labels=["model", "head", "live"])
                for m, desc in (("calibration", "Rolling calibration, predicted / observed"),
                                ("ne", "Rolling normalized entropy"),
                                ("examples", "Labelled examples in the rolling window"))}
        for model, heads in sorted((stability.get("report") or {}).items()):
            for head, m in sorted(heads.items()):
                for key, fam in (("calibration", "calibration"), ("ne", "ne"), ("n", "examples")):
                    value = m.get(key)
                    if value is not None and not (isinstance(value, float) and math.isnan(value)):
                        fams[fam].add_metric([model, head, str(model == live).lower()], value)
        yield from fams.values()
        g = GaugeMetricFamily("streamrec_model_alerts", "Open SLO violations of the latest report")
        g.add_metric([], len(stability.get("alerts") or []))
        yield g


def prometheus_text(figures: dict) -> bytes:
    """The Prometheus exposition of ``figures`` plus the reply latency histogram.

    >>> text = prometheus_text({"counters": {"requests_served": 3}}).decode()
    >>> "streamrec_requests_served_total 3.0" in text
    True
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FiguresCollector(figures))
    return generate_latest(registry) + generate_latest(_registry)

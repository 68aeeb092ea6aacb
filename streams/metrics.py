"""In-process counters and latency samples the worker exposes on its web port."""
from __future__ import annotations

import time
from collections import Counter, deque

counters: Counter = Counter()
_latencies_ms: deque = deque(maxlen=5000)
started_at = time.time()


def observe_latency(ms: float) -> None:
    _latencies_ms.append(ms)


def percentile(values, q: float) -> float:
    """Nearest-rank percentile; ``q`` in [0, 100].

    >>> percentile([1, 2, 3, 4], 50)
    2
    """
    if not values:
        return float("nan")
    ordered = sorted(values)
    idx = max(0, min(len(ordered) - 1, int(round(q / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[idx]


def snapshot() -> dict:
    lat = list(_latencies_ms)
    return {
        "uptime_s": round(time.time() - started_at, 1),
        "counters": dict(counters),
        "serve_latency_ms": {"n": len(lat), "p50": percentile(lat, 50),
                             "p95": percentile(lat, 95), "p99": percentile(lat, 99)},
    }

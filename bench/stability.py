"""Stability monitor at scale: 10, 100 and 1,000 registered models, in process.

    ~/.cache/streamrec/venv/bin/python bench/stability.py                 # 65 simulated minutes
    ~/.cache/streamrec/venv/bin/python bench/stability.py --minutes 10    # quicker

No broker: the pure parts the worker's stability agent runs
(``models.stability.StabilityMonitor``, ``window_violations``, ``AlertBook``, the
registry's ``watched_versions`` and ``slo_for``) are fed a simulated clock, so the
windows (5 minutes and 1 hour) fill, slide and drop slices as they would in a worker.

The fleet, the same per model at every scale (each model's figures are drawn from
its own seed): a model answers requests at a lognormal rate (mean 0.1/s, sigma 1: a
few models take most of the traffic) with 10 items each, and every item shown
becomes a labelled example when its attribution window closes, so examples arrive
at the prediction rate, 1/s per model on average (``--rate``); each carries the
model's eight head probabilities and labels at realistic rates (click 5%, long
dwell 8%, like 2%, the rest 0.2-0.5%; the model knows something: NE 0.7-0.85 when
calibrated).  Tiers TIER0..TIER4 in turn.  3% of models predict twice the truth
all along; 5% have a 10-minute incident at three times the truth; 10% have a shadow
version scoring the same examples (half of them three times too high).  Each model
publishes a new version every 20 minutes (``--version-min``), which retires the one
before: the monitor drops the retired version's sums, and its alerts clear.  Every
10 simulated seconds (``--report-s``) a report: drop unwatched versions, judge both
windows by each version's tier, update the alert book.

Measured per scale: examples/s and microseconds per example fed to the monitor
(generating the examples is not timed), milliseconds per report and per version in
it, the memory the monitor and the alert book hold at the end (tracemalloc over a
deep copy), and the alerts: violations seen summed over reports (what the worker
sent before, one message per violation per report), alerts opened and cleared, and
those opened on versions that never predicted wrong (chance; ``--alert-z 0`` judges
on the minimum sample alone, as the worker did before).
The baseline, in the same run: a single-model monitor fed the same examples as the
largest scale (every example counted for one version).  Per-model cost is flat when
microseconds per example and bytes per version do not grow with the model count.

Prints ONE JSON object on stdout; progress goes to stderr (``--no-progress``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import log, ratio  # noqa: E402
from models.labels import HEADS  # noqa: E402
from models.registry import TIERS, slo_for, watched_versions  # noqa: E402
from models.stability import (ALERT_Z, AlertBook, StabilityMonitor,  # noqa: E402
                              window_violations)

#: Share of examples each head is positive for.
HEAD_RATES = {"click": 0.05, "like": 0.02, "save": 0.005, "share": 0.003, "comment": 0.003,
              "follow": 0.002, "see_less": 0.005, "long_dwell": 0.08}
ITEMS_PER_REQUEST = 10
POOL = 1 << 16
#: Spread of the true probabilities around the head rate (the model's knowledge: NE
#: 0.7-0.85 when calibrated).
SIGMA = 1.5
SCALES = (1.0, 2.0, 3.0)
TIER_NAMES = sorted(TIERS)


def example_pool(seed: int) -> tuple[list, dict]:
    """``POOL`` examples: labels, and the probabilities predicted at each scale of the
    truth (1: calibrated, exactly so over the pool)."""
    rng = np.random.default_rng([seed, 10**6])
    base = np.array([HEAD_RATES[h] for h in HEADS])
    # Each example's true probabilities: the head rate times a lognormal factor of mean 1.
    truth = np.minimum(base * np.exp(rng.normal(0.0, SIGMA, (POOL, len(HEADS))) - SIGMA**2 / 2),
                       0.9)
    labels = (rng.random(truth.shape) < truth).astype(int)
    truth *= labels.sum(axis=0) / truth.sum(axis=0)
    label_dicts = [dict(zip(HEADS, row)) for row in labels.tolist()]
    probs = {s: [dict(zip(HEADS, row)) for row in np.minimum(truth * s, 0.99).tolist()]
             for s in SCALES}
    return label_dicts, probs


@dataclass
class Model:
    name: str
    rate: float                #: labelled examples/s
    tier: str
    scale: float = 1.0         #: predicted / true, all along
    incident: Optional[tuple] = None  #: (start, end) s at three times the truth
    shadow_scale: Optional[float] = None
    version_phase: float = 0.0
    version: int = 0
    records: list = field(default_factory=list)

    @property
    def live(self) -> str:
        return f"{self.name}:v{self.version}"

    def scale_at(self, t: float) -> float:
        if self.incident and self.incident[0] <= t < self.incident[1]:
            return 3.0
        return self.scale


def fleet(n: int, seed: int, rate: float, minutes: float) -> list[Model]:
    """``n`` models, model ``i`` the same at every scale but for its traffic, scaled so
    that the mean is ``rate`` labelled examples/s per model at every scale (a sample of
    ten lognormal draws has a lower mean than a thousand)."""
    shares = [math.exp(np.random.default_rng([seed, i]).normal() - 0.5) for i in range(n)]
    models = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        requests = rate / ITEMS_PER_REQUEST * shares[i] * n / sum(shares)
        rng.normal()  # the share, drawn above
        m = Model(f"m{i:04d}", requests * ITEMS_PER_REQUEST, TIER_NAMES[i % len(TIER_NAMES)],
                  version_phase=float(rng.uniform(0.0, 1.0)))
        kind = rng.random()
        if kind < 0.03:
            m.scale = 2.0
        elif kind < 0.08 and minutes > 20:
            start = float(rng.uniform(5.0, minutes - 15.0)) * 60.0
            m.incident = (start, start + 600.0)
        if rng.random() < 0.10:
            m.shadow_scale = 3.0 if rng.random() < 0.5 else 1.0
        models.append(m)
    return models


def publish_version(m: Model, at: float) -> None:
    """The model's next version goes live and retires the one before."""
    for r in m.records:
        if r["state"] == "live":
            r["state"] = "retired"
    m.version += 1
    m.records.append({"model": m.name, "version": f"v{m.version}", "state": "live",
                      "tier": m.tier, "created": at})


def traced_size(obj) -> int:
    """Bytes allocated for a deep copy of ``obj``: the memory it holds."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        clone = copy.deepcopy(obj)
        size = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del clone
    return size


class Progress:
    """tqdm on stderr when installed, else a line every 10%."""

    def __init__(self, total: int, disable: bool):
        self.total, self.done, self.disable, self.bar = total, 0, disable, None
        if not disable:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="report", file=sys.stderr)
            except ImportError:
                pass

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)
        elif not self.disable:
            log(text)

    def update(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.disable and self.done * 10 // self.total > before * 10 // self.total:
            log(f"{self.done}/{self.total} reports")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(n: int, args, pool, progress: Progress, one_version: bool = False) -> dict:
    """Feed ``n`` models' traffic to a monitor and an alert book; with ``one_version``
    every example is counted for a single version (the baseline)."""
    models = fleet(n, args.seed, args.rate, args.minutes)
    labels, probs = pool
    rng = np.random.default_rng([args.seed, n, int(one_version)])
    monitor, book = StabilityMonitor(HEADS), AlertBook()
    slos = {t: slo_for(t) for t in TIERS}
    tier_of: dict[str, str] = {}
    version_s = args.version_min * 60.0
    for m in models:
        publish_version(m, 0.0)
        if m.shadow_scale is not None:
            m.records.append({"model": m.name, "version": "s1", "state": "shadow",
                              "tier": m.tier, "created": 0.0})
        for r in m.records:
            tier_of[f"{r['model']}:{r['version']}"] = m.tier
    rates = np.array([m.rate for m in models])
    shadows = [m.shadow_scale is not None for m in models]
    single = "one:v1"
    if one_version:
        tier_of[single] = "TIER2"
    by_name = {m.name: m for m in models}

    def never_off(key: str) -> bool:
        """Whether the version the alert is about predicted the truth all along."""
        if one_version:
            return False
        m = by_name[key.split(":")[0]]
        if key.endswith(":s1"):
            return m.shadow_scale == 1.0
        return m.scale == 1.0 and m.incident is None

    feed_s = report_s = 0.0
    updates = reports = violations_seen = opened = cleared = false_alarms = 0
    report_times, watched_end = [], 0
    intervals = int(args.minutes * 60.0 / args.report_s)
    progress.describe(f"{n} models" + (" as one version" if one_version else ""))
    for step in range(intervals):
        t0, t1 = step * args.report_s, (step + 1) * args.report_s
        # New versions due in this interval (each model on its own phase).
        for m in models:
            due = (t1 / version_s - m.version_phase)
            if due >= m.version:
                publish_version(m, t1)
                tier_of[m.live] = m.tier
        # The interval's examples, in time order (not timed).
        counts = rng.poisson(rates * args.report_s)
        owner = np.repeat(np.arange(n), counts)
        times = rng.uniform(t0, t1, owner.size)
        order = np.argsort(times, kind="stable")
        picks = rng.integers(0, POOL, owner.size)
        batch = []
        for j in order.tolist():
            m, now, k = models[owner[j]], float(times[j]), int(picks[j])
            batch.append((single if one_version else m.live, labels[k], probs[m.scale_at(now)][k],
                          now))
            if shadows[owner[j]]:
                batch.append((single if one_version else f"{m.name}:s1", labels[k],
                              probs[m.shadow_scale][k], now))
        update = monitor.update
        t = time.perf_counter()
        for key, y, p, now in batch:
            update(key, y, p, now)
        feed_s += time.perf_counter() - t
        updates += len(batch)
        # The report, as the worker's timer makes it.
        t = time.perf_counter()
        records = [r for m in models for r in m.records]
        watched = watched_versions(records) | ({single} if one_version else set())
        monitor.retain(watched.__contains__)
        windows = monitor.reports(t1)
        alerts, unjudged = window_violations(windows, lambda key: slos[tier_of.get(key, "TIER2")],
                                             z=args.alert_z)
        change = book.update(alerts, t1, unjudged)
        took = time.perf_counter() - t
        report_s += took
        report_times.append(took)
        reports += 1
        violations_seen += len(alerts)
        opened += len(change["opened"])
        false_alarms += sum(never_off(a["model"]) for a in change["opened"])
        cleared += len(change["cleared"])
        watched_end = len(monitor)
        progress.update()
    monitor_bytes, book_bytes = traced_size(monitor), traced_size(book)
    per_report = sorted(report_times)
    return {
        "models": 1 if one_version else n,
        "versions_published": sum(m.version for m in models),
        "versions_kept": watched_end,
        "simulated_minutes": args.minutes,
        "offered_examples_per_s": round(updates / (args.minutes * 60.0), 1),
        "examples": updates,
        "feed_s": round(feed_s, 3),
        "examples_per_s": round(updates / feed_s, 1) if feed_s else None,
        "us_per_example": round(feed_s / updates * 1e6, 3) if updates else None,
        "reports": reports,
        "report_ms_mean": round(report_s / reports * 1e3, 3),
        "report_ms_p95": round(per_report[int(0.95 * (len(per_report) - 1))] * 1e3, 3),
        "report_us_per_version": round(report_s / reports / max(watched_end, 1) * 1e6, 2),
        "examples_per_s_with_reports": round(updates / (feed_s + report_s), 1),
        "headroom": round(updates / (feed_s + report_s) / (updates / (args.minutes * 60.0)), 1),
        "memory": {"monitor_bytes": monitor_bytes, "alert_book_bytes": book_bytes,
                   "bytes_per_version": round((monitor_bytes + book_bytes) / max(watched_end, 1))},
        "alerts": {"violations_over_reports": violations_seen, "opened": opened,
                   "cleared": cleared, "open_at_end": len(book),
                   "opened_on_versions_never_off": false_alarms,
                   "messages_before_per_message_now": ratio(violations_seen,
                                                            opened + cleared, 1)},
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="10,100,1000", help="model counts, comma-separated")
    ap.add_argument("--minutes", type=float, default=65.0,
                    help="simulated minutes (over 60: the hour window fills and slides)")
    ap.add_argument("--rate", type=float, default=1.0,
                    help="mean labelled examples/s per model")
    ap.add_argument("--report-s", type=float, default=10.0)
    ap.add_argument("--version-min", type=float, default=20.0,
                    help="minutes between a model's versions")
    ap.add_argument("--alert-z", type=float, default=ALERT_Z,
                    help="standard errors a breach must stand beyond its bound to alert "
                         "(0: any breach on the minimum sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    scales = [int(x) for x in args.models.split(",") if x]
    pool = example_pool(args.seed)
    per_run = int(args.minutes * 60.0 / args.report_s)
    progress = Progress(per_run * (len(scales) + 1), args.no_progress)
    wall = time.perf_counter()
    try:
        results = [run(n, args, pool, progress) for n in scales]
        baseline = run(max(scales), args, pool, progress, one_version=True)
    finally:
        progress.close()
    small, large = results[0], results[-1]
    return {
        "bench": "stability",
        "heads": len(HEADS),
        "windows": [w.name for w in StabilityMonitor(HEADS).windows],
        "alert_z": args.alert_z,
        "scales": results,
        "baseline_one_version": baseline,
        "per_model_cost": {
            "us_per_example": {r["models"]: r["us_per_example"] for r in results},
            "bytes_per_version": {r["models"]: r["memory"]["bytes_per_version"] for r in results},
            "report_us_per_version": {r["models"]: r["report_us_per_version"] for r in results},
            f"us_per_example_{large['models']}_vs_{small['models']}":
                ratio(large["us_per_example"], small["us_per_example"], 2),
            f"bytes_per_version_{large['models']}_vs_{small['models']}":
                ratio(large["memory"]["bytes_per_version"],
                      small["memory"]["bytes_per_version"], 2),
            f"us_per_example_{large['models']}_vs_baseline":
                ratio(large["us_per_example"], baseline["us_per_example"], 2),
        },
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "wall_s": round(time.perf_counter() - wall, 1),
    }


if __name__ == "__main__":
    print(json.dumps(main()))

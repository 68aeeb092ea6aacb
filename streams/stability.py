"""Model stability: rolling calibration and normalized entropy per model version and
head, judged against SLOs, published for dashboards and raised as alerts.

Reads the labelled examples (each carries what the serving model predicted for
it) beside the trainer; every ``REPORT_INTERVAL_S`` publishes the report to
``model.stability`` and each SLO violation to ``alerts``.  Each version is judged
by its tier's SLO (:func:`models.registry.slo_for`: TIER0 strictest).  Memory
stays bounded: only versions that serve or are candidates keep a window
(:func:`models.registry.watched_versions`); the trainer makes a version a minute,
and windows for every one of them grew without end.
"""
from __future__ import annotations

import time
from typing import Callable

import orjson

from models.labels import HEADS
from models.registry import TIERS, slo_for, watched_versions
from models.stability import StabilityMonitor, violations
from schemas.topics import ALERTS, STABILITY, TRAINING_EXAMPLES
from streams import metrics
from streams.app import app
from streams.view import view

REPORT_INTERVAL_S = 10.0
examples_topic = app.topic(TRAINING_EXAMPLES)
stability_topic = app.topic(STABILITY)
alerts_topic = app.topic(ALERTS)
latest: dict = {"report": {}, "alerts": [], "at": None}


def watch_filter(records) -> Callable[[str], bool]:
    """Whether examples served by a version (``model:version``) should be counted: it is
    watched (:func:`models.registry.watched_versions`) or not in the registry yet (its
    record not read yet).

    >>> watched = watch_filter([{"model": "r", "version": "v1", "state": "retired"},
    ...                         {"model": "r", "version": "v2", "state": "live"}])
    >>> watched("r:v1"), watched("r:v2"), watched("r:v9")
    (False, True, True)
    """
    records = list(records)
    known = {f"{r['model']}:{r['version']}" for r in records}
    watched = watched_versions(records)
    return lambda key: key not in known or key in watched


class BoundedMonitor(StabilityMonitor):
    """A :class:`~models.stability.StabilityMonitor` that keeps windows only for the
    versions worth watching.

    >>> m = BoundedMonitor(("click",), window=10)
    >>> for v in ("v1", "v2", "v3"):
    ...     m.update(f"r:{v}", {"click": 1}, {"click": 0.5})
    >>> m.retain(watch_filter([{"model": "r", "version": "v1", "state": "retired"},
    ...                        {"model": "r", "version": "v2", "state": "live"}]))
    ['r:v1']
    >>> sorted(m.report())
    ['r:v2', 'r:v3']
    """

    def retain(self, watched: Callable[[str], bool]) -> list[str]:
        """Drop the windows of versions no longer watched; returns their names."""
        dropped = [key for key in self._models if not watched(key)]
        for key in dropped:
            del self._models[key]
        return dropped


def tier_violations(report: dict, records) -> list[dict]:
    """SLO alerts with each version judged by its tier (TIER2's SLO when unknown).

    >>> report = {"r:v1": {"click": {"n": 1000, "rate": 0.1, "calibration": 1.15, "ne": 0.9}}}
    >>> [a["metric"] for a in tier_violations(report, [
    ...     {"model": "r", "version": "v1", "tier": "TIER0"}])]
    ['calibration']
    >>> tier_violations(report, [{"model": "r", "version": "v1", "tier": "TIER2"}])
    []
    """
    tiers = {f"{r['model']}:{r['version']}": r.get("tier") for r in records}
    alerts = []
    for key, heads in report.items():
        tier = tiers.get(key) if tiers.get(key) in TIERS else "TIER2"
        alerts.extend({**a, "tier": tier} for a in violations({key: heads}, slo_for(tier)))
    return alerts


monitor = BoundedMonitor(HEADS)
#: The watch filter, rebuilt at most once a second (the registry grows by a version a
#: minute; examples arrive many times a second).
_filter: dict = {"at": 0.0, "watched": None}


def _watched() -> Callable[[str], bool]:
    now = time.monotonic()
    if _filter["watched"] is None or now - _filter["at"] >= 1.0:
        _filter.update(at=now, watched=watch_filter(view.registry.values()))
    return _filter["watched"]


@app.agent(examples_topic)
async def watch(stream):
    async for value in stream:
        watched = _watched()
        for record in orjson.loads(value):
            predicted = record.get("predicted")
            if predicted and isinstance(predicted.get("probs"), dict):
                model = predicted.get("model", "?")
                if not watched(model):
                    # Late labels of a retired version must not bring its window back.
                    metrics.counters["stability_examples_unwatched"] += 1
                    continue
                monitor.update(model, record.get("labels", {}), predicted["probs"])
                metrics.counters["stability_examples"] += 1


@app.timer(REPORT_INTERVAL_S)
async def publish_stability() -> None:
    records = list(view.registry.values())
    metrics.counters["stability_windows_dropped"] += len(monitor.retain(watch_filter(records)))
    report = monitor.report()
    if not report:
        return
    alerts = tier_violations(report, records)
    latest.update(report=report, alerts=alerts, at=time.time())
    for model, heads in report.items():
        await stability_topic.send(key=model.encode(), value=orjson.dumps(
            {"model": model, "at": latest["at"], "heads": heads}), partition=0)
    for alert in alerts:
        key = f"{alert['model']}/{alert['head']}/{alert['metric']}"
        await alerts_topic.send(key=key.encode(), value=orjson.dumps({**alert, "at": latest["at"]}),
                                partition=0)
    metrics.counters["alerts_raised"] += len(alerts)

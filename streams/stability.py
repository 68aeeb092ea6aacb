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

import asyncio
import logging
import os
import time
from typing import Callable

import orjson

from models.labels import HEADS
from models.launch import MIN_EXAMPLES, Verdict, figures, judge, on_trial
from models.registry import (ROLLED_BACK, TIERS, RegistryConflict, moved, slo_for,
                             watched_versions)
from models.stability import StabilityMonitor, violations
from schemas.topics import ALERTS, STABILITY, TRAINING_EXAMPLES
from streams import metrics
from streams.app import app
from streams.view import view

REPORT_INTERVAL_S = 10.0
#: A version on trial is taken back automatically when it breaks its tier's SLO on at
#: least this many labels of a head (``STREAMREC_LAUNCH_MIN_EXAMPLES``); ``STREAMREC_AUTO_ROLLBACK=0``
#: only alerts.  A live version is on probation for ``STREAMREC_LAUNCH_PROBATION_S``.
LAUNCH_MIN_EXAMPLES = int(os.environ.get("STREAMREC_LAUNCH_MIN_EXAMPLES", str(MIN_EXAMPLES)))
AUTO_ROLLBACK = os.environ.get("STREAMREC_AUTO_ROLLBACK", "1") not in ("0", "false", "no")
PROBATION_S = float(os.environ.get("STREAMREC_LAUNCH_PROBATION_S", "3600"))
#: How often a version on trial has its figures written into its registry record.
FIGURES_INTERVAL_S = float(os.environ.get("STREAMREC_LAUNCH_FIGURES_S", "20"))
#: model:version -> when its figures were last written to the registry.
_figures_written: dict[str, float] = {}
BY = "stability monitor"
log = logging.getLogger(__name__)
examples_topic = app.topic(TRAINING_EXAMPLES)
stability_topic = app.topic(STABILITY)
alerts_topic = app.topic(ALERTS)
latest: dict = {"report": {}, "alerts": [], "at": None, "rollbacks": []}


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
            if not (predicted and isinstance(predicted.get("probs"), dict)):
                continue
            # The version that served the item, then those that scored it in shadow.
            for scored in [predicted] + list(predicted.get("shadow") or []):
                model = scored.get("model", "?")
                if not isinstance(scored.get("probs"), dict):
                    continue
                if not watched(model):
                    # Late labels of a retired version must not bring its window back.
                    metrics.counters["stability_examples_unwatched"] += 1
                    continue
                monitor.update(model, record.get("labels", {}), scored["probs"])
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
    if AUTO_ROLLBACK:
        await take_back(records, report)
    await keep_figures(records, report)


async def keep_figures(records: list, report: dict) -> None:
    """Write the figures of each version on trial into its registry record, at most every
    ``FIGURES_INTERVAL_S``: ``streamrec models show`` prints them and the next launch
    step is gated on them (:func:`models.launch.step_check`)."""
    from stores import model_store
    from streams.settings import settings
    now = time.time()
    for r in records:
        key = f"{r['model']}:{r['version']}"
        if not on_trial(r, now, PROBATION_S) or not report.get(key):
            continue
        if now - _figures_written.get(key, 0.0) < FIGURES_INTERVAL_S:
            continue
        _figures_written[key] = now
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, model_store.record_stability, settings.bootstrap, r["model"],
                r["version"], figures(report[key], now))
        except Exception as exc:
            metrics.counters["stability_figures_failed"] += 1
            log.warning("stability figures of %s not written: %s", key, exc)


def act(bootstrap: str, verdict: Verdict) -> dict:
    """Carry out a verdict (:func:`models.launch.judge`): a shadow or canary is rolled back
    (its users return to the live version at once), a live version on probation is
    rolled back to the version before, which holds until an operator promotes.  The
    evidence goes into the registry with the move, written on the registry as it is
    then: a version someone moved since it was judged is left alone."""
    from stores import model_store
    if verdict.action == "roll_back_live":
        gone, back = model_store.rollback(bootstrap, verdict.model, by=BY, reason=verdict.reason,
                                          evidence=verdict.evidence, expect_live=verdict.version)
        return gone

    def change(registry: dict) -> list:
        current = registry.get(f"{verdict.model}/{verdict.version}")
        if current is None or current.get("state") != verdict.state:
            # Moved since it was judged (figures written meanwhile are no move).
            raise RegistryConflict(f"{verdict.model} {verdict.version} is no longer "
                                   f"{verdict.state}")
        return [moved(current, ROLLED_BACK, by=BY,
                      reason=f"rolled back by the {BY}: {verdict.reason}",
                      evidence=verdict.evidence)]

    return model_store.write_registry(bootstrap, change)[0]


async def take_back(records: list, report: dict) -> list:
    """Roll back every version on trial that breaks its SLO (:func:`models.launch.judge`)."""
    from streams.settings import settings
    done = []
    for verdict in judge(records, report, time.time(), min_examples=LAUNCH_MIN_EXAMPLES,
                         probation_s=PROBATION_S):
        try:
            written = await asyncio.get_running_loop().run_in_executor(
                None, act, settings.bootstrap, verdict)
        except RegistryConflict as exc:
            # Moved by someone else since the view read it: judged again next time.
            log.info("automatic rollback of %s %s skipped: %s", verdict.model, verdict.version,
                     exc)
            continue
        except Exception as exc:
            metrics.counters["automatic_rollbacks_failed"] += 1
            log.warning("automatic rollback of %s %s failed: %s", verdict.model,
                        verdict.version, exc)
            continue
        metrics.counters["automatic_rollbacks"] += 1
        log.warning("%s %s rolled back automatically: %s", verdict.model, verdict.version,
                    verdict.reason)
        # Its window goes: the version is no longer watched.
        monitor._models.pop(f"{verdict.model}:{verdict.version}", None)
        entry = {"model": verdict.model, "version": verdict.version, "from": verdict.state,
                 "reason": verdict.reason, "at": time.time(), "rev": written.get("rev")}
        latest["rollbacks"] = (latest["rollbacks"] + [entry])[-20:]
        done.append(entry)
    return done

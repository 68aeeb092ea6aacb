"""Model stability: rolling calibration and normalized entropy per model version,
head and window (the last 5 minutes and the last hour), judged against SLOs,
published for dashboards and raised as deduplicated alerts.

Reads the labelled examples (each carries what the serving model predicted for
it) beside the trainer; every ``REPORT_INTERVAL_S`` publishes the report to
``model.stability`` and, on ``alerts``, each alert when it opens and when it
clears (:class:`models.stability.AlertBook`: a breach that persists is one
alert).  Each version is judged by its tier's SLO
(:func:`models.registry.slo_for`: TIER0 strictest), in each window on its own
sample.  Memory stays bounded: only versions that serve or are candidates keep
their sums (:func:`models.registry.watched_versions`); the trainer makes a
version a minute, and windows for every one of them grew without end.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Callable

import orjson

from models.labels import HEADS
from models.launch import MIN_EXAMPLES, Verdict, figures, judge, on_trial
from models.registry import (ROLLED_BACK, TIERS, RegistryConflict, moved, slo_for,
                             watched_versions)
from models.stability import AlertBook, StabilityMonitor, violations, window_violations
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
#: What ``/stats/`` and ``cluster.stats`` show: ``report`` is the short window's (the one
#: launches are judged on), ``windows`` every window's, ``alerts`` the open alerts (each with
#: ``window``, ``opened_at``, ``seen_at``), ``cleared`` the latest cleared ones.
latest: dict = {"report": {}, "windows": {}, "alerts": [], "cleared": [], "at": None,
                "rollbacks": []}
#: Cleared alerts shown in ``latest``.
CLEARED_SHOWN = 20


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


#: The monitor keeps sums only for the versions its ``retain`` is given (the name older
#: callers use).
BoundedMonitor = StabilityMonitor


def tier_of(records) -> Callable[[str], str]:
    """The tier of a version (``model:version``), TIER2 when unknown.

    >>> tier_of([{"model": "r", "version": "v1", "tier": "TIER0"}])("r:v1")
    'TIER0'
    """
    tiers = {f"{r['model']}:{r['version']}": r.get("tier") for r in records}
    return lambda key: tiers.get(key) if tiers.get(key) in TIERS else "TIER2"


def tier_violations(report: dict, records) -> list[dict]:
    """SLO alerts with each version judged by its tier (TIER2's SLO when unknown).

    >>> report = {"r:v1": {"click": {"n": 1000, "rate": 0.1, "calibration": 1.15, "ne": 0.9}}}
    >>> [a["metric"] for a in tier_violations(report, [
    ...     {"model": "r", "version": "v1", "tier": "TIER0"}])]
    ['calibration']
    >>> tier_violations(report, [{"model": "r", "version": "v1", "tier": "TIER2"}])
    []
    """
    tier = tier_of(records)
    return [{**a, "tier": tier(key)} for key, heads in report.items()
            for a in violations({key: heads}, slo_for(tier(key)))]


def window_tier_violations(reports: dict, records) -> tuple[list[dict], set]:
    """:func:`models.stability.window_violations` with each version judged by its tier.

    >>> heads = {"click": {"n": 2000, "rate": 0.1, "calibration": 1.5, "ne": 0.9}}
    >>> alerts, unjudged = window_tier_violations(
    ...     {"5m": {"r:v1": {"click": {"n": 3}}}, "1h": {"r:v1": heads}},
    ...     [{"model": "r", "version": "v1", "tier": "TIER0"}])
    >>> [(a["window"], a["metric"], a["tier"]) for a in alerts], unjudged
    ([('1h', 'calibration', 'TIER0')], {('r:v1', 'click', '5m')})
    """
    tier = tier_of(records)
    alerts, unjudged = window_violations(reports, lambda key: slo_for(tier(key)))
    return [{**a, "tier": tier(a["model"])} for a in alerts], unjudged


monitor = StabilityMonitor(HEADS)
book = AlertBook()
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
        now = time.time()
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
                monitor.update(model, record.get("labels", {}), scored["probs"], now)
                metrics.counters["stability_examples"] += 1


@app.timer(REPORT_INTERVAL_S)
async def publish_stability() -> None:
    await publish(list(view.registry.values()), time.time())


async def publish(records: list, now: float) -> None:
    """One report: drop the versions no longer watched, judge every window, send the
    figures to ``model.stability`` and the alerts that opened or cleared to ``alerts``,
    then roll back what breaks its SLO on trial and keep the figures of what is on trial."""
    watched = watch_filter(records)
    metrics.counters["stability_windows_dropped"] += len(monitor.retain(watched))
    for key in [k for k in _figures_written if not watched(k)]:
        del _figures_written[key]
    if not len(monitor) and not len(book):
        return
    windows = monitor.reports(now)
    report = windows[monitor.windows[0].name]
    alerts, unjudged = window_tier_violations(windows, records)
    change = book.update(alerts, now, unjudged)
    latest.update(report=report, windows=windows, alerts=change["open"],
                  cleared=list(book.cleared)[-CLEARED_SHOWN:], at=now)
    for model, heads in report.items():
        await stability_topic.send(key=model.encode(), value=orjson.dumps(
            {"model": model, "at": now, "heads": heads,
             "windows": {name: w[model] for name, w in windows.items()}}), partition=0)
    # An alert is sent when it opens and when it clears, not once a report.
    for state, changed in (("open", change["opened"]), ("cleared", change["cleared"])):
        for alert in changed:
            key = f"{alert['model']}/{alert['head']}/{alert['metric']}"
            await alerts_topic.send(key=key.encode(), value=orjson.dumps(
                {**alert, "state": state, "at": now}), partition=0)
    metrics.counters["alerts_raised"] += len(change["opened"])
    metrics.counters["alerts_cleared"] += len(change["cleared"])
    # A version on trial is taken back on a breach in either window; its launch steps are
    # gated on the longest window, which holds every label of a trial under an hour.
    if AUTO_ROLLBACK:
        await take_back(records, windows)
    await keep_figures(records, windows[monitor.windows[-1].name])


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


def window_verdicts(records: list, reports: dict, now: float) -> list[Verdict]:
    """:func:`models.launch.judge` on each window's report (``{window: report}``, shortest
    first): one verdict per version, from the first window it breaks in, naming it.

    >>> recs = [{"model": "r", "version": "s", "state": "shadow", "tier": "TIER2"}]
    >>> bad = {"click": {"n": 500, "rate": 0.1, "calibration": 2.9, "ne": 0.9}}
    >>> [(v.version, v.reason[-11:], v.evidence["window"])
    ...  for v in window_verdicts(recs, {"5m": {"r:s": bad}, "1h": {"r:s": bad}}, 10.0)]
    [('s', '(5m window)', '5m')]
    """
    verdicts: dict = {}
    for name, report in reports.items():
        for v in judge(records, report, now, min_examples=LAUNCH_MIN_EXAMPLES,
                       probation_s=PROBATION_S):
            verdicts.setdefault((v.model, v.version), dataclasses.replace(
                v, reason=f"{v.reason} ({name} window)", evidence={**v.evidence, "window": name}))
    return list(verdicts.values())


async def take_back(records: list, reports: dict) -> list:
    """Roll back every version on trial that breaks its SLO in a window
    (:func:`window_verdicts`)."""
    from streams.settings import settings
    done = []
    for verdict in window_verdicts(records, reports, time.time()):
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
        # Its sums go: the version is no longer watched.
        monitor.drop(f"{verdict.model}:{verdict.version}")
        entry = {"model": verdict.model, "version": verdict.version, "from": verdict.state,
                 "reason": verdict.reason, "at": time.time(), "rev": written.get("rev")}
        latest["rollbacks"] = (latest["rollbacks"] + [entry])[-20:]
        done.append(entry)
    return done

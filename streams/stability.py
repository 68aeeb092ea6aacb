"""Model stability: rolling calibration and normalized entropy per model version and
head, judged against SLOs, published for dashboards and raised as alerts.

Reads the labelled examples (each carries what the serving model predicted for
it) beside the trainer; every ``REPORT_INTERVAL_S`` publishes the report to
``model.stability`` and each SLO violation to ``alerts``.
"""
from __future__ import annotations

import time

import orjson

from models.labels import HEADS
from models.stability import SLO, StabilityMonitor, violations
from schemas.topics import ALERTS, STABILITY, TRAINING_EXAMPLES
from streams import metrics
from streams.app import app

REPORT_INTERVAL_S = 10.0
examples_topic = app.topic(TRAINING_EXAMPLES)
stability_topic = app.topic(STABILITY)
alerts_topic = app.topic(ALERTS)
monitor = StabilityMonitor(HEADS)
slo = SLO()
latest: dict = {"report": {}, "alerts": [], "at": None}


@app.agent(examples_topic)
async def watch(stream):
    async for value in stream:
        for record in orjson.loads(value):
            predicted = record.get("predicted")
            if predicted and isinstance(predicted.get("probs"), dict):
                monitor.update(predicted.get("model", "?"), record.get("labels", {}),
                               predicted["probs"])
                metrics.counters["stability_examples"] += 1


@app.timer(REPORT_INTERVAL_S)
async def publish_stability() -> None:
    report = monitor.report()
    if not report:
        return
    alerts = violations(report, slo)
    latest.update(report=report, alerts=alerts, at=time.time())
    for model, heads in report.items():
        await stability_topic.send(key=model.encode(), value=orjson.dumps(
            {"model": model, "at": latest["at"], "heads": heads}), partition=0)
    for alert in alerts:
        key = f"{alert['model']}/{alert['head']}/{alert['metric']}"
        await alerts_topic.send(key=key.encode(), value=orjson.dumps({**alert, "at": latest["at"]}),
                                partition=0)
    metrics.counters["alerts_raised"] += len(alerts)

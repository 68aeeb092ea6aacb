"""Model stability: rolling calibration and normalized entropy per model and head,
judged against service-level objectives.

Each labelled example that was served by a model carries the probabilities
that model predicted at serving time; :class:`StabilityMonitor` keeps a
rolling window per (model version, head) and :func:`violations` turns a
report into alerts.

>>> m = StabilityMonitor(("like",), window=100)
>>> for _ in range(50):
...     m.update("ranker:v1", {"like": 1}, {"like": 0.9})
...     m.update("ranker:v1", {"like": 0}, {"like": 0.9})
>>> report = m.report()
>>> round(report["ranker:v1"]["like"]["calibration"], 2)
1.8
>>> [a["metric"] for a in violations(report, SLO())]
['calibration', 'normalized_entropy']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from models.metrics import RollingMetrics


@dataclass(frozen=True)
class SLO:
    """Bounds a served model must stay within, per head, once it has enough labels."""
    calibration_low: float = 0.8
    calibration_high: float = 1.25
    #: Worse than predicting the base rate is a broken model.
    max_normalized_entropy: float = 1.0
    min_examples: int = 50
    #: Heads whose positives are rarer than this many per window are not judged.
    min_positives: int = 5


class StabilityMonitor:
    def __init__(self, heads: Sequence[str], window: int = 5000):
        self.heads = tuple(heads)
        self.window = window
        self._models: dict[str, RollingMetrics] = {}

    def update(self, model: str, labels: dict, probs: dict) -> None:
        """One served, labelled example: ``labels`` and ``probs`` map head -> value."""
        rolling = self._models.get(model)
        if rolling is None:
            rolling = self._models[model] = RollingMetrics(self.heads, self.window)
        mask = [[1 if h in labels and h in probs else 0 for h in self.heads]]
        rolling.update([[labels.get(h, 0) for h in self.heads]],
                       [[probs.get(h, 0.5) for h in self.heads]], mask=mask)

    def report(self) -> dict:
        return {model: rolling.report() for model, rolling in self._models.items()}


def violations(report: dict, slo: SLO) -> list[dict]:
    """Alerts for every (model, head) outside its SLO, with the numbers that broke it."""
    alerts = []
    for model, heads in report.items():
        for head, m in heads.items():
            n = m.get("n", 0)
            positives = round(n * (m.get("rate") or 0.0))
            if n < slo.min_examples or positives < slo.min_positives:
                continue
            cal = m.get("calibration")
            if cal is not None and not slo.calibration_low <= cal <= slo.calibration_high:
                alerts.append({"model": model, "head": head, "metric": "calibration", "value": cal,
                               "bounds": [slo.calibration_low, slo.calibration_high], "n": n})
            ne = m.get("ne")
            if ne is not None and ne > slo.max_normalized_entropy:
                alerts.append({"model": model, "head": head, "metric": "normalized_entropy",
                               "value": ne, "bounds": [0.0, slo.max_normalized_entropy], "n": n})
    return alerts

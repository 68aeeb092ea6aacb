"""Model stability: rolling calibration and normalized entropy per model version and
head over windows of wall time, judged against service-level objectives, and alerts
that open once per breach and say when it cleared.

Each labelled example that was served (or scored in shadow) by a model carries the
probabilities that model predicted at serving time.  :class:`StabilityMonitor` keeps,
per version, head and :class:`Window` (by default the last 5 minutes and the last
hour), the sums calibration and NE are made of (labels, positives, predicted
probability, log loss and its square), in time slices: its memory per version is fixed however many
examples arrive.  :func:`violations` judges one window's report against an
:class:`SLO`; :func:`window_violations` judges every window's, each on its own sample
(the SLO's minimum labels and positives) and only on breaches that chance does not
explain (``ALERT_Z`` standard errors beyond the bound); :class:`AlertBook` turns the
violations of successive reports into alerts: one per breach, from the report that
first saw it (``opened_at``) to the one that found it within bounds again
(``cleared_at``, known a few reports later).

>>> m = StabilityMonitor(("like",))
>>> for i in range(50):
...     m.update("ranker:v1", {"like": 1}, {"like": 0.9}, now=1000.0 + i)
...     m.update("ranker:v1", {"like": 0}, {"like": 0.9}, now=1000.0 + i)
>>> report = m.report(now=1050.0)
>>> round(report["ranker:v1"]["like"]["calibration"], 2)
1.8
>>> [a["metric"] for a in violations(report, SLO())]
['calibration', 'normalized_entropy']
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from models.metrics import EPS


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


@dataclass(frozen=True)
class Window:
    """The last ``seconds`` of wall time, kept as ``slices`` slices of equal width: a
    report covers the slice now runs in and the ``slices - 1`` before it, so between
    ``seconds - width`` and ``seconds`` of the past.

    >>> Window("5m", 300.0, 10).width
    30.0
    """
    name: str
    seconds: float
    slices: int = 10

    @property
    def width(self) -> float:
        return self.seconds / self.slices


#: The short window answers quickly; the long one sees a slow drift and judges heads too
#: rare to judge in 5 minutes.  Each slice width must be a whole multiple of the finest.
WINDOWS = (Window("5m", 300.0, 10), Window("1h", 3600.0, 12))
#: Sums kept per head: labels, positives, predicted probability, log loss and its square.
N, POSITIVES, PREDICTED, LOSS, LOSS2 = range(5)
STATS = 5
#: An alert needs its breach to stand this many standard errors beyond the bound
#: (:func:`window_violations`): with the minimum sample alone, a calibrated model's 5-minute
#: calibration left TIER0's band by chance in most reports (bench/stability.py).
ALERT_Z = 3.0


class SlicedSums:
    """Sums of a fixed-length vector over the last ``window.slices`` time slices, in a
    ring: slice ``k`` covers ``[k * width, (k + 1) * width)`` seconds and reuses the
    place of slice ``k - slices``.

    >>> s = SlicedSums(1, Window("w", 30.0, 3))
    >>> s.add(0, [1.0]); s.add(1, [2.0]); s.add(3, [4.0])   # slice 3 takes slice 0's place
    >>> float(s.total(3)[0]), float(s.total(4)[0]), float(s.total(9)[0])
    (6.0, 4.0, 0.0)
    """
    __slots__ = ("slices", "values", "index")

    def __init__(self, size: int, window: Window):
        self.slices = window.slices
        self.values = np.zeros((window.slices, size))
        self.index = np.full(window.slices, -1, dtype=np.int64)

    def add(self, k: int, values) -> None:
        place = k % self.slices
        held = self.index[place]
        if held != k:
            if held > k:
                return  # older than the window: its place holds a newer slice
            self.values[place] = 0.0
            self.index[place] = k
        self.values[place] += values

    def total(self, k: int) -> np.ndarray:
        """The sums over slices ``k - slices + 1`` to ``k``."""
        return self.values[(self.index > k - self.slices) & (self.index <= k)].sum(axis=0)


class _Version:
    """One version's sums: the current tick's, then one ring per window."""
    __slots__ = ("tick", "pending", "rings")

    def __init__(self, size: int, windows: Sequence[Window]):
        self.tick = -1
        self.pending = [0.0] * size
        self.rings = [SlicedSums(size, w) for w in windows]


def head_figures(sums: Sequence[float]) -> dict:
    """One head's figures from its sums (rounded; None where undefined), as
    :func:`models.metrics.summarize` gives them without AUC, which needs every example,
    and with ``ne_se``, NE's standard error from the spread of the log loss.

    >>> head_figures([4, 1, 1.0, 2.0, 1.5])
    {'n': 4, 'rate': 0.25, 'ne': 0.8891, 'calibration': 1.0, 'log_loss': 0.5, 'ne_se': 0.3144}
    >>> head_figures([0, 0, 0.0, 0.0, 0.0])["ne"] is None
    True
    """
    n = int(round(sums[N]))
    if n <= 0:
        return {"n": 0, "rate": None, "ne": None, "calibration": None, "log_loss": None,
                "ne_se": None}
    positives, rate = float(sums[POSITIVES]), float(sums[POSITIVES]) / n
    log_loss = float(sums[LOSS]) / n
    base = (-(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
            if 0.0 < rate < 1.0 else None)
    spread = max(float(sums[LOSS2]) / n - log_loss * log_loss, 0.0)
    return {"n": n, "rate": round(rate, 4),
            "ne": round(log_loss / base, 4) if base else None,
            "calibration": round(float(sums[PREDICTED]) / positives, 4) if positives > 0 else None,
            "log_loss": round(log_loss, 4),
            "ne_se": round(math.sqrt(spread / n) / base, 4) if base else None}


class StabilityMonitor:
    """Rolling figures per model version (``model:version``), head and window.

    ``update`` adds one example to its version's sums for the current tick (the finest
    slice width); a tick's sums go into every window's ring when the next tick starts
    or a report is made, so an example costs the same however many windows there are.
    ``window`` (seconds) is a shorthand for one window of that length.

    >>> m = StabilityMonitor(("click",))
    >>> for t in range(0, 3600, 6):   # bad for the first 55 minutes, then good
    ...     p = 0.3 if t < 3300 else 0.1
    ...     for label in (1,) + (0,) * 9:
    ...         m.update("r:v1", {"click": label}, {"click": p}, now=float(t))
    >>> r = m.reports(now=3599.0)
    >>> r["5m"]["r:v1"]["click"]["calibration"], r["1h"]["r:v1"]["click"]["calibration"]
    (1.0, 2.8333)
    >>> r["5m"]["r:v1"]["click"]["n"], r["1h"]["r:v1"]["click"]["n"]
    (500, 6000)
    """

    def __init__(self, heads: Sequence[str], windows: Sequence[Window] = WINDOWS, *,
                 window: Optional[float] = None):
        if window is not None:
            windows = (Window(f"{window:g}s", float(window), 10),)
        if not windows:
            raise ValueError("a monitor needs at least one window")
        self.heads = tuple(heads)
        self.windows = tuple(windows)
        self._tick = min(w.width for w in self.windows)
        # How many ticks each window's slice spans (a whole number).
        self._ratios = []
        for w in self.windows:
            ratio = round(w.width / self._tick)
            if abs(ratio * self._tick - w.width) > 1e-9 * w.width:
                raise ValueError(f"window {w.name}'s slices ({w.width:g} s) are not a whole "
                                 f"multiple of the finest ({self._tick:g} s)")
            self._ratios.append(ratio)
        self._size = STATS * len(self.heads)
        self._offsets = tuple((h, STATS * j) for j, h in enumerate(self.heads))
        self._models: dict[str, _Version] = {}

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, model: str) -> bool:
        return model in self._models

    def update(self, model: str, labels: dict, probs: dict, now: Optional[float] = None) -> None:
        """One served, labelled example: ``labels`` and ``probs`` map head -> value; a head
        counts when both have it.  ``now``: wall time (seconds), the clock by default."""
        version = self._models.get(model)
        if version is None:
            version = self._models[model] = _Version(self._size, self.windows)
        tick = int((time.time() if now is None else now) // self._tick)
        if tick != version.tick:
            self._flush(version)
            version.tick = tick
        sums = version.pending
        for head, i in self._offsets:
            y = labels.get(head)
            p = probs.get(head)
            if y is None or p is None or not isinstance(p, (int, float)):
                continue
            p = EPS if p < EPS else 1.0 - EPS if p > 1.0 - EPS else float(p)
            if y == 1:
                loss = -math.log(p)
            elif y == 0:
                loss = -math.log(1.0 - p)
            else:
                loss = -(y * math.log(p) + (1.0 - y) * math.log(1.0 - p))
            sums[i] += 1.0
            sums[i + 1] += y
            sums[i + 2] += p
            sums[i + 3] += loss
            sums[i + 4] += loss * loss

    def _flush(self, version: _Version) -> None:
        if version.tick < 0 or not any(version.pending):
            return
        pending = np.asarray(version.pending)
        for ring, ratio in zip(version.rings, self._ratios):
            ring.add(version.tick // ratio, pending)
        version.pending = [0.0] * self._size

    def reports(self, now: Optional[float] = None) -> dict:
        """``{window name: {model: {head: figures}}}`` (:func:`head_figures`) at ``now``."""
        tick = int((time.time() if now is None else now) // self._tick)
        out: dict = {w.name: {} for w in self.windows}
        for model, version in self._models.items():
            self._flush(version)
            for w, ring, ratio in zip(self.windows, version.rings, self._ratios):
                total = ring.total(tick // ratio).tolist()
                out[w.name][model] = {h: head_figures(total[i:i + STATS])
                                      for h, i in self._offsets}
        return out

    def report(self, now: Optional[float] = None, window: Optional[str] = None) -> dict:
        """One window's report (the first, shortest by default): ``{model: {head: figures}}``."""
        return self.reports(now)[window or self.windows[0].name]

    def retain(self, watched: Callable[[str], bool]) -> list[str]:
        """Drop the sums of versions no longer watched; returns their names.

        >>> m = StabilityMonitor(("click",))
        >>> for v in ("v1", "v2"):
        ...     m.update(f"r:{v}", {"click": 1}, {"click": 0.5}, now=0.0)
        >>> m.retain(lambda key: key != "r:v1"), sorted(m.report(now=1.0))
        (['r:v1'], ['r:v2'])
        """
        dropped = [key for key in self._models if not watched(key)]
        for key in dropped:
            del self._models[key]
        return dropped

    def drop(self, model: str) -> bool:
        """Forget one version (rolled back, say); whether it was kept."""
        return self._models.pop(model, None) is not None


def judged(figures: dict, slo: SLO) -> bool:
    """Whether a head's figures rest on enough labels to judge: ``slo.min_examples``
    examples and ``slo.min_positives`` positives.

    >>> judged({"n": 49, "rate": 0.5}, SLO()), judged({"n": 200, "rate": 0.01}, SLO())
    (False, False)
    >>> judged({"n": 200, "rate": 0.1}, SLO())
    True
    """
    n = figures.get("n", 0)
    return n >= slo.min_examples and round(n * (figures.get("rate") or 0.0)) >= slo.min_positives


def violations(report: dict, slo: SLO, z: float = 0.0) -> list[dict]:
    """Alerts for every (model, head) outside its SLO, with the numbers that broke it.
    With ``z`` > 0, only breaches that stand ``z`` standard errors beyond the bound
    (``"z"`` in each alert): for calibration, how unlikely the positives seen are had the
    calibration been the bound (:func:`poisson_tail`, as normal deviations); for NE, from
    ``ne_se``.

    >>> near = {"r": {"click": {"n": 200, "rate": 0.05, "calibration": 1.4, "ne": 0.8}}}
    >>> [a["z"] for a in violations(near, SLO())], violations(near, SLO(), z=3.0)
    ([0.16], [])
    >>> far = {"r": {"click": {"n": 400, "rate": 0.05, "calibration": 3.0, "ne": 0.8}}}
    >>> [a["z"] for a in violations(far, SLO(), z=3.0)]
    [4.46]
    """
    return [a for model, heads in report.items() for head, m in heads.items()
            if judged(m, slo) for a in head_breaches(model, head, m, slo, z)]


def head_breaches(model: str, head: str, m: dict, slo: SLO, z: float = 0.0,
                  **extra) -> list[dict]:
    """The breaches of one head's figures ``m`` (judged: see :func:`judged`), as
    :func:`violations` gives them, with ``extra`` items in each."""
    out = []
    n = m.get("n", 0)
    cal = m.get("calibration")
    if cal is not None and not slo.calibration_low <= cal <= slo.calibration_high:
        positives = round(n * (m.get("rate") or 0.0))
        high = cal > slo.calibration_high
        bound = slo.calibration_high if high else slo.calibration_low
        # The positives these predictions would have met were the calibration the bound;
        # as few (too high) or as many (too low) as seen is that unlikely.
        score = tail_score(poisson_tail(positives, cal * positives / bound, upper=not high))
        if score >= z:
            out.append({"model": model, "head": head, "metric": "calibration", "value": cal,
                        "bounds": [slo.calibration_low, slo.calibration_high], "n": n,
                        "z": _rounded(score), **extra})
    ne = m.get("ne")
    if ne is not None and ne > slo.max_normalized_entropy:
        se = m.get("ne_se")
        score = (ne - slo.max_normalized_entropy) / se if se else math.inf
        if score >= z:
            out.append({"model": model, "head": head, "metric": "normalized_entropy",
                        "value": ne, "bounds": [0.0, slo.max_normalized_entropy], "n": n,
                        "z": _rounded(score), **extra})
    return out


def poisson_tail(k: int, mu: float, upper: bool) -> float:
    """P(X >= k) (``upper``) or P(X <= k) for X ~ Poisson(mu): exact for means up to 200
    (counts of rare positives are far from normal), beyond by the chi-square relation.

    >>> [round(poisson_tail(k, mu, upper), 5) for k, mu, upper in [
    ...     (5, 0.62, True), (10, 24.0, False), (300, 250.0, True), (200, 250.0, False)]]
    [0.00046, 0.00108, 0.00116, 0.00062]
    """
    if mu <= 0:
        return 0.0 if upper and k > 0 else 1.0
    if upper and k <= 0:
        return 1.0
    if mu > 200.0:
        # P(X <= k) = P(chi2 with 2(k + 1) degrees > 2 mu), chi2 by Wilson and Hilferty.
        nu = 2.0 * (k if upper else k + 1)
        x = ((2.0 * mu / nu) ** (1 / 3) - (1 - 2 / (9 * nu))) / math.sqrt(2 / (9 * nu))
        return 0.5 * math.erfc((-x if upper else x) / math.sqrt(2))
    if upper and k > mu + 40.0 * math.sqrt(mu) + 40.0:
        return 0.0
    term, below = math.exp(-mu), 0.0
    for i in range(k if upper else k + 1):
        below += term
        term *= mu / (i + 1)
    return max(1.0 - below, 0.0) if upper else min(below, 1.0)


def tail_score(p: float) -> float:
    """A one-sided tail probability as standard normal deviations.

    >>> round(tail_score(0.00135), 2), tail_score(1e-300) > 30, tail_score(0.0)
    (3.0, True, inf)
    """
    if p <= 0.0:
        return math.inf
    return -math.inf if p >= 1.0 else -NormalDist().inv_cdf(p)


def _rounded(score: float) -> Optional[float]:
    return round(score, 2) if math.isfinite(score) else None


def window_violations(reports: dict, slo_of: Callable[[str], SLO],
                      z: float = ALERT_Z) -> tuple[list[dict], set]:
    """Every window judged on its own sample (``reports`` as
    :meth:`StabilityMonitor.reports` gives them, ``slo_of(model)`` the version's SLO):
    the violations that stand ``z`` standard errors beyond their bound
    (:func:`violations`), each tagged with its ``window``, and the ``(model, head,
    window)`` whose sample is too small to judge yet.

    >>> bad = {"n": 600, "rate": 0.1, "calibration": 2.0, "ne": 0.9}
    >>> few = {"n": 30, "rate": 0.1, "calibration": 2.0, "ne": 0.9}
    >>> alerts, unjudged = window_violations({"5m": {"r:v1": {"click": few}},
    ...                                       "1h": {"r:v1": {"click": bad}}}, lambda m: SLO())
    >>> [(a["window"], a["metric"]) for a in alerts], unjudged
    ([('1h', 'calibration')], {('r:v1', 'click', '5m')})
    """
    alerts, unjudged = [], set()
    for window, report in reports.items():
        for model, heads in report.items():
            slo = slo_of(model)
            for head, m in heads.items():
                if judged(m, slo):
                    alerts.extend(head_breaches(model, head, m, slo, z, window=window))
                else:
                    unjudged.add((model, head, window))
    return alerts, unjudged


class AlertBook:
    """Open alerts from successive reports' violations.  A breach, (model, head, metric,
    window), that persists is one alert: opened by the first report that has it
    (``opened_at``), kept with the latest value (``seen_at``, ``reports``: how many
    reports had it), and cleared once ``clear_after`` reports in a row have it no more:
    the head is back within bounds or its version is no longer watched.  ``cleared_at``
    is the first of those reports, when the breach ended; a breach that flickers back
    within them stays the same alert.  A head whose window has too few labels to judge
    (``unjudged``) neither clears nor holds its alert: not judged is not recovered.  The
    last ``keep_cleared`` cleared alerts are kept to show.

    >>> book = AlertBook()
    >>> bad = {"model": "r:v1", "head": "click", "metric": "calibration", "window": "5m",
    ...        "value": 2.0}
    >>> [len(book.update([bad], now=t)["opened"]) for t in (10.0, 20.0, 30.0)]
    [1, 0, 0]
    >>> book.update([], now=40.0, unjudged={("r:v1", "click", "5m")})["cleared"]
    []
    >>> [book.update([], now=t)["cleared"] for t in (50.0, 60.0)]
    [[], []]
    >>> ended = book.update([], now=70.0)["cleared"][0]
    >>> ended["opened_at"], ended["seen_at"], ended["cleared_at"], ended["reports"], book.open()
    (10.0, 30.0, 50.0, 3, [])
    """

    def __init__(self, clear_after: int = 3, keep_cleared: int = 100):
        if clear_after < 1:
            raise ValueError("clear_after is a number of reports, at least 1")
        self.clear_after = clear_after
        self._open: dict[tuple, dict] = {}
        #: key -> (first report without the breach, how many reports since without it)
        self._clean: dict[tuple, tuple[float, int]] = {}
        self.cleared: deque = deque(maxlen=keep_cleared)

    @staticmethod
    def key(alert: dict) -> tuple:
        return (alert["model"], alert["head"], alert["metric"], alert.get("window") or "")

    def update(self, violations: Iterable[dict], now: float,
               unjudged: Iterable[tuple] = ()) -> dict:
        """Take one report's violations: returns ``opened`` (new this report), ``open``
        (all open now, oldest first) and ``cleared`` (ended, known this report)."""
        seen = {self.key(v): v for v in violations}
        opened = []
        for key, v in seen.items():
            alert = self._open.get(key)
            if alert is None:
                alert = self._open[key] = {**v, "opened_at": now, "seen_at": now, "reports": 1}
                opened.append(dict(alert))
            else:
                alert.update(v, seen_at=now, reports=alert["reports"] + 1)
                self._clean.pop(key, None)
        unjudged = set(unjudged)
        cleared = []
        for key in [k for k in self._open if k not in seen and k[:2] + k[3:] not in unjudged]:
            since, count = self._clean.get(key, (now, 0))
            if count + 1 < self.clear_after:
                self._clean[key] = (since, count + 1)
                continue
            self._clean.pop(key, None)
            alert = {**self._open.pop(key), "cleared_at": since}
            cleared.append(alert)
            self.cleared.append(alert)
        return {"opened": opened, "open": self.open(), "cleared": cleared}

    def open(self) -> list[dict]:
        """The open alerts, oldest first (copies)."""
        return [dict(a) for key, a in sorted(self._open.items(),
                                             key=lambda kv: (kv[1]["opened_at"], kv[0]))]

    def __len__(self) -> int:
        return len(self._open)

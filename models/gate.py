"""The go-live gate: a new model version serves only when it is better (numpy, pure).

Progressive validation: every fresh batch of labelled examples is scored by
the candidate (the online trainer's current state) and by the live version
*before* the trainer learns from it, so both are judged on examples neither
has trained on.  :class:`HeadTotals` keeps, per head, the sums that normalized
entropy and calibration need (count, positives, sum of predictions, summed log
loss); :class:`ProgressiveValidation` pairs the two models' totals over the
same examples; :func:`decide` applies :class:`GateRules` when a version is
published.  NE and calibration mean what :mod:`models.metrics` says they mean.

>>> labels, mask = labels_and_mask([{"click": 1}, {"click": 0}, {"click": 0}, {"click": 0}],
...                                heads=("click",))
>>> window = ProgressiveValidation(live_version="v1", heads=("click",))
>>> window.add(labels, mask, candidate=[[0.6], [0.1], [0.2], [0.1]], live=[[0.4], [0.2], [0.3], [0.2]])
>>> rules = GateRules(min_examples=4, min_positives=1, value_heads=("click",),
...                   calibration_heads=("click",))
>>> decision = window.decide(rules)
>>> decision.state, decision.reason
('live', 'weighted NE 0.420 beats live v1 (0.764) by 0.344; calibration click 1.00 (live 1.10)')
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Mapping, Optional, Sequence

import numpy as np

from models.features import HEADS
from models.metrics import log_loss
from models.value import DEFAULT_WEIGHTS

#: Examples, and positives on each required head, before any decision is made.
MIN_EXAMPLES = 500
MIN_POSITIVES = 30
#: Heads that must have MIN_POSITIVES before a decision: the main, frequent engagement.
REQUIRED_HEADS = ("click",)
#: Heads some surface's value model weighs: each with enough positives must beat the base rate.
VALUE_HEADS = tuple(h for h in HEADS if any(w.get(h) for w in DEFAULT_WEIGHTS.values()))
#: A candidate's NE on every value head with enough positives must be below this (1: base rate).
MAX_NE = 1.0
#: With a version live, the candidate's weighted mean NE must be lower by at least this much:
#: small enough for real progress to pass, large enough that noise does not swap versions.
MIN_NE_GAIN = 0.005
#: Heads whose calibration must not get worse, and by how much (in |log calibration|) it may.
CALIBRATION_HEADS = ("click", "like")
CALIBRATION_SLACK = 0.02
#: Calibration within [1/band, band] is good enough (the stability SLO's target for click and
#: like): a candidate inside it passes even if the live version is closer to 1.
CALIBRATION_BAND = 1.1


def labels_and_mask(label_dicts: Sequence[Mapping[str, int]], heads: Sequence[str] = HEADS
                    ) -> tuple[np.ndarray, np.ndarray]:
    """[B, heads] labels and a mask of the cells whose label is known (``Example.labels``).

    >>> labels, mask = labels_and_mask([{"click": 1}, {"like": 0}], heads=("click", "like"))
    >>> labels.tolist(), mask.tolist()
    ([[1.0, 0.0], [0.0, 0.0]], [[True, False], [False, True]])
    """
    labels = np.zeros((len(label_dicts), len(heads)), dtype=np.float64)
    mask = np.zeros(labels.shape, dtype=bool)
    for i, d in enumerate(label_dicts):
        for j, head in enumerate(heads):
            if head in d:
                labels[i, j], mask[i, j] = float(d[head]), True
    return labels, mask


def base_entropy(rate: float) -> float:
    """Log loss of always predicting ``rate`` where ``rate`` is the observed rate: the
    denominator of :func:`models.metrics.normalized_entropy`.

    >>> round(base_entropy(0.5), 4), math.isnan(base_entropy(0.0))
    (0.6931, True)
    """
    if not 0.0 < rate < 1.0:
        return math.nan
    return log_loss([rate], [rate])


class HeadTotals:
    """Per-head sums over one model's predictions on labelled examples.

    >>> t = HeadTotals(heads=("like",))
    >>> t.add([[1], [0], [0], [0]], [[1], [1], [1], [1]], [[0.25]] * 4)
    >>> t.examples, t.report()["like"]
    (4, {'n': 4, 'positives': 1, 'ne': 1.0, 'calibration': 1.0})
    """

    def __init__(self, heads: Sequence[str] = HEADS):
        self.heads = tuple(heads)
        self.examples = 0
        self.n = np.zeros(len(self.heads))
        self.positives = np.zeros(len(self.heads))
        self.predicted = np.zeros(len(self.heads))
        self.log_loss = np.zeros(len(self.heads))

    def add(self, labels, mask, probs) -> None:
        """Add rows of [B, heads] labels, known-label mask and predicted probabilities."""
        y = np.asarray(labels, dtype=np.float64).reshape(-1, len(self.heads))
        m = np.asarray(mask, dtype=bool).reshape(y.shape)
        p = np.asarray(probs, dtype=np.float64).reshape(y.shape)
        self.examples += y.shape[0]
        for j in range(len(self.heads)):
            keep = m[:, j]
            count = int(keep.sum())
            if count:
                self.n[j] += count
                self.positives[j] += y[keep, j].sum()
                self.predicted[j] += p[keep, j].sum()
                self.log_loss[j] += log_loss(y[keep, j], p[keep, j]) * count

    def ne(self) -> np.ndarray:
        """Normalized entropy per head (NaN where a head has no label or only one class)."""
        out = np.full(len(self.heads), math.nan)
        for j in range(len(self.heads)):
            if self.n[j]:
                out[j] = self.log_loss[j] / self.n[j] / base_entropy(self.positives[j] / self.n[j])
        return out

    def calibration(self) -> np.ndarray:
        """Sum of predictions over sum of labels per head (NaN without positives)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.positives > 0, self.predicted / np.maximum(self.positives, 1e-12),
                            math.nan)

    def report(self) -> dict:
        """Per head: n, positives, NE and calibration (rounded; NaN becomes None)."""
        ne, cal = self.ne(), self.calibration()
        return {h: {"n": int(self.n[j]), "positives": int(self.positives[j]),
                    "ne": _rounded(ne[j]), "calibration": _rounded(cal[j])}
                for j, h in enumerate(self.heads)}


def _rounded(x: float, digits: int = 4) -> Optional[float]:
    return None if math.isnan(x) else round(float(x), digits)


@dataclass(frozen=True)
class GateRules:
    """When a candidate may go live (defaults: the module's constants)."""
    min_examples: int = MIN_EXAMPLES
    min_positives: int = MIN_POSITIVES
    required_heads: tuple = REQUIRED_HEADS
    value_heads: tuple = VALUE_HEADS
    max_ne: float = MAX_NE
    min_ne_gain: float = MIN_NE_GAIN
    #: The margin when the candidate continues training the live version itself: it has
    #: seen everything the live one saw and more, so not being worse is enough.
    min_ne_gain_descendant: float = 0.0
    calibration_heads: tuple = CALIBRATION_HEADS
    calibration_slack: float = CALIBRATION_SLACK
    calibration_band: float = CALIBRATION_BAND

    @classmethod
    def from_env(cls, environ: Mapping[str, str], prefix: str = "STREAMREC_GATE_") -> "GateRules":
        """Numbers overridden by ``<prefix><FIELD>`` variables (heads stay as they are).

        >>> GateRules.from_env({"STREAMREC_GATE_MIN_EXAMPLES": "50"}).min_examples
        50
        """
        changes = {}
        for f in fields(cls):
            raw = environ.get(prefix + f.name.upper())
            if raw is not None and f.type in ("int", "float"):
                changes[f.name] = int(raw) if f.type == "int" else float(raw)
        return cls(**changes)


@dataclass
class Decision:
    """The gate's verdict on a candidate.  ``decided`` is False while the evidence is too
    thin to judge; the version is then not live either."""
    go_live: bool
    reason: str
    evidence: dict = field(default_factory=dict)
    decided: bool = True

    @property
    def state(self) -> str:
        """The registry state the version gets: ``live`` or ``registered``."""
        return "live" if self.go_live else "registered"

    def to_dict(self) -> dict:
        return asdict(self)


def _weighted_ne(totals: HeadTotals, heads: Sequence[int]) -> float:
    """Mean NE over ``heads`` weighted by their positives: heads with more evidence count
    more, so a rare head's noisy NE cannot outvote click."""
    ne = totals.ne()
    weights = np.array([totals.positives[j] for j in heads])
    values = np.array([ne[j] for j in heads])
    return float((weights * values).sum() / weights.sum()) if weights.sum() else math.nan


def decide(candidate: HeadTotals, live: Optional[HeadTotals], rules: GateRules = GateRules(),
           live_name: str = "live", descendant: bool = False) -> Decision:
    """May ``candidate`` go live?  ``live`` holds the live version's totals on the same
    examples (None when nothing is live).

    No decision below ``min_examples`` examples or ``min_positives`` on a required head.
    Then the candidate must (a) beat the base rate (NE below ``max_ne``) on every value
    head with ``min_positives``, and (b) with a version live, lower the weighted mean NE
    of those heads by ``min_ne_gain`` (``min_ne_gain_descendant`` when ``descendant``: the
    candidate is the live version trained further) without calibration on ``calibration_heads``
    moving further from 1 (by more than ``calibration_slack`` in |log|, unless it stays
    within ``calibration_band``).  A live version that itself fails (a) on these
    examples has no standing: passing (a) is enough to replace it.

    >>> heads = ("click",)
    >>> y, m = [[1], [0], [0], [0]], [[1]] * 4
    >>> cand = HeadTotals(heads)
    >>> cand.add(y, m, [[0.5]] * 4)
    >>> rules = GateRules(min_examples=4, min_positives=1, required_heads=heads,
    ...                   value_heads=heads, calibration_heads=heads)
    >>> decide(cand, None, rules).reason
    'click NE 1.233 does not beat the base rate (must be below 1.0)'
    >>> decide(cand, None, GateRules(min_examples=10)).decided
    False
    """
    index = {h: j for j, h in enumerate(candidate.heads)}
    ne_c, cal_c = candidate.ne(), candidate.calibration()
    evidence = {"examples": candidate.examples, "heads": {}, "rules": asdict(rules)}
    for h, rep in candidate.report().items():
        evidence["heads"][h] = {"n": rep["n"], "positives": rep["positives"],
                                "candidate": {"ne": rep["ne"], "calibration": rep["calibration"]}}
    if live is not None:
        for h, rep in live.report().items():
            evidence["heads"][h]["live"] = {"ne": rep["ne"], "calibration": rep["calibration"]}

    if candidate.examples < rules.min_examples:
        return Decision(False, f"no decision yet: {candidate.examples} of {rules.min_examples} "
                               f"examples", evidence, decided=False)
    for h in rules.required_heads:
        if candidate.positives[index[h]] < rules.min_positives:
            return Decision(False, f"no decision yet: {int(candidate.positives[index[h]])} of "
                                   f"{rules.min_positives} {h} positives", evidence, decided=False)

    judged = [index[h] for h in rules.value_heads
              if h in index and candidate.positives[index[h]] >= rules.min_positives]
    evidence["judged_heads"] = [candidate.heads[j] for j in judged]
    mean_c = _weighted_ne(candidate, judged)
    evidence["candidate_ne"] = _rounded(mean_c)
    if live is not None:
        ne_l, cal_l = live.ne(), live.calibration()
        mean_l = _weighted_ne(live, judged)
        evidence["live_ne"] = _rounded(mean_l)
    for j in judged:
        if not ne_c[j] < rules.max_ne:  # NaN (one class only) fails too
            return Decision(False, f"{candidate.heads[j]} NE {ne_c[j]:.3f} does not beat the base "
                                   f"rate (must be below {rules.max_ne})", evidence)
    beats_base = ", ".join(f"{candidate.heads[j]} NE {ne_c[j]:.3f}" for j in judged)
    if live is None:
        return Decision(True, "no version live; beats the base rate: " + beats_base, evidence)
    lost = [j for j in judged if not ne_l[j] < rules.max_ne]
    if lost:
        # The live version fails the rule every candidate must pass (after a shift, say):
        # it has no standing to compare against.
        return Decision(True, f"live {live_name} no longer beats the base rate ("
                        + ", ".join(f"{live.heads[j]} NE {ne_l[j]:.3f}" for j in lost)
                        + "); the candidate does: " + beats_base, evidence)

    gain = mean_l - mean_c
    margin = rules.min_ne_gain_descendant if descendant else rules.min_ne_gain
    evidence["descendant_of_live"] = descendant
    if not gain >= margin:
        return Decision(False, f"weighted NE {mean_c:.3f} vs live {live_name} ({mean_l:.3f}): gain "
                               f"{gain:.3f} below the margin {margin}"
                               + (" for a continuation" if descendant else ""), evidence)
    checked = []
    for h in rules.calibration_heads:
        j = index.get(h)
        if j is None or candidate.positives[j] < rules.min_positives:
            continue
        off_c, off_l = abs(math.log(cal_c[j])), abs(math.log(cal_l[j]))
        if off_c > max(off_l + rules.calibration_slack, math.log(rules.calibration_band)):
            return Decision(False, f"{h} calibration {cal_c[j]:.2f} is further from 1 than live "
                                   f"{live_name}'s {cal_l[j]:.2f}", evidence)
        checked.append(f"{h} {cal_c[j]:.2f} (live {cal_l[j]:.2f})")
    return Decision(True, f"weighted NE {mean_c:.3f} beats live {live_name} ({mean_l:.3f}) by "
                          f"{gain:.3f}" + ("; calibration " + ", ".join(checked) if checked else ""),
                    evidence)


class ProgressiveValidation:
    """The candidate's and the live version's totals over the same fresh examples, and the
    topic offsets they came from, since the last decision.

    >>> w = ProgressiveValidation(live_version=None, heads=("click",))
    >>> w.add([[1], [0]], [[1], [1]], candidate=[[0.7], [0.2]], offsets={"0": (10, 11)})
    >>> w.add([[0]], [[1]], candidate=[[0.1]], offsets={"0": (12, 12)})
    >>> w.candidate.examples, w.live is None, w.offsets
    (3, True, {'0': [10, 12]})
    """

    def __init__(self, live_version: Optional[str], heads: Sequence[str] = HEADS):
        self.live_version = live_version
        self.candidate = HeadTotals(heads)
        self.live = HeadTotals(heads) if live_version is not None else None
        #: partition -> [first, last] offset of the examples scored.
        self.offsets: dict[str, list] = {}

    def add(self, labels, mask, candidate, live=None,
            offsets: Optional[Mapping[str, tuple]] = None) -> None:
        """Add one batch: both models' [B, heads] probabilities on the same labelled rows."""
        if (live is None) != (self.live is None):
            raise ValueError("score every batch with the live version, or none with it")
        self.candidate.add(labels, mask, candidate)
        if self.live is not None:
            self.live.add(labels, mask, live)
        for partition, (first, last) in (offsets or {}).items():
            seen = self.offsets.setdefault(str(partition), [first, last])
            seen[0], seen[1] = min(seen[0], first), max(seen[1], last)

    def decide(self, rules: GateRules = GateRules(), descendant: bool = False) -> Decision:
        decision = decide(self.candidate, self.live, rules, live_name=self.live_version or "live",
                          descendant=descendant)
        decision.evidence.update(live_version=self.live_version, offsets=self.offsets)
        return decision

"""Offline and online quality metrics for probability predictions (numpy, pure).

* :func:`normalized_entropy`: log loss divided by the log loss of always
  predicting the base rate; below 1 means the model knows more than the rate.
* :func:`calibration`: sum of predictions over sum of labels; 1 is calibrated.
* :func:`auc`: how well predictions order positives above negatives.

>>> labels, probs = [1, 0, 1, 0], [0.9, 0.1, 0.8, 0.3]
>>> round(normalized_entropy(labels, probs), 3), round(calibration(labels, probs), 3), auc(labels, probs)
(0.285, 1.05, 1.0)
"""
from __future__ import annotations

import math
from collections import deque
from typing import Optional, Sequence

import numpy as np

EPS = 1e-7


def _arrays(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and probs differ in length: {y.size} vs {p.size}")
    return y, np.clip(p, EPS, 1 - EPS)


def log_loss(labels, probs) -> float:
    """Mean binary cross-entropy (natural log); NaN for no examples.

    >>> round(log_loss([1, 0], [0.5, 0.5]), 4)
    0.6931
    """
    y, p = _arrays(labels, probs)
    if not y.size:
        return math.nan
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def normalized_entropy(labels, probs) -> float:
    """Log loss over the entropy of the base rate; NaN when all labels agree
    (there is nothing to normalise by).

    >>> round(normalized_entropy([1, 0, 0, 0], [0.25] * 4), 6)
    1.0
    """
    y, _ = _arrays(labels, probs)
    if not y.size:
        return math.nan
    rate = float(y.mean())
    if rate <= 0 or rate >= 1:
        return math.nan
    base = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    return log_loss(labels, probs) / base


def calibration(labels, probs) -> float:
    """Sum of predictions over sum of labels (over-predicting gives > 1).

    >>> calibration([1, 0, 1, 0], [0.8, 0.2, 0.8, 0.2])
    1.0
    """
    y, p = _arrays(labels, probs)
    return float(p.sum() / y.sum()) if y.sum() > 0 else math.nan


def auc(labels, probs) -> float:
    """Area under the ROC curve from ranks; tied scores count half.  NaN when
    only one class is present.

    >>> auc([0, 1, 0, 1], [0.1, 0.4, 0.35, 0.8]), auc([0, 1], [0.5, 0.5])
    (1.0, 0.5)
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    pos = int((y > 0.5).sum())
    neg = y.size - pos
    if pos == 0 or neg == 0:
        return math.nan
    order = np.argsort(p, kind="mergesort")
    sorted_p = p[order]
    ranks = np.empty(y.size, dtype=np.float64)
    # Tied scores share the mean of the ranks they span.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_p)) + 1]
    ends = np.r_[starts[1:], y.size]
    mean_rank = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return float((ranks[y > 0.5].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def summarize(labels, probs) -> dict:
    """All metrics of one head at once (rounded, JSON-safe: NaN becomes None)."""
    y = np.asarray(labels, dtype=np.float64)
    out = {"n": int(y.size), "rate": float(y.mean()) if y.size else None,
           "ne": normalized_entropy(labels, probs), "calibration": calibration(labels, probs),
           "auc": auc(labels, probs), "log_loss": log_loss(labels, probs)}
    return {k: (None if isinstance(v, float) and math.isnan(v) else
                round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


class RollingMetrics:
    """Metrics per head over the last ``window`` labelled examples of each head,
    for watching a model that keeps learning.

    >>> r = RollingMetrics(("like",), window=3)
    >>> r.update([[1], [0], [1], [0]], [[0.9], [0.2], [0.7], [0.1]])
    >>> r.report()["like"]["n"], r.report()["like"]["auc"]
    (3, 1.0)
    """

    def __init__(self, heads: Sequence[str], window: int = 10_000):
        self.heads = tuple(heads)
        self.window = window
        self._labels = {h: deque(maxlen=window) for h in self.heads}
        self._probs = {h: deque(maxlen=window) for h in self.heads}

    def update(self, labels, probs, mask: Optional[np.ndarray] = None) -> None:
        """Add rows of [B, heads] labels and probabilities; ``mask`` 0 skips a cell."""
        y = np.asarray(labels, dtype=np.float64).reshape(-1, len(self.heads))
        p = np.asarray(probs, dtype=np.float64).reshape(-1, len(self.heads))
        m = np.ones_like(y) if mask is None else np.asarray(mask).reshape(y.shape)
        for j, head in enumerate(self.heads):
            keep = m[:, j] > 0
            self._labels[head].extend(y[keep, j].tolist())
            self._probs[head].extend(p[keep, j].tolist())

    def report(self) -> dict:
        return {h: summarize(list(self._labels[h]), list(self._probs[h])) for h in self.heads}

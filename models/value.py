"""The value model: one number per candidate from the ranker's head probabilities.

Value is a weighted sum of P(head); the weights say what a surface is for
and are a product decision, so they live in config, not in the model.
``see_less`` carries a negative weight: an item likely to annoy loses value.

>>> value_score({"like": 0.5, "see_less": 0.25}, {"like": 2.0, "see_less": -4.0})
0.0
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np

from models.features import HEADS

DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    # Discovery: reward depth of engagement, punish "show me less" hard.
    "explore": {"click": 1.0, "like": 2.0, "save": 3.0, "share": 3.0, "comment": 2.0,
                "follow": 4.0, "long_dwell": 1.0, "see_less": -4.0},
    # Home feed: people mostly read it, so dwell counts more and follows less.
    "home": {"click": 1.0, "like": 2.0, "save": 2.0, "share": 3.0, "comment": 3.0,
             "follow": 2.0, "long_dwell": 2.0, "see_less": -4.0},
}


def weights_for(surface: str) -> dict[str, float]:
    """The default weights of ``surface`` (explore's for surfaces without their own)."""
    return DEFAULT_WEIGHTS.get(surface, DEFAULT_WEIGHTS["explore"])


def value_score(probs: Union[Mapping[str, float], Sequence[float]],
                weights: Mapping[str, float]) -> float:
    """Sum over heads of ``weight * P(head)``; ``probs`` is a dict by head or a row
    in :data:`~models.features.HEADS` order (list, numpy or torch).

    >>> round(value_score([1, 1, 0, 0, 0, 0, 0.5, 0], weights_for("explore")), 6)
    1.0
    """
    if not isinstance(probs, Mapping):
        row = [float(p) for p in probs]
        if len(row) != len(HEADS):
            raise ValueError(f"expected {len(HEADS)} probabilities, got {len(row)}")
        probs = dict(zip(HEADS, row))
    return float(sum(w * float(probs.get(head, 0.0)) for head, w in weights.items()))


def value_scores(probs: np.ndarray, weights: Mapping[str, float]) -> np.ndarray:
    """:func:`value_score` for every row of a [N, len(HEADS)] matrix at once.

    >>> value_scores(np.array([[0, 1, 0, 0, 0, 0, 0, 0.0]]), {"like": 2.0}).tolist()
    [2.0]
    """
    w = np.array([weights.get(h, 0.0) for h in HEADS], dtype=np.float64)
    return np.asarray(probs, dtype=np.float64) @ w


@dataclass(frozen=True)
class ValueWeights:
    """Validated weights of one surface."""
    weights: dict

    @classmethod
    def from_dict(cls, d: Mapping) -> "ValueWeights":
        """Refuse unknown heads, non-finite numbers and a positive see_less weight.

        >>> ValueWeights.from_dict({"like": 1, "see_less": -2}).weights
        {'like': 1.0, 'see_less': -2.0}
        >>> ValueWeights.from_dict({"likes": 1})
        Traceback (most recent call last):
        ...
        ValueError: unknown heads ['likes']; known: click, like, save, share, comment, follow, see_less, long_dwell
        """
        unknown = sorted(set(d) - set(HEADS))
        if unknown:
            raise ValueError(f"unknown heads {unknown}; known: {', '.join(HEADS)}")
        weights = {}
        for head, w in d.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"weight of {head!r} must be a finite number, got {w!r}")
            weights[head] = float(w)
        if weights.get("see_less", 0.0) > 0:
            raise ValueError("the see_less weight must be <= 0: it is a negative signal")
        return cls(weights)

    def score(self, probs) -> float:
        return value_score(probs, self.weights)

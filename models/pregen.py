"""Pre-generated sources: long-term results computed off-peak in a batch job.

Two products, both pure functions of a list of events:

- :func:`popular`: items with the most weighted engagement over the last days,
  per surface and per surface/region, decayed by age (half-life in days);
- :func:`item_embeddings`: item vectors from a truncated SVD of the positive
  pointwise mutual information (PPMI) of item co-engagement, an honest,
  model-free embedding that the ANN sources use until the two-tower model's
  item tower replaces it.

>>> from schemas.events import EngagementEvent as E
>>> evs = [E(f"e{n}", u, i, "like", "explore", 1e9) for n, (u, i) in
...        enumerate([("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "c")])]
>>> [i for i, _, _ in popular(evs, now=1e9)["explore"]][:2]
['a', 'b']
>>> vecs = item_embeddings(evs, dim=2)
>>> float(vecs["a"] @ vecs["b"]) > 0.9 > float(vecs["a"] @ vecs["c"])
True
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional

import numpy as np

from models.trending import EVENT_WEIGHTS
from schemas.events import POSITIVE_TYPES, EngagementEvent

DAY_S = 86400.0


def popular(events: Iterable[EngagementEvent], *, now: float, window_days: float = 7.0,
            half_life_days: float = 3.0, n: int = 500) -> dict[str, list]:
    """Top ``n`` items per ``surface`` and per ``surface/region``: ``[(item, score, author)]``."""
    scores: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    authors: dict[str, Optional[str]] = {}
    for ev in events:
        age = now - ev.ts
        if age > window_days * DAY_S:
            continue
        weight = EVENT_WEIGHTS[ev.event_type] * 0.5 ** (max(age, 0.0) / (half_life_days * DAY_S))
        scores[ev.surface][ev.item_id] += weight
        if ev.region:
            scores[f"{ev.surface}/{ev.region}"][ev.item_id] += weight
        if ev.author_id is not None:
            authors[ev.item_id] = ev.author_id
    out = {}
    for key, by_item in scores.items():
        top = sorted(((i, s) for i, s in by_item.items() if s > 0), key=lambda x: (-x[1], x[0]))
        out[key] = [(i, round(s, 6), authors.get(i)) for i, s in top[:n]]
    return out


def item_embeddings(events: Iterable[EngagementEvent], *, dim: int = 32,
                    max_items_per_user: int = 200, min_count: int = 1) -> dict[str, np.ndarray]:
    """Unit-norm item vectors from the SVD of the PPMI item co-engagement matrix.

    Each user's positive items (the most recent ``max_items_per_user``) count as
    co-engaged with each other.  Items seen positively fewer than ``min_count``
    times get no vector.
    """
    by_user: dict[str, list[str]] = defaultdict(list)
    for ev in sorted(events, key=lambda e: e.ts):
        if ev.event_type in POSITIVE_TYPES:
            by_user[ev.user_id].append(ev.item_id)
    counts: dict[str, int] = defaultdict(int)
    for items in by_user.values():
        for item in set(items[-max_items_per_user:]):
            counts[item] += 1
    ids = sorted(i for i, c in counts.items() if c >= min_count)
    if len(ids) < 2:
        return {}
    index = {item: j for j, item in enumerate(ids)}
    # Item-user incidence, then co-occurrence as its Gram matrix (small catalogues;
    # a sparse or sampled variant is the way to scale this batch job).
    incidence = np.zeros((len(ids), len(by_user)), dtype=np.float32)
    for u, items in enumerate(by_user.values()):
        for item in set(items[-max_items_per_user:]):
            if item in index:
                incidence[index[item], u] = 1.0
    # The diagonal (an item with itself) stays: it makes items that share
    # co-engaged neighbours, and items engaged together, end up close.
    co = incidence @ incidence.T
    total = co.sum()
    if total <= 0:
        return {}
    row = co.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log((co * total) / (row @ row.T))
    ppmi = np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0.0).astype(np.float32)
    k = max(1, min(dim, len(ids) - 1))
    u, s, _ = np.linalg.svd(ppmi, full_matrices=False)
    vectors = u[:, :k] * np.sqrt(s[:k])
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = np.where(norms > 0, vectors / np.where(norms > 0, norms, 1.0), 0.0)
    return {item: vectors[j].astype(np.float32) for item, j in index.items()
            if norms[j, 0] > 0}

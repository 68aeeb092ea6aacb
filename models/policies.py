"""Reference policies, scored on the same simulated world as the real system.

Each is ``(world, user, candidates, k, t) -> list of item ids`` (the world's
int ids), where ``candidates`` is the live catalogue the user has not seen:

* :func:`random_policy`: the floor any ranker should beat;
* :func:`popularity_policy`: most positive engagements observed so far;
* :func:`oracle_policy`: best TRUE expected value for this user now, the
  physical limit no learned model can pass.

>>> from models.world import World, WorldConfig
>>> w = World(WorldConfig(n_users=3, n_authors=2, items_per_author=5, seed=2))
>>> c = w.candidates(0)
>>> len(random_policy(w, 0, c, 3, 0.0)), len(set(oracle_policy(w, 0, c, 3, 0.0)))
(3, 3)
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from models.world import World, expected_values

Policy = Callable[[World, int, Sequence[int], int, float], list]


def random_policy(world: World, user: int, candidates: Sequence[int], k: int, t: float) -> list:
    """``k`` candidates drawn uniformly without replacement (world.policy_rng)."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if len(candidates) <= k:
        return candidates.tolist()
    return world.policy_rng.choice(candidates, size=k, replace=False).tolist()


def popularity_policy(world: World, user: int, candidates: Sequence[int], k: int, t: float) -> list:
    """The ``k`` candidates with the most observed positive engagements; ties go
    to the newer item (fresh content is not starved forever)."""
    candidates = np.asarray(candidates, dtype=np.int64)
    counts = world.engagement_counts[candidates]
    # lexsort: last key is primary; newer (larger created) first among equal counts.
    order = np.lexsort((-world.item_created[candidates], -counts))
    return candidates[order[:k]].tolist()


def oracle_policy(world: World, user: int, candidates: Sequence[int], k: int, t: float) -> list:
    """The ``k`` candidates with the highest TRUE expected value for ``user`` at ``t``.

    Position bias multiplies every head by the same factor, so sorting by the
    value at the top position is also the best order over positions.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    if not len(candidates):
        return []
    probs = world.probability_matrix(user, candidates, np.zeros(len(candidates)), t)
    values = expected_values(probs, world.weights)
    top = np.argsort(-values, kind="stable")[:k]
    return candidates[top].tolist()


POLICIES: dict[str, Policy] = {"random": random_policy, "popularity": popularity_policy,
                               "oracle": oracle_policy}


def served_value(world: World, user: int, items: Sequence[int], t: float) -> tuple[float, float]:
    """(true expected value, expected positive engagements) of serving ``items``
    in order: the sum over positions, position bias included.

    >>> from models.world import World, WorldConfig
    >>> w = World(WorldConfig(n_users=2, n_authors=2, items_per_author=3))
    >>> served_value(w, 0, [], 0.0)
    (0.0, 0.0)
    """
    from models.world import ENGAGEMENT_HEADS, POSITIVE_HEADS
    if not len(items):
        return 0.0, 0.0
    probs = world.probability_matrix(user, list(items), np.arange(len(items)), t)
    positive = [ENGAGEMENT_HEADS.index(h) for h in POSITIVE_HEADS]
    return float(expected_values(probs, world.weights).sum()), float(probs[:, positive].sum())

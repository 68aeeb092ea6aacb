"""Reference policies, scored on the same simulated world as the real system.

Each is ``(world, user, candidates, k, t) -> list of item ids`` (the world's
int ids), where ``candidates`` is the live catalogue the user has not seen:

* :func:`random_policy`: the floor any ranker should beat;
* :func:`popularity_policy`: most positive engagements observed so far;
* :func:`oracle_policy`: the best list by TRUE expected value for this user
  now, the physical limit no learned model can pass.

All three keep the hard rules the system keeps, so that comparing with them
measures ranking and retrieval, not rule-breaking: no objectionable item
(the world knows which are), no two items of one author in a row (the
funnel's rerank with ``max_author_run=1``), and exactly ``k`` items whenever
the candidates allow a list of ``k`` under those rules (otherwise the longest
list that keeps them).

>>> from models.world import World, WorldConfig
>>> w = World(WorldConfig(n_users=3, n_authors=2, items_per_author=5, seed=2))
>>> c = w.candidates(0)
>>> len(random_policy(w, 0, c, 3, 0.0)), len(set(oracle_policy(w, 0, c, 3, 0.0)))
(3, 3)
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Mapping, Sequence

import numpy as np

from models.world import ENGAGEMENT_HEADS, POSITIVE_HEADS, World, attention, expected_values

Policy = Callable[[World, int, Sequence[int], int, float], list]


def longest_list(author_counts: Mapping, k: int) -> int:
    """The longest list, at most ``k``, with no two items of one author in a row,
    that items by authors with these counts allow.

    A list of ``n`` items can keep the rule iff no author fills more than
    ``ceil(n / 2)`` of it, so authors beyond that cap do not help.

    >>> longest_list({"a": 5}, 3), longest_list({"a": 5, "b": 1}, 10), longest_list({"a": 2, "b": 2}, 3)
    (1, 3, 3)
    """
    n = min(k, sum(author_counts.values()))
    while n > 0 and sum(min(c, (n + 1) // 2) for c in author_counts.values()) < n:
        n -= 1
    return n


def can_follow(author_counts: Mapping, last, slots: int) -> bool:
    """Whether ``slots`` more items can follow an item by ``last`` without two of
    one author in a row, choosing from items by authors with these counts left.

    ``last`` may take at most ``floor(slots / 2)`` of them (never the next
    one), every other author ``ceil(slots / 2)``.

    >>> can_follow({"a": 1, "b": 1}, "a", 2), can_follow({"a": 2, "b": 1}, "a", 3)
    (True, False)
    """
    if slots <= 0:
        return True
    return sum(min(c, slots // 2 if a == last else (slots + 1) // 2)
               for a, c in author_counts.items()) >= slots


def constrained_list(items: Sequence, authors: Sequence, k: int) -> list:
    """Take ``items`` in order of preference, skipping any that would put two
    items of one author in a row or leave the rest of the list impossible.

    The result has :func:`longest_list` items: a choice that would strand the
    list (say, only one author left for the last two slots) is never made.

    >>> constrained_list(["b1", "c1", "a1", "a2"], ["b", "c", "a", "a"], 4)
    ['b1', 'a1', 'c1', 'a2']
    """
    items, authors = list(items), list(authors)
    left = Counter(authors)
    size = longest_list(left, k)
    out: list = []
    taken = [False] * len(items)
    last = None
    while len(out) < size:
        for j, author in enumerate(authors):
            if taken[j] or author == last:
                continue
            left[author] -= 1
            if can_follow(left, author, size - len(out) - 1):
                taken[j] = True
                out.append(items[j])
                last = author
                break
            left[author] += 1
        else:  # unreachable: longest_list guarantees a way to fill every slot
            break
    return out


def best_list(values: Sequence[float], authors: Sequence, k: int,
              slot_weights: Sequence[float]) -> list[int]:
    """Indices of the list with the highest ``sum(slot_weights[p] * values[item at p])``
    among lists of :func:`longest_list` items with no two of one author in a row.

    ``slot_weights`` must be positive and non-increasing (position bias).
    Exact, by branch and bound over a pool that provably holds an optimal list:

    * an author's items in a list can always be its best ones, best first, so
      only each author's best ``ceil(n / 2)`` items matter;
    * in an optimal list every unused better item is by an author of a
      neighbour (else swapping it in would gain), so every item used ranks
      within ``n + 2 ceil(n / 2)`` of that pool.

    Greedy by value is not optimal: with A1=10, B1=9, B2=8.9 and another item
    at 0, greedy takes A1, B1 and then nothing better than 0, while B1, A1, B2
    is worth more.

    >>> best_list([10.0, 9.0, 8.9, 0.0], ["A", "B", "B", "C"], 3, [1.0, 0.6, 0.5])
    [1, 0, 2]
    """
    values = np.asarray(values, dtype=np.float64)
    authors = list(authors)
    size = longest_list(Counter(authors), k)
    if size == 0:
        return []
    per_author = (size + 1) // 2
    order = sorted(range(len(values)), key=lambda j: (-values[j], j))
    per_author_taken: Counter = Counter()
    pool: list[int] = []
    for j in order:
        if per_author_taken[authors[j]] < per_author:
            per_author_taken[authors[j]] += 1
            pool.append(j)
    pool = pool[:size + 2 * per_author]
    queues: dict = {}
    rank_in_author: dict = {}
    for j in pool:  # best first within each author
        rank_in_author[j] = len(queues.setdefault(authors[j], []))
        queues[authors[j]].append(j)
    weights = np.asarray(slot_weights[:size], dtype=np.float64)

    taken = dict.fromkeys(queues, 0)
    left = Counter({a: len(q) for a, q in queues.items()})
    greedy = constrained_list(pool, [authors[j] for j in pool], size)
    best = {"value": float(weights @ values[greedy]), "list": greedy}
    path: list[int] = []

    def bound(slot: int, value: float) -> float:
        free = [values[j] for j in pool if rank_in_author[j] >= taken[authors[j]]]
        return value + float(weights[slot:] @ np.asarray(free[:size - slot]))

    def search(slot: int, last, value: float) -> None:
        if slot == size:
            if value > best["value"] + 1e-12:
                best.update(value=value, list=list(path))
            return
        if bound(slot, value) <= best["value"] + 1e-12:
            return
        heads = sorted(((queues[a][taken[a]], a) for a in queues
                        if a != last and taken[a] < len(queues[a])),
                       key=lambda ja: (-values[ja[0]], ja[0]))
        for j, a in heads:
            left[a] -= 1
            if can_follow(left, a, size - slot - 1):
                taken[a] += 1
                path.append(j)
                search(slot + 1, a, value + weights[slot] * values[j])
                path.pop()
                taken[a] -= 1
            left[a] += 1

    search(0, None, 0.0)
    return best["list"]


def _allowed(world: World, candidates: Sequence[int]) -> np.ndarray:
    """The candidates the hard rules let a policy show: no objectionable items."""
    candidates = np.asarray(candidates, dtype=np.int64)
    return candidates[~world.item_objectionable[candidates]]


def random_policy(world: World, user: int, candidates: Sequence[int], k: int, t: float) -> list:
    """Candidates in a uniformly random order (world.policy_rng), under the rules."""
    allowed = _allowed(world, candidates)
    shuffled = allowed[world.policy_rng.permutation(len(allowed))]
    return constrained_list(shuffled.tolist(), world.item_author[shuffled].tolist(), k)


def popularity_policy(world: World, user: int, candidates: Sequence[int], k: int, t: float) -> list:
    """The candidates with the most observed positive engagements, under the rules;
    ties go to the newer item (fresh content is not starved forever)."""
    allowed = _allowed(world, candidates)
    counts = world.engagement_counts[allowed]
    # lexsort: last key is primary; newer (larger created) first among equal counts.
    ranked = allowed[np.lexsort((-world.item_created[allowed], -counts))]
    return constrained_list(ranked.tolist(), world.item_author[ranked].tolist(), k)


def oracle_policy(world: World, user: int, candidates: Sequence[int], k: int, t: float) -> list:
    """The list with the highest TRUE expected value for ``user`` at ``t``, under the rules.

    Position bias multiplies every head of an item by the same factor, so an
    item's value at position p is its value at the top times the attention at
    p: :func:`best_list` finds the best list exactly.
    """
    allowed = _allowed(world, candidates)
    if not len(allowed):
        return []
    probs = world.probability_matrix(user, allowed, np.zeros(len(allowed)), t)
    values = expected_values(probs, world.weights)
    slots = attention(np.arange(k), world.config.position_decay)
    picked = best_list(values, world.item_author[allowed].tolist(), k, slots)
    return allowed[picked].tolist()


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
    if not len(items):
        return 0.0, 0.0
    probs = world.probability_matrix(user, list(items), np.arange(len(items)), t)
    positive = [ENGAGEMENT_HEADS.index(h) for h in POSITIVE_HEADS]
    return float(expected_values(probs, world.weights).sum()), float(probs[:, positive].sum())

"""Reference policies keep the system's hard rules; the oracle's list is the best under them."""
from __future__ import annotations

import itertools
import random
import time
from collections import Counter

import numpy as np
import pytest

from models.policies import (best_list, can_follow, constrained_list, longest_list, oracle_policy,
                             popularity_policy, random_policy, served_value)
from models.world import World, WorldConfig, attention

POLICIES = {"random": random_policy, "popularity": popularity_policy, "oracle": oracle_policy}


def keeps_author_rule(authors) -> bool:
    return all(a != b for a, b in zip(authors, authors[1:]))


def all_lists(n_items: int, authors, size: int):
    """Every ordered list of ``size`` distinct items with no two of one author in a row."""
    for perm in itertools.permutations(range(n_items), size):
        if keeps_author_rule([authors[j] for j in perm]):
            yield perm


def brute_longest(authors, k: int) -> int:
    return max((n for n in range(min(k, len(authors)) + 1)
                if n == 0 or next(all_lists(len(authors), authors, n), None) is not None))


def random_instance(rng: random.Random, max_items=7, max_authors=4):
    n = rng.randint(1, max_items)
    authors = [rng.randrange(rng.randint(1, max_authors)) for _ in range(n)]
    # Ties and negative values on purpose: the value model has negative heads.
    values = [rng.choice([rng.uniform(-1, 3), 1.0]) for _ in range(n)]
    return values, authors


def test_longest_list_and_can_follow_match_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        _, authors = random_instance(rng)
        k = rng.randint(1, 6)
        assert longest_list(Counter(authors), k) == brute_longest(authors, k), (authors, k)
    # can_follow: after an item by `last`, are `slots` more possible? Check by prepending it.
    for _ in range(300):
        _, authors = random_instance(rng, max_items=6)
        last, slots = rng.randrange(4), rng.randint(0, 5)
        counts = Counter(authors)
        with_last = [last] + authors
        expect = any(seq[0] == 0 for seq in all_lists(len(with_last), with_last, slots + 1))
        assert can_follow(counts, last, slots) == expect, (authors, last, slots)


def test_constrained_list_is_full_keeps_the_rule_and_follows_preference():
    rng = random.Random(1)
    for _ in range(500):
        _, authors = random_instance(rng, max_items=9)
        k = rng.randint(1, 7)
        items = [f"i{j}" for j in range(len(authors))]
        out = constrained_list(items, authors, k)
        by_item = dict(zip(items, authors))
        assert len(out) == len(set(out)) == brute_longest(authors, k)
        assert keeps_author_rule([by_item[i] for i in out])
    # Nothing binds: the list is the preference order itself.
    assert constrained_list(["x", "y", "z"], ["a", "b", "c"], 2) == ["x", "y"]
    # The rule binds: the next author's item waits one slot.
    assert constrained_list(["x", "y", "z"], ["a", "a", "b"], 3) == ["x", "z", "y"]


def test_best_list_is_the_brute_force_optimum():
    rng = random.Random(2)
    checked = 0
    for _ in range(400):
        values, authors = random_instance(rng)
        k = rng.randint(1, 5)
        weights = attention(np.arange(k), rng.choice([0.3, 0.7, 1.5]))
        size = longest_list(Counter(authors), k)
        got = best_list(values, authors, k, weights)
        assert len(got) == len(set(got)) == size
        assert keeps_author_rule([authors[j] for j in got])
        best = max((sum(w * values[j] for w, j in zip(weights, perm))
                    for perm in all_lists(len(values), authors, size)), default=0.0)
        assert sum(w * values[j] for w, j in zip(weights, got)) == pytest.approx(best, abs=1e-9)
        checked += size > 1
    assert checked > 200


def test_best_list_optimal_when_authors_have_many_items():
    """Many items per author: the pool's cut (each author's best ceil(n/2), then the
    top n + 2 ceil(n/2)) must never drop an item an optimal list needs."""
    rng = random.Random(3)
    for trial in range(16):
        n = 12
        # Few authors with a dominant one (the per-author cut binds), or many (the top cut binds).
        authors = [rng.randrange(3 if trial % 2 else 7) for _ in range(n)]
        values = [rng.uniform(0, 1) * (3 if authors[j] == 0 else 1) for j in range(n)]
        k = 4
        weights = attention(np.arange(k), 0.7)
        size = longest_list(Counter(authors), k)
        got = best_list(values, authors, k, weights)
        best = max(sum(w * values[j] for w, j in zip(weights, perm))
                   for perm in all_lists(n, authors, size))
        assert sum(w * values[j] for w, j in zip(weights, got)) == pytest.approx(best, abs=1e-9)


def test_greedy_by_value_is_not_optimal_but_best_list_is():
    values, authors = [10.0, 9.0, 8.9, 0.0], ["A", "B", "B", "C"]
    weights = attention(np.arange(3), 0.7)
    greedy = constrained_list(range(4), authors, 3)
    exact = best_list(values, authors, 3, weights)
    worth = lambda lst: sum(w * values[j] for w, j in zip(weights, lst))  # noqa: E731
    assert greedy == [0, 1, 3]          # A1, B1, then only C is allowed next
    assert exact == [1, 0, 2]           # B1, A1, B2
    assert worth(exact) > worth(greedy) + 3


def played_world(seed=4) -> World:
    """A world with some history, so popularity has counts to go on."""
    w = World(WorldConfig(n_users=40, n_authors=10, items_per_author=12, objectionable_share=0.2,
                          seed=seed))
    for u in range(40):
        w.events_for(u, w.live_items()[:10].tolist(), f"warm{u}", 0.0)
    return w


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_keeps_the_hard_rules(name):
    w = played_world()
    assert w.item_objectionable.sum() > 10
    for u in range(40):
        cands = w.candidates(u)
        out = POLICIES[name](w, u, cands, 10, 30.0)
        assert len(out) == len(set(out)) == 10
        assert set(out) <= set(cands.tolist())
        assert not w.item_objectionable[out].any()
        assert keeps_author_rule(w.item_author[out].tolist())


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policies_serve_fewer_only_when_the_rules_leave_no_full_list(name):
    w = World(WorldConfig(n_users=2, n_authors=3, items_per_author=4, objectionable_share=0.0))
    one_author = np.flatnonzero(w.item_author == 0)
    assert len(POLICIES[name](w, 0, one_author, 3, 0.0)) == 1
    two_authors = np.r_[one_author, np.flatnonzero(w.item_author == 1)[:1]]
    out = POLICIES[name](w, 0, two_authors, 5, 0.0)
    assert len(out) == 3 and w.item_author[out].tolist() == [0, 1, 0]


def test_oracle_beats_every_other_list_that_keeps_the_rules():
    w = played_world(seed=5)
    for u in range(20):
        cands = w.candidates(u)
        oracle = served_value(w, u, oracle_policy(w, u, cands, 10, 30.0), 30.0)[0]
        for name in ("random", "popularity"):
            assert oracle >= served_value(w, u, POLICIES[name](w, u, cands, 10, 30.0), 30.0)[0]
        # ... and the greedy list by true value, which keeps the same rules.
        allowed = cands[~w.item_objectionable[cands]]
        tops = w.probability_matrix(u, allowed, np.zeros(len(allowed)), 30.0)
        from models.world import expected_values
        by_value = allowed[np.argsort(-expected_values(tops, w.weights), kind="stable")]
        greedy = constrained_list(by_value.tolist(), w.item_author[by_value].tolist(), 10)
        assert oracle >= served_value(w, u, greedy, 30.0)[0] - 1e-12


def test_oracle_is_fast_enough_for_every_request_of_the_loop():
    """The simulator asks the oracle once per request on the loop's only thread."""
    w = World(WorldConfig(seed=0))
    w.step(600.0)
    started = time.perf_counter()
    for u in range(50):
        oracle_policy(w, u, w.candidates(u, 600.0), 10, 600.0)
    assert (time.perf_counter() - started) / 50 < 0.02

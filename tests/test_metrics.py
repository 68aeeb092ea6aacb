"""streams/metrics.py's percentile: the one the worker's figures and the benches share."""
from __future__ import annotations

import random

import pytest

from streams.metrics import percentile


def by_definition(values, q):
    """The smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    return next(v for v in ordered if sum(x <= v for x in ordered) * 100 >= q * len(ordered))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 101])
def test_percentile_is_the_nearest_rank(n):
    rng = random.Random(n)
    values = [rng.random() for _ in range(n)]
    for q in (0, 1, 7, 25, 50, 57, 90, 95, 99, 100):
        assert percentile(values, q) == by_definition(values, q), (n, q)


def test_the_benches_summarise_with_the_same_percentile():
    from bench.common import percentile as bench_percentile, summary
    assert bench_percentile is percentile
    values = list(range(1, 201))
    assert (summary(values)["p50"], summary(values)["p99"]) == (100, 198)
    assert summary([]) == {"n": 0} and percentile([], 99) is None

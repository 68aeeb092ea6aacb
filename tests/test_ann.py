"""The ANN index store against real hnswlib, on small seeded random data."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from stores.ann import AnnConfig, AnnIndex


def unit(rng, n, dim=32):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def names(n, prefix="i"):
    return [f"{prefix}{j}" for j in range(n)]


def top(results):
    return [item for item, _ in results]


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.fixture
def filled(rng):
    index = AnnIndex(32, max_elements=64)
    vectors = unit(rng, 500)
    index.upsert(names(500), vectors)
    return index, vectors


# -- quality ---------------------------------------------------------------

def test_recall_against_brute_force(rng):
    vectors, queries = unit(rng, 2000), unit(rng, 200)
    index = AnnIndex(32)
    index.upsert(names(2000), vectors)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    hits = 0
    for q, truth in zip(queries, exact):
        got = {int(item[1:]) for item in top(index.query(q, 10))}
        hits += len(got & set(truth.tolist()))
    assert hits / (200 * 10) >= 0.95


@pytest.mark.parametrize("space", ["ip", "cosine", "l2"])
def test_scores_are_similarities_nearest_first(rng, space):
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    index = AnnIndex(8, space=space)
    index.upsert(names(50), vectors)
    q = rng.normal(size=8).astype(np.float32)
    results = index.query(q, 5)
    if space == "ip":
        expected = vectors @ q
    elif space == "cosine":
        expected = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))
    else:
        expected = -((vectors - q) ** 2).sum(axis=1)
    for item, score in results:
        assert score == pytest.approx(float(expected[int(item[1:])]), abs=1e-4)
    scores = [score for _, score in results]
    assert scores == sorted(scores, reverse=True)
    assert top(results)[0] == f"i{int(np.argmax(expected))}"


# -- upsert, delete, growth ------------------------------------------------

def test_upsert_replaces_vector_and_keeps_label(filled, rng):
    index, vectors = filled
    label = index.label("i42")
    fresh = unit(rng, 1)
    index.upsert(["i42"], fresh)
    assert index.label("i42") == label
    assert len(index) == 500
    assert top(index.query(fresh[0], 1)) == ["i42"]
    assert np.allclose(index.vector("i42"), fresh[0])
    index.upsert(["new"], unit(rng, 1))
    assert index.label("new") == 500  # next in sequence, no reuse


def test_delete_hides_and_upsert_revives(filled):
    index, vectors = filled
    index.delete("i7")
    index.delete("i7")  # idempotent
    assert "i7" not in index and len(index) == 499
    assert index.vector("i7") is None
    assert "i7" not in top(index.query(vectors[7], 20))
    assert "i7" not in index.ids()
    with pytest.raises(KeyError, match="deleted"):
        index.query_item("i7", 3)
    label = index.label("i7")
    index.upsert(["i7"], vectors[7:8])
    assert "i7" in index and index.label("i7") == label
    assert top(index.query(vectors[7], 1)) == ["i7"]


def test_grows_beyond_initial_capacity(rng):
    index = AnnIndex(32, max_elements=16)
    vectors = unit(rng, 1000)
    for start in range(0, 1000, 100):
        index.upsert(names(1000)[start:start + 100], vectors[start:start + 100])
    assert len(index) == 1000 and index.capacity == 1024
    assert all(top(index.query(vectors[j], 1)) == [f"i{j}"] for j in range(0, 1000, 97))


def test_k_beyond_live_count_and_empty_index(rng):
    empty = AnnIndex(32)
    assert empty.query(unit(rng, 1)[0], 5) == []
    index = AnnIndex(32)
    vectors = unit(rng, 6)
    index.upsert(names(6), vectors)
    index.delete("i0")
    assert sorted(top(index.query(vectors[0], 100))) == names(6)[1:]
    assert sorted(top(index.query_item("i1", 100))) == ["i2", "i3", "i4", "i5"]
    assert index.query(vectors[0], 0) == []


# -- exclusions ------------------------------------------------------------

def test_exclude_few_and_many(filled):
    index, vectors = filled
    plain = top(index.query(vectors[3], 10))
    few = top(index.query(vectors[3], 10, exclude=plain[:3] + ["unknown"]))
    assert not set(few) & set(plain[:3]) and len(few) == 10
    assert few[:7] == plain[3:]
    many = set(names(300))  # more exclusions than k: the filter path
    result = top(index.query(vectors[3], 10, exclude=many))
    assert len(result) == 10 and not set(result) & many
    assert "i3" not in top(index.query_item("i3", 10))
    assert "i9" not in top(index.query_item("i3", 10, exclude=["i9"]))
    with pytest.raises(ValueError, match="collection"):
        index.query(vectors[3], 10, exclude="i9")


# -- validation ------------------------------------------------------------

def test_errors(filled):
    index, vectors = filled
    with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
        index.upsert(["x"], np.zeros((1, 31), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        index.upsert(["x", "y"], np.array([[0.0] * 32, [np.nan] * 32]))
    with pytest.raises(ValueError, match="NaN or inf"):
        index.upsert(["x"], np.full((1, 32), 1e300))  # inf once cast to float32
    with pytest.raises(ValueError, match="2 item ids but 1 vectors"):
        index.upsert(["x", "y"], vectors[:1])
    with pytest.raises(ValueError, match="must be str"):
        index.upsert([1], vectors[:1])
    with pytest.raises(ValueError, match="repeat"):
        index.upsert(["x", "x"], vectors[:2])
    with pytest.raises(ValueError, match="dtype"):
        index.upsert(["x"], np.zeros((1, 32), dtype=object))
    with pytest.raises(ValueError, match="shape"):
        index.query(np.zeros(3, dtype=np.float32), 5)
    with pytest.raises(ValueError, match="NaN"):
        index.query(np.full(32, np.inf, dtype=np.float32), 5)
    with pytest.raises(ValueError, match="k must be"):
        index.query(vectors[0], -1)
    with pytest.raises(KeyError, match="unknown item id 'nope'"):
        index.delete("nope")
    with pytest.raises(KeyError, match="unknown item id"):
        index.query_item("nope", 3)
    assert index.vector("nope") is None and "x" not in index
    assert len(index) == 500  # nothing above changed it


def test_config_is_checked():
    assert AnnIndex(16, M=8, ef_construction=50).config == AnnConfig(16, M=8, ef_construction=50)
    with pytest.raises(ValueError, match="space"):
        AnnIndex(16, space="hamming")
    with pytest.raises(ValueError, match="ef must be a positive int"):
        AnnConfig(16, ef=0)


# -- concurrency -----------------------------------------------------------

def test_queries_while_upserting_and_resizing(rng):
    index = AnnIndex(32, max_elements=32, ef_construction=100)
    vectors, queries = unit(rng, 5000), unit(rng, 64)
    index.upsert(["dead0", "dead1"], unit(rng, 2))
    index.delete("dead0")
    index.delete("dead1")
    done = threading.Event()
    errors, counts = [], [0] * 4

    def write():
        try:
            for start in range(0, 5000, 100):
                index.upsert(names(5000)[start:start + 100], vectors[start:start + 100])
                if start % 1000 == 0:
                    index.delete(f"i{start}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    def read(n):
        try:
            while not done.is_set() or counts[n] < 50:
                k = 10
                results = (index.query(queries[counts[n] % 64], k, exclude=["i1"])
                           if counts[n] % 3 else
                           (index.query_item("i1", k) if "i1" in index else []))
                assert len(results) <= k
                items = top(results)
                assert len(set(items)) == len(items)
                assert not {"dead0", "dead1", "i1"} & set(items)
                assert all(isinstance(item, str) and np.isfinite(score) for item, score in results)
                scores = [score for _, score in results]
                assert scores == sorted(scores, reverse=True)
                counts[n] += 1
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(n,)) for n in range(4)]
    threads.append(threading.Thread(target=write))
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:3]
    assert time.monotonic() - started < 60
    assert len(index) == 5000 - 5 and index.capacity == 8192
    assert min(counts) >= 50

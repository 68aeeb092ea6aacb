"""SharedItemView without Kafka: messages applied by hand, as the reader thread would."""
from __future__ import annotations

import numpy as np
import orjson

from models.features import Example
from schemas.topics import CONFIG, ITEM_PROFILES, MODEL_REGISTRY, MODEL_WEIGHTS, PREGEN
from stores.model_store import manifest_for, split
from stores.shared_view import SharedItemView


def view_with_profiles(n=5) -> SharedItemView:
    v = SharedItemView("unused:0")
    for i in range(n):
        v.apply(ITEM_PROFILES, f"i{i}".encode(), orjson.dumps(
            {"author": f"a{i % 2}", "q": {"pos": i}, "first": 100.0, "nbrs": [["i0", 1.0, "a0"]]}))
    return v


def test_profiles_feed_neighbours_quality_and_authors():
    v = view_with_profiles()
    assert v.neighbours("i3") == [("i0", 1.0, "a0")]
    assert v.quality("i4") == {"pos": 4} and v.author_of("i1") == "a1"
    v.apply(ITEM_PROFILES, b"i4", None)
    assert v.quality("i4") is None


def test_bad_messages_are_counted_not_fatal():
    v = SharedItemView("unused:0")
    v.apply(CONFIG, b"explore", b"{not json")
    v.apply(CONFIG, b"explore", orjson.dumps({"sources": {"nope": {}}}))
    assert v.bad_messages == 2
    assert v.funnel_config("explore").sources  # still the default


def pregen_part(version, name, key, value):
    return f"{version}/{name}/{key}".encode(), orjson.dumps({**value, "version": version})


def test_pregen_batch_swaps_only_when_complete():
    v = SharedItemView("unused:0")
    k, val = pregen_part("v1", "popular", "explore", {"items": [["x", 1.0, None]]})
    v.apply(PREGEN, k, val)
    assert v.pregen("popular", "explore") == [], "a batch without its manifest is not live"
    v.apply(PREGEN, b"v1/manifest", orjson.dumps({"version": "v1", "parts": 2, "meta": {}}))
    assert v.pregen_batch is None, "one part still missing"
    k2, val2 = pregen_part("v1", "embeddings", "0",
                           {"ids": ["x", "y"], "vectors": [[1.0, 0.0], [0.9, 0.1]]})
    v.apply(PREGEN, k2, val2)
    assert v.pregen("popular", "explore") == [("x", 1.0, None)]
    assert [i for i, _ in v.similar("x", 5)] == ["y"]
    # An older batch arriving late never replaces the live one.
    k0, val0 = pregen_part("v0", "popular", "explore", {"items": [["old", 9.0, None]]})
    v.apply(PREGEN, k0, val0)
    v.apply(PREGEN, b"v0/manifest", orjson.dumps({"version": "v0", "parts": 1, "meta": {}}))
    assert v.pregen_batch.version == "v1"


class FakeTrainer:
    """Item vectors from a table, so the refresh logic can be checked exactly."""

    def __init__(self, table):
        self.table = table

    def item_vectors(self, examples: list[Example]) -> np.ndarray:
        return np.stack([self.table[e.item_id] for e in examples]).astype(np.float32)


class FakeScorer:
    def __init__(self, table, version):
        self.trainer, self.model, self.version = FakeTrainer(table), "ranker", version


def test_tower_index_refreshes_only_changed_items():
    v = view_with_profiles(3)
    table = {"i0": np.array([1.0, 0.0]), "i1": np.array([0.0, 1.0]), "i2": np.array([0.7, 0.7])}
    assert v.refresh_tower_index(FakeScorer(table, "v1")) == 3
    moved = dict(table, i1=np.array([0.2, 1.0]))
    assert v.refresh_tower_index(FakeScorer(moved, "v2")) == 1
    assert v.embedding("i1") is None, "the tower space is only used while a model is live"
    v.scorer = FakeScorer(moved, "v2")
    new = np.array([0.2, 1.0]) / np.linalg.norm([0.2, 1.0])  # the cosine index stores unit vectors
    assert np.allclose(v.embedding("i1"), new, atol=1e-6)
    # The tower space is what the embedding sources search once a model is live.
    assert v.nearest(np.array([1.0, 0.05], dtype=np.float32), 1)[0][0] == "i0"


def test_weights_become_a_live_model_only_with_registry_and_manifest(monkeypatch):
    import stores.shared_view as sv
    monkeypatch.setattr(sv, "trainer_from_bytes", lambda blob: ("trainer", blob))
    monkeypatch.setattr(SharedItemView, "refresh_tower_index", lambda self, scorer: 0)
    v = SharedItemView("unused:0")
    blob = b"weights" * 100
    parts = split(blob, chunk_bytes=300)
    for n, part in enumerate(parts):
        v.apply(MODEL_WEIGHTS, f"ranker/v1/part-{n:04d}".encode(), part)
    assert not v.models
    v.apply(MODEL_WEIGHTS, b"ranker/v1/manifest", orjson.dumps(manifest_for(blob, len(parts))))
    assert v.models[("ranker", "v1")] == ("trainer", blob)
    assert v.scorer is None, "weights alone do not make a version live"
    record = {"model": "ranker", "version": "v1", "state": "live"}
    v.apply(MODEL_REGISTRY, b"ranker/v1", orjson.dumps(record))
    assert v.scorer is not None and v.scorer.version == "v1"
    v.apply(MODEL_REGISTRY, b"ranker/v1", orjson.dumps({**record, "state": "rolled_back"}))
    assert v.scorer is None


def test_corrupt_weights_are_refused():
    v = SharedItemView("unused:0")
    blob = b"abc" * 10
    v.apply(MODEL_WEIGHTS, b"ranker/v1/part-0000", b"tampered")
    v.apply(MODEL_WEIGHTS, b"ranker/v1/manifest", orjson.dumps(manifest_for(blob, 1)))
    assert v.bad_messages == 1 and not v.models


def test_a_surface_model_made_live_later_leaves_the_default_scorer(monkeypatch):
    # The trainer, the tower index and live_model follow the default model: a reels
    # model promoted after the trainer's version must not take them over.
    import stores.shared_view as sv
    monkeypatch.setattr(sv, "trainer_from_bytes", lambda blob: ("trainer", blob))
    monkeypatch.setattr(SharedItemView, "refresh_tower_index", lambda self, scorer: 0)
    v = SharedItemView("unused:0")
    for model, version in (("ranker", "v1"), ("reels_ranker", "r1")):
        blob = f"{model}-{version}".encode() * 50
        parts = split(blob, chunk_bytes=300)
        for n, part in enumerate(parts):
            v.apply(MODEL_WEIGHTS, f"{model}/{version}/part-{n:04d}".encode(), part)
        v.apply(MODEL_WEIGHTS, f"{model}/{version}/manifest".encode(),
                orjson.dumps(manifest_for(blob, len(parts))))
    v.apply(MODEL_REGISTRY, b"ranker/v1", orjson.dumps(
        {"model": "ranker", "version": "v1", "state": "live", "history": [[1.0, "live"]]}))
    v.apply(MODEL_REGISTRY, b"reels_ranker/r1", orjson.dumps(
        {"model": "reels_ranker", "version": "r1", "state": "live", "surface": "reels",
         "history": [[2.0, "live"]]}))
    assert (v.scorer.model, v.scorer.version) == ("ranker", "v1")
    assert v.launch.production == ("ranker", "v1")


def test_author_items_are_merged_once_per_change():
    from schemas.topics import AUTHOR_ITEMS
    v = SharedItemView("unused:0")

    def snapshot(part, items, ts):
        v.apply(AUTHOR_ITEMS, f"a1/{part}".encode(),
                orjson.dumps({"ts": ts, "half_life": 3600.0, "items": items}))
    snapshot(0, [["x", 2.0, "a1"]], 100.0)
    snapshot(1, [["y", 1.0, "a1"]], 100.0)
    first = v.author_items("a1")
    assert [i for i, _, _ in first] == ["x", "y"]
    assert v.author_items("a1") is first, "unchanged snapshots are not merged again"
    snapshot(1, [["y", 5.0, "a1"]], 100.0)
    assert [i for i, _, _ in v.author_items("a1")] == ["y", "x"], "a new snapshot is seen"
    v.apply(AUTHOR_ITEMS, b"a1/0", None)
    v.apply(AUTHOR_ITEMS, b"a1/1", None)
    assert v.author_items("a1") == [] and v.author_items("nobody") == []

"""Weight deltas: exact round trips, only changed rows sent, a missing or wrong base
refused, the publisher's choice of full snapshot or delta, and retention that keeps
every base a kept delta needs (models/weight_delta.py, stores/model_store.py)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from models import weight_delta
from models.features import Example
from models.mtml import RankerConfig
from models.training import Trainer
from models.two_tower import TowerConfig
from stores import model_store

SMALL = dict(hash_size=2 ** 10, author_size=2 ** 6)


def batch(rng: random.Random, n: int = 32, users: int = 40, items: int = 60) -> list[Example]:
    out = []
    for _ in range(n):
        u, i = rng.randrange(users), rng.randrange(items)
        like = rng.random() < 0.3
        out.append(Example(f"u{u}", f"i{i}", f"a{i % 7}", "explore", 1.0,
                           labels={"click": int(like or rng.random() < 0.2), "like": int(like)},
                           user_recent=[f"i{rng.randrange(items)}" for _ in range(3)],
                           request_id=f"r{u}"))
    return out


@pytest.fixture
def trainer():
    return Trainer(TowerConfig(**SMALL), RankerConfig(**SMALL))


# -- the pure functions -----------------------------------------------------------

def test_round_trip_is_bit_exact_and_sends_only_changed_rows():
    base = {"table": torch.randn(500, 8).half(), "dense.weight": torch.randn(4, 8).half(),
            "bias": torch.randn(4)}
    new = {k: v.clone() for k, v in base.items()}
    new["table"][[3, 77, 499]] += 0.01
    new["table"][10, 2] = -new["table"][10, 2]  # one element of one row
    new["dense.weight"] += 0.5                  # every row: cheaper whole
    new["bias"] += 1.0
    delta = weight_delta.diff(base, new)
    assert delta["rows"]["table"]["index"].tolist() == [3, 10, 77, 499]
    assert sorted(delta["whole"]) == ["bias", "dense.weight"]
    rebuilt = weight_delta.apply(base, delta)
    # Bit for bit (the fingerprint hashes bytes, so -0.0 and 0.0 differ), dtype kept.
    for name in new:
        assert rebuilt[name].dtype == new[name].dtype
        assert weight_delta.fingerprint({name: rebuilt[name]}) == \
            weight_delta.fingerprint({name: new[name]})
    # The base is left as it was.
    assert not torch.equal(base["table"][3], new["table"][3])
    sent = weight_delta.sent_bytes(delta)
    assert sent["rows_sent"] == 4 and sent["rows"] == 4 * 4 + 4 * 8 * 2


def test_an_unchanged_table_sends_no_rows():
    base = {"table": torch.randn(100, 4).half()}
    delta = weight_delta.diff(base, {"table": base["table"].clone()})
    assert len(delta["rows"]["table"]["index"]) == 0 and not delta["whole"]
    assert torch.equal(weight_delta.apply(base, delta)["table"], base["table"])


def test_a_missing_or_wrong_base_is_refused():
    base = {"table": torch.zeros(50, 2).half()}
    new = {"table": base["table"].clone()}
    new["table"][1] = 1.0
    delta = weight_delta.diff(base, new)
    with pytest.raises(weight_delta.MissingBase, match="needs the version it was made on"):
        weight_delta.apply(None, delta)
    other = {"table": torch.ones(50, 2).half()}
    with pytest.raises(weight_delta.BaseMismatch, match="made on another base"):
        weight_delta.apply(other, delta)


def test_a_tampered_delta_is_refused():
    base = {"table": torch.zeros(50, 2).half()}
    new = {"table": base["table"].clone()}
    new["table"][1] = 1.0
    delta = weight_delta.diff(base, new)
    delta["rows"]["table"]["rows"][0, 0] = 2.0
    with pytest.raises(ValueError, match="do not match the delta's fingerprint"):
        weight_delta.apply(base, delta)


# -- trained models: the publisher's encoding and the readers' rebuild ----------------

def test_a_trained_model_rebuilds_exactly_from_a_delta(trainer):
    rng = random.Random(1)
    for _ in range(5):
        trainer.fit(batch(rng))
    deltas = model_store.WeightDeltas(full_every=10)
    first = model_store.serving_bytes(trainer)
    payload, fields = deltas.encode("v1", first, {})
    assert payload == first and fields["kind"] == "full"
    for _ in range(3):
        trainer.fit(batch(rng))
    second = model_store.serving_bytes(trainer)
    payload, fields = deltas.encode("v2", second, {"v1": {}})
    assert fields == {"kind": "delta", "base": "v1", "state_sha256": fields["state_sha256"]}
    # A small model's dense layers are most of it; bench/weights.py measures the default.
    assert len(payload) < len(second) / 3
    # What a reader does: its base is the model it loaded from v1's full snapshot.
    reader_base = model_store.serving_state(model_store.trainer_from_bytes(first))
    manifest = {**model_store.manifest_for(payload, 1), **fields}
    state = model_store.rebuild(reader_base, payload, manifest)
    full = model_store._load(second)
    assert weight_delta.fingerprint(model_store._tensors(state)) == \
        weight_delta.fingerprint(model_store._tensors(full))
    assert {k: v for k, v in state.items() if k not in model_store.NETS} == \
        {k: v for k, v in full.items() if k not in model_store.NETS}
    examples = batch(random.Random(9), n=20)
    from_delta = model_store.trainer_from_state(state).predict(examples)
    from_full = model_store.trainer_from_bytes(second).predict(examples)
    assert np.array_equal(from_delta, from_full)
    # Only rows of ids the three batches touched were sent.
    body = model_store._load(payload)
    assert 0 < weight_delta.sent_bytes(body["delta"])["rows_sent"] < 3 * 32 * 20
    assert body["delta"]["rows"]["tower.user_id.weight"]["index"].numel() <= 40


def test_a_rebuild_without_its_base_or_against_its_manifest_is_refused(trainer):
    deltas = model_store.WeightDeltas()
    first = model_store.serving_bytes(trainer)
    deltas.encode("v1", first, {})
    trainer.fit(batch(random.Random(2)))
    payload, fields = deltas.encode("v2", model_store.serving_bytes(trainer), {"v1": {}})
    manifest = {**model_store.manifest_for(payload, 1), **fields}
    with pytest.raises(weight_delta.MissingBase, match="a delta on version v1, whose weights "
                                                       "are not here"):
        model_store.rebuild(None, payload, manifest)
    base = model_store._load(first)
    with pytest.raises(ValueError, match="not a weight delta on version v0"):
        model_store.rebuild(base, payload, {**manifest, "base": "v0"})
    with pytest.raises(ValueError, match="do not match their manifest"):
        model_store.rebuild(base, payload, {**manifest, "state_sha256": "0" * 64})


def test_full_snapshots_first_every_nth_and_when_the_base_is_gone(trainer):
    rng = random.Random(3)
    deltas = model_store.WeightDeltas(full_every=3)
    published: dict = {}
    kinds = []
    for n in range(1, 9):
        trainer.fit(batch(rng))
        version = f"v{n}"
        if version == "v7":
            published.pop("v4")  # the base is tombstoned behind the publisher's back
        _, fields = deltas.encode(version, model_store.serving_bytes(trainer), published)
        published[version] = fields
        kinds.append(fields.get("base") or "full")
    assert kinds == ["full", "v1", "v1", "full", "v4", "v4", "full", "v7"]
    with pytest.raises(ValueError, match="at least 1"):
        model_store.WeightDeltas(full_every=0)
    only_full = model_store.WeightDeltas(full_every=1)
    assert [only_full.encode(v, model_store.serving_bytes(trainer), {"v1": {}})[1]["kind"]
            for v in ("v1", "v2")] == ["full", "full"]


def test_a_base_published_with_other_weights_is_not_used(trainer):
    deltas = model_store.WeightDeltas()
    _, first = deltas.encode("v1", model_store.serving_bytes(trainer), {})
    trainer.fit(batch(random.Random(6)))
    blob = model_store.serving_bytes(trainer)
    # Someone else's v1 is in the topic now: a delta on ours would not rebuild there.
    _, fields = deltas.encode("v2", blob, {"v1": {"state_sha256": "0" * 64}})
    assert fields["kind"] == "full"
    _, fields = deltas.encode("v3", blob, {"v2": fields})
    assert fields == {"kind": "delta", "base": "v2", "state_sha256": fields["state_sha256"]}
    assert first["kind"] == "full"


def test_a_delta_no_smaller_than_the_snapshot_goes_out_full(trainer):
    deltas = model_store.WeightDeltas()
    deltas.encode("v1", model_store.serving_bytes(trainer), {})
    other = Trainer(TowerConfig(**SMALL), RankerConfig(**SMALL), seed=5)  # every row differs
    blob = model_store.serving_bytes(other)
    payload, fields = deltas.encode("v2", blob, {"v1": {}})
    assert fields["kind"] == "full" and payload == blob


# -- retention ----------------------------------------------------------------------

def manifests(*spec: str) -> dict:
    """``"v3<v1"``: v3 is a delta on v1; ``"v1"``: a full snapshot."""
    out = {}
    for s in spec:
        version, _, base = s.partition("<")
        out[version] = {"kind": "delta", "base": base, "parts": 1} if base else \
            {"kind": "full", "parts": 1}
    return out


def test_retention_never_drops_a_base_a_kept_delta_needs():
    m = manifests("v01", "v02<v01", "v03<v01", "v04<v01", "v05<v01", "v06")
    # The newest three are v04, v05 (deltas on v01) and v06: v01 stays.
    assert model_store.weights_to_drop(m, 3, set()) == ["v03", "v02"]
    m = manifests("v01", "v02<v01", "v03", "v04<v03", "v05<v03", "v06<v03")
    assert model_store.weights_to_drop(m, 3, set()) == ["v02", "v01"]
    # A protected delta (the live version, the rollback target) keeps its own base.
    assert model_store.weights_to_drop(m, 3, {"v02"}) == []
    assert model_store.weights_to_drop(m, 3, {"v01"}) == ["v02"]
    # Protected names without weights change nothing; a delta whose base is already
    # gone is kept as it is (readers skip it) and nothing else is kept for it.
    m = manifests("v02<v01", "v03", "v04<v03")
    assert model_store.weights_to_drop(m, 1, {"v09"}) == ["v02"]
    assert model_store.weights_to_drop(m, 3, set()) == []


def test_retention_of_legacy_manifests_without_kind():
    m = {"v1": {"parts": 2}, "v2": {"parts": 2}, "v3": {"parts": 2}, "v4": {"parts": 2}}
    assert model_store.weights_to_drop(m, 3, set()) == ["v1"]
    assert model_store.weights_to_drop(m, 3, {"v1"}) == []


# -- the reading side: the shared view ------------------------------------------------

def feed(view, model: str, version: str, payload: bytes, fields: dict) -> None:
    import orjson

    from schemas.topics import MODEL_WEIGHTS
    parts = model_store.split(payload, chunk_bytes=200_000)
    for n, part in enumerate(parts):
        view.apply(MODEL_WEIGHTS, f"{model}/{version}/part-{n:04d}".encode(), part)
    view.apply(MODEL_WEIGHTS, f"{model}/{version}/manifest".encode(),
               orjson.dumps({**model_store.manifest_for(payload, len(parts)), **fields}))


def test_the_view_rebuilds_a_delta_on_its_base_and_skips_one_without(trainer, monkeypatch):
    from stores.shared_view import SharedItemView
    monkeypatch.setattr(SharedItemView, "refresh_tower_index", lambda self, scorer: 0)
    rng = random.Random(4)
    deltas = model_store.WeightDeltas()
    payloads = {}
    for version in ("v1", "v2"):
        trainer.fit(batch(rng))
        blob = model_store.serving_bytes(trainer)
        payloads[version] = (deltas.encode(version, blob, {"v1": {}}), blob)
    assert payloads["v2"][0][1]["kind"] == "delta"
    examples = batch(random.Random(8), n=16)
    expected = model_store.trainer_from_bytes(payloads["v2"][1]).predict(examples)

    view = SharedItemView("unused:0")
    for version in ("v1", "v2"):
        feed(view, "ranker", version, *payloads[version][0])
    assert np.array_equal(view.models[("ranker", "v2")].predict(examples), expected)
    assert view.missing_bases == 0 and view.bad_messages == 0

    late = SharedItemView("unused:0")  # v1 compacted away before this one started
    feed(late, "ranker", "v2", *payloads["v2"][0])
    assert ("ranker", "v2") not in late.models and late.missing_bases == 1
    assert late.bad_messages == 0

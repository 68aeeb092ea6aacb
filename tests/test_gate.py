"""The go-live gate (models/gate.py), the registry rules around it (stores/model_store.py)
and which version serving picks (stores/shared_view.py), without Kafka."""
from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from models.features import HEADS
from models.gate import (GateRules, HeadTotals, ProgressiveValidation, decide, labels_and_mask)
from models.metrics import calibration, normalized_entropy
from schemas.topics import MODEL_REGISTRY, MODEL_WEIGHTS
from stores.model_store import (live_records, live_since, manifest_for, previous_live,
                                protected_versions, split)

CLICK, LIKE = HEADS.index("click"), HEADS.index("like")


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def world(n=3000, seed=0):
    """Labelled rows with a feature x: click ~ 20%, like ~ 6%, other heads unlabelled."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    true = np.zeros((n, len(HEADS)))
    true[:, CLICK], true[:, LIKE] = sigmoid(-1.8 + 1.5 * x), sigmoid(-3.2 + 1.2 * x)
    labels = (rng.random(true.shape) < true).astype(float)
    mask = np.zeros(true.shape, dtype=bool)
    mask[:, [CLICK, LIKE]] = True
    return x, true, labels, mask


def window(labels, mask, candidate, live=None, live_version="v-live", batches=5):
    w = ProgressiveValidation(live_version if live is not None else None)
    for rows in np.array_split(np.arange(len(labels)), batches):
        w.add(labels[rows], mask[rows], candidate[rows], None if live is None else live[rows],
              offsets={"0": (int(rows[0]), int(rows[-1]))})
    return w


def calibrated_to(probs, labels, target):
    """``probs`` scaled so that click's and like's calibration on ``labels`` is ``target``."""
    out = probs.copy()
    for j in (CLICK, LIKE):
        out[:, j] *= target * labels[:, j].sum() / probs[:, j].sum()
    return out


def constant(p, n):
    return np.full((n, len(HEADS)), p)


def test_totals_agree_with_metrics_over_batches_and_masks():
    x, true, labels, mask = world(n=1000)
    probs = np.clip(true * 1.3, 0, 1)
    w = window(labels, mask, probs, batches=7)
    for j in (CLICK, LIKE):
        assert w.candidate.ne()[j] == pytest.approx(normalized_entropy(labels[:, j], probs[:, j]))
        assert w.candidate.calibration()[j] == pytest.approx(calibration(labels[:, j], probs[:, j]))
    # Heads without any known label have no NE and are not counted.
    assert w.candidate.n[HEADS.index("save")] == 0 and math.isnan(w.candidate.ne()[2])
    assert w.offsets == {"0": [0, 999]} and w.candidate.examples == 1000


def test_labels_and_mask_from_example_labels():
    labels, mask = labels_and_mask([{"click": 1, "like": 0}, {}])
    assert labels[0, CLICK] == 1 and mask[0, LIKE] and not mask[1].any()


def test_first_version_must_beat_the_base_rate():
    _, true, labels, mask = world()
    untrained = decide(window(labels, mask, constant(0.5, len(labels))).candidate, None)
    assert untrained.decided and not untrained.go_live and untrained.state == "registered"
    assert "does not beat the base rate" in untrained.reason
    assert untrained.evidence["heads"]["click"]["candidate"]["ne"] > 1
    learned = decide(window(labels, mask, true).candidate, None)
    assert learned.go_live and learned.state == "live", learned.reason
    assert learned.evidence["heads"]["click"]["candidate"]["ne"] < 1


def test_worse_candidate_is_rejected_better_one_accepted():
    x, true, labels, mask = world()
    blurred = true.copy()
    blurred[:, CLICK], blurred[:, LIKE] = sigmoid(-1.6 + 0.5 * x), sigmoid(-2.9 + 0.4 * x)
    worse = window(labels, mask, candidate=blurred, live=true).decide()
    assert worse.decided and not worse.go_live and "below the margin" in worse.reason
    ev = worse.evidence
    assert ev["candidate_ne"] > ev["live_ne"] and ev["live_version"] == "v-live"
    assert ev["heads"]["like"]["live"]["ne"] < ev["heads"]["like"]["candidate"]["ne"]
    assert ev["examples"] == len(labels) and ev["offsets"] == {"0": [0, len(labels) - 1]}
    better = window(labels, mask, candidate=true, live=blurred).decide()
    assert better.go_live, better.reason
    assert better.evidence["candidate_ne"] < better.evidence["live_ne"] - GateRules().min_ne_gain


def test_no_better_than_live_within_the_margin_is_rejected():
    _, true, labels, mask = world()
    same = window(labels, mask, candidate=true, live=true).decide()
    assert same.decided and not same.go_live and "gain 0.000 below the margin" in same.reason


def test_a_continuation_of_the_live_version_needs_only_to_be_no_worse():
    x, true, labels, mask = world()
    slightly_better = true.copy()
    slightly_better[:, CLICK] = sigmoid(-1.8 + 1.25 * x)  # a little off the truth
    live, candidate = slightly_better, true
    w = window(labels, mask, candidate=candidate, live=live)
    gain = w.decide().evidence["live_ne"] - w.decide().evidence["candidate_ne"]
    assert 0 < gain < 0.005, "the test needs a gain inside the usual margin"
    assert not w.decide().go_live
    continued = w.decide(descendant=True)
    assert continued.go_live and continued.evidence["descendant_of_live"]
    # Worse is worse, continuation or not.
    worse = window(labels, mask, candidate=live, live=candidate).decide(descendant=True)
    assert worse.decided and not worse.go_live and "for a continuation" in worse.reason


def test_worse_calibration_is_rejected_even_with_better_ne():
    x, true, labels, mask = world()
    blurred = true.copy()
    blurred[:, CLICK], blurred[:, LIKE] = sigmoid(-1.6 + 0.3 * x), sigmoid(-3.0 + 0.3 * x)
    over = np.clip(true * 1.25, 0, 1)
    d = window(labels, mask, candidate=over, live=blurred).decide()
    assert d.evidence["candidate_ne"] < d.evidence["live_ne"] - GateRules().min_ne_gain, \
        "the candidate's NE alone would win"
    assert not d.go_live and d.reason.startswith("click calibration 1.36 is further from 1")
    # Inside the band [1/1.1, 1.1] a small loss of calibration does not block a better NE.
    exact, slightly_high = calibrated_to(blurred, labels, 1.0), calibrated_to(true, labels, 1.07)
    ok = window(labels, mask, candidate=slightly_high, live=exact).decide()
    click = ok.evidence["heads"]["click"]
    assert click["live"]["calibration"] == 1.0 and click["candidate"]["calibration"] == 1.07
    assert ok.go_live, ok.reason


def test_a_live_version_worse_than_the_base_rate_yields_to_one_that_beats_it():
    x, true, labels, mask = world()
    swapped = true.copy()  # after a shift: right on average, wrong about who clicks
    swapped[:, CLICK], swapped[:, LIKE] = sigmoid(-1.8 - 1.5 * x), sigmoid(-3.2 - 1.2 * x)
    learned = np.clip(true * 0.8, 0, 1)  # under-predicts: further from 1 than the live version
    d = window(labels, mask, candidate=learned, live=swapped).decide()
    assert d.go_live and "no longer beats the base rate" in d.reason, d.reason
    assert d.evidence["heads"]["click"]["live"]["ne"] > 1


def test_too_few_examples_or_positives_is_no_decision():
    _, true, labels, mask = world(n=400)
    few = window(labels, mask, true).decide()
    assert not few.decided and not few.go_live and "400 of 500 examples" in few.reason
    rules = GateRules(min_examples=100, min_positives=1000)
    rare = window(labels, mask, true).decide(rules)
    assert not rare.decided and "click positives" in rare.reason


def test_a_head_with_enough_positives_must_beat_the_base_rate_rare_ones_are_not_judged():
    _, true, labels, mask = world()
    bad_like = true.copy()
    bad_like[:, LIKE] = 0.5
    d = window(labels, mask, bad_like).decide()
    assert not d.go_live and d.reason.startswith("like NE")
    # With too few like positives to judge, like is left out and click decides.
    lenient = window(labels, mask, bad_like).decide(GateRules(min_positives=int(labels[:, LIKE].sum()) + 1,
                                                              required_heads=()))
    assert lenient.go_live and lenient.evidence["judged_heads"] == ["click"]


def test_window_scores_both_models_on_every_batch_or_neither():
    w = ProgressiveValidation("v1", heads=("click",))
    with pytest.raises(ValueError):
        w.add([[1]], [[1]], candidate=[[0.5]])


def test_rules_from_environment():
    rules = GateRules.from_env({"STREAMREC_GATE_MIN_EXAMPLES": "60",
                                "STREAMREC_GATE_MIN_NE_GAIN": "0.02", "OTHER": "1"})
    assert rules.min_examples == 60 and rules.min_ne_gain == 0.02
    assert rules.min_positives == GateRules().min_positives


# -- the registry: one live version, its weights and the rollback target stay -----------

def record(version, state, *history):
    return {"model": "ranker", "version": version, "state": state, "created": 0.0,
            "history": [list(h) for h in history]}


def registry_of(*records):
    return {f"{r['model']}/{r['version']}": r for r in records}


def test_live_version_and_rollback_target_are_protected_from_tombstoning():
    registry = registry_of(
        record("v1", "retired", (1, "live"), (3, "retired")),
        record("v2", "registered", (2, "registered")),
        record("v3", "live", (3, "live")),
        record("v4", "registered", (4, "registered")),
        record("v5", "registered", (5, "registered")),
        record("v6", "rolled_back", (0.5, "live"), (6, "rolled_back")))
    assert [r["version"] for r in live_records(registry, "ranker")] == ["v3"]
    assert previous_live(registry, "ranker")["version"] == "v1"
    assert protected_versions(registry, "ranker") == {"v3", "v1"}


def test_live_since_not_the_name_orders_versions():
    promoted_back = record("v1", "live", (1, "live"), (2, "retired"), (9, "live"))
    newer_name = record("v2", "live", (5, "live"))
    registry = registry_of(promoted_back, newer_name)
    assert live_since(promoted_back) == 9
    assert live_records(registry, "ranker")[-1]["version"] == "v1"


# -- serving: the registry's live version ---------------------------------------------

@pytest.fixture
def view(monkeypatch):
    import stores.shared_view as sv
    monkeypatch.setattr(sv, "trainer_from_bytes", lambda blob: ("trainer", blob))
    monkeypatch.setattr(sv.SharedItemView, "refresh_tower_index", lambda self, scorer: 0)
    return sv.SharedItemView("unused:0")


def load_weights(view, version):
    blob = version.encode() * 10
    view.apply(MODEL_WEIGHTS, f"ranker/{version}/part-0000".encode(), blob)
    view.apply(MODEL_WEIGHTS, f"ranker/{version}/manifest".encode(),
               orjson.dumps(manifest_for(blob, len(split(blob)))))


def set_record(view, r):
    view.apply(MODEL_REGISTRY, f"ranker/{r['version']}".encode(), orjson.dumps(r))


def test_serving_picks_the_version_made_live_last_not_the_newest_name(view):
    for v in ("v1", "v2"):
        load_weights(view, v)
    set_record(view, record("v2", "live", (5, "live")))
    assert view.scorer.version == "v2"
    # An operator promotes v1 again; for a moment both are live: v1 was made live last.
    set_record(view, record("v1", "live", (1, "live"), (2, "retired"), (9, "live")))
    assert view.scorer.version == "v1"


def test_registered_versions_are_not_served(view):
    load_weights(view, "v1")
    set_record(view, record("v1", "registered", (1, "registered")))
    assert view.scorer is None


def test_retired_version_serves_until_its_successor_arrives_rolled_back_stops(view):
    load_weights(view, "v1")
    set_record(view, record("v1", "live", (1, "live")))
    set_record(view, record("v2", "live", (2, "live")))
    set_record(view, record("v1", "retired", (1, "live"), (2, "retired")))
    assert view.scorer.version == "v1", "v2's weights are still on their way"
    load_weights(view, "v2")
    assert view.scorer.version == "v2"
    set_record(view, record("v2", "rolled_back", (2, "live"), (3, "rolled_back")))
    assert view.scorer is None

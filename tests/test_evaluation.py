"""Offline evaluation's pure part (models/evaluation.py): which examples count, the
figures per head, HitRate@10 only where the recording can tell orders apart, cost, and
the verdict against the tier SLO launches use; and the command's usage errors."""
from __future__ import annotations

import numpy as np
import pytest

from models import evaluation, launch, metrics
from models.evaluation import choose, head_quality, hit_rate, trained_through, verdict


def rows(n: int, *, per_message: int = 3, surface: str = "explore"):
    """(offset, example) as the topic holds them: ``per_message`` examples a message."""
    return [(i // per_message, {"ts": 1000.0 + i, "surface": surface, "i": i}) for i in range(n)]


# -- which examples ----------------------------------------------------------------------

def test_examples_at_or_before_the_newest_trained_offset_are_left_out():
    lineage = [{"lineage": {"source_topic": "training.examples", "offsets": {"0": 4}}},
               {"lineage": {"source_topic": "training.examples", "offsets": {"0": 6}}},
               {"lineage": {}}]
    cut = max(o for o in map(trained_through, lineage) if o is not None)
    chosen = choose(rows(30), after=cut, last=None)
    assert cut == 6
    assert min(chosen.offsets) == 7 and [e["i"] for e in chosen.examples] == list(range(21, 30))
    assert chosen.after_cut == 9 and chosen.filtered == 0


def test_last_keeps_the_newest_in_topic_order_and_since_and_surface_filter():
    data = rows(20) + [(7, {"ts": 5000.0, "surface": "home", "i": 99})]
    newest = choose(data, last=4)
    assert [e["i"] for e in newest.examples] == [17, 18, 19, 99]
    explore = choose(data, last=4, surface="explore")
    assert [e["i"] for e in explore.examples] == [16, 17, 18, 19] and explore.filtered == 1
    since = choose(data, since=1015.0, last=None, surface="explore")
    assert [e["i"] for e in since.examples] == [15, 16, 17, 18, 19] and since.filtered == 16


# -- figures -------------------------------------------------------------------------------

def test_head_figures_are_the_metrics_over_the_labelled_cells_only():
    rng = np.random.default_rng(3)
    probs = rng.uniform(0.01, 0.6, size=(500, 2))
    labels = (rng.uniform(size=(500, 2)) < probs).astype(float)
    mask = np.ones_like(labels, dtype=bool)
    mask[::5, 1] = False  # the second head has no label on every fifth example
    q = head_quality(labels, mask, probs, heads=("click", "like"))
    keep = mask[:, 1]
    assert q["like"]["n"] == int(keep.sum()) == 400
    assert q["like"]["positives"] == int(labels[keep, 1].sum())
    assert q["like"]["ne"] == round(metrics.normalized_entropy(labels[keep, 1], probs[keep, 1]), 4)
    assert q["like"]["auc"] == round(metrics.auc(labels[keep, 1], probs[keep, 1]), 4)
    assert q["click"]["calibration"] == round(probs[:, 0].sum() / labels[:, 0].sum(), 4)
    # Honest probabilities: calibrated and better than the base rate.
    assert 0.85 <= q["click"]["calibration"] <= 1.15 and q["click"]["ne"] < 1.0


def test_a_head_without_positives_has_no_calibration_ne_or_auc():
    q = head_quality([[0], [0]], [[True], [True]], [[0.2], [0.1]], heads=("share",))
    assert q["share"]["n"] == 2 and q["share"]["positives"] == 0
    assert q["share"]["calibration"] is None and q["share"]["ne"] is None
    assert q["share"]["auc"] is None


# -- HitRate@10 ----------------------------------------------------------------------------

def test_hit_rate_counts_requests_with_a_click_in_the_version_top_ten():
    # Request a: 12 items, the click at the end; b: 15 items, click second; c: 11, no click.
    requests = ["a"] * 12 + ["b"] * 15 + ["c"] * 11 + [None] * 3
    clicks = [0] * 11 + [1] + [0, 1] + [0] * 13 + [0] * 11 + [1, 1, 1]
    in_order = np.concatenate([np.arange(12, 0, -1), np.arange(15, 0, -1),
                               np.arange(11, 0, -1), np.zeros(3)])
    got = hit_rate(requests, clicks, in_order)
    assert got == {"value": 0.5, "requests": 2, "k": 10, "reason": None}
    # A version that puts a's click first hits both.
    better = in_order.copy()
    better[11] = 100.0
    assert hit_rate(requests, clicks, better)["value"] == 1.0


def test_hit_rate_ties_keep_the_shown_order():
    clicks = [0] * 10 + [1, 0]
    assert hit_rate(["r"] * 12, clicks, [0.5] * 12)["value"] == 0.0
    assert hit_rate(["r"] * 12, clicks[::-1], [0.5] * 12)["value"] == 1.0


def test_hit_rate_is_null_with_the_reason_when_the_recording_cannot_tell():
    short = hit_rate(["a"] * 10 + ["b"] * 10, [1] * 20, np.arange(20))
    assert short["value"] is None and short["requests"] == 0
    assert "no recorded request has more than 10 labelled items (at most 10)" in short["reason"]
    silent = hit_rate(["a"] * 12, [0] * 12, np.arange(12))
    assert silent["value"] is None and "has a click" in silent["reason"]
    assert hit_rate([None] * 30, [1] * 30, np.arange(30))["value"] is None


def test_cost_per_example_and_per_request():
    c = evaluation.cost([0.01, 0.03, 0.02], cpu_s=0.05, examples=30, requests=2,
                        request_wall_s=[0.01, 0.03])
    assert c["ms_per_example"] == pytest.approx(2.0) and c["ms_per_request"] == pytest.approx(20.0)
    assert evaluation.cost([0.01], 0.01, examples=5, requests=0)["ms_per_request"] is None


# -- the verdict -----------------------------------------------------------------------------

def figures(calibration: float, ne: float = 0.9, n: int = 400, rate: float = 0.1) -> dict:
    return {"click": {"n": n, "positives": round(n * rate), "rate": rate,
                      "calibration": calibration, "ne": ne, "auc": 0.7}}


@pytest.mark.parametrize("tier,calibration,expected", [
    ("TIER2", 1.15, "pass"), ("TIER0", 1.15, "fail"), ("TIER4", 1.35, "pass"),
    ("TIER2", 0.75, "fail"), ("TIER2", 3.0, "fail")])
def test_the_verdict_is_the_tier_slo_a_launch_step_applies(tier, calibration, expected):
    heads = figures(calibration)
    got = verdict(heads, tier)
    assert got["verdict"] == expected
    # The same figures as a shadow's stability: the launch's step check agrees.
    shadow = {"model": "m", "version": "c", "state": "shadow", "tier": tier,
              "stability": {"at": 0.0, "heads": heads}}
    refused = launch.step_check(shadow, "canary")
    assert (refused is None) == (expected == "pass"), refused
    assert got["slo"]["calibration"] == [round(launch.launch_slo(tier, 200).calibration_low, 4),
                                         round(launch.launch_slo(tier, 200).calibration_high, 4)]


def test_ne_worse_than_the_tier_allows_fails_and_too_few_labels_is_not_judged():
    bad = verdict(figures(1.0, ne=0.97), "TIER0")
    assert bad["verdict"] == "fail" and bad["breaches"][0]["metric"] == "normalized_entropy"
    assert verdict(figures(1.0, ne=0.97), "TIER2")["verdict"] == "pass"
    thin = verdict(figures(3.0, n=150), "TIER2")
    assert thin["verdict"] == "not judged" and "most labels on a head: 150" in thin["reason"]
    assert evaluation.EXIT_STATUS[thin["verdict"]] == 2
    assert verdict(figures(3.0, n=150), "TIER2", min_examples=100)["verdict"] == "fail"


def test_the_report_reads_as_a_table_with_the_verdict():
    side = {"heads": figures(3.0), "cost": evaluation.cost([0.01], 0.01, 400, 40, [0.01]),
            "hit_rate": hit_rate(["a"] * 12, [1] + [0] * 11, np.arange(12, 0, -1))}
    report = {"model": "m", "tier": "TIER2",
              "candidate": {"version": "c", "state": "registered", **side},
              "production": {"version": "p", "state": "live", **side,
                             "heads": figures(1.0)},
              "examples": {"n": 400, "requests": 40, "offsets": [3, 9], "from_ts": 0.0,
                           "to_ts": 1.0, "after_offset": 2, "surface": "explore"},
              "verdict": verdict(figures(3.0), "TIER2"), "notes": []}
    text = evaluation.format_report(report)
    lines = text.splitlines()
    assert lines[2].split() == ["HEAD", "LABELS", "POS", "NE", "cand", "NE", "prod", "CAL",
                                "cand", "CAL", "prod", "AUC", "cand", "AUC", "prod"]
    assert lines[3].split()[:7] == ["click", "400", "40", "0.900", "0.900", "3.000", "1.000"]
    assert "hit@10     candidate 1.000, production 1.000  over 1 requests" in text
    assert lines[-1].startswith("verdict    FAIL: click calibration 3 outside 0.8-1.25 on 400")


# -- the command's usage errors (no broker needed) ----------------------------------------------

def test_launch_evaluate_without_a_candidate_is_a_usage_error(capsys):
    from streams.cli import main
    assert main(["launch", "evaluate", "--bootstrap", "127.0.0.1:1", "-q"]) == 2
    assert "name the candidate: MODEL@VERSION" in capsys.readouterr().err
    assert main(["launch", "evaluate", "m@v", "--since", "soon", "--bootstrap",
                 "127.0.0.1:1"]) == 2
    assert "--since 'soon'" in capsys.readouterr().err


def test_models_register_needs_a_source_of_weights(capsys):
    from streams.cli import main
    assert main(["models", "register", "--model", "m", "--bootstrap", "127.0.0.1:1"]) == 2
    assert "--checkpoint FILE or --parent VERSION" in capsys.readouterr().err

"""Launch rules (models/launch.py): who is served by which version, and which versions
on trial the stability monitor takes back; the registry's compare-and-set stamp and the
canary share's validation (models/registry.py)."""
from __future__ import annotations

import pytest

from models import launch
from models.launch import LaunchPlan, bucket, judge, launch_plan, route
from models.registry import RegistryConflict, moved, stamp, validate_record


def rec(version, state, *, model="r", tier="TIER2", t=0.0, **extra) -> dict:
    return {"model": model, "version": version, "state": state, "tier": tier, "owner": "o",
            "created": t, "history": [[t, state]], **extra}


READY = {("r", v) for v in ("p", "p0", "c", "c2", "s", "s2")}


# -- routing ---------------------------------------------------------------------------

def test_canary_share_is_deterministic_by_user_and_close_to_its_share():
    plan = launch_plan([rec("p", "live"), rec("c", "canary", traffic_share=0.2)], READY)
    users = [f"u{i}" for i in range(20000)]
    first = [route(plan, u).serve for u in users]
    assert first == [route(plan, u).serve for u in users]  # the same every time
    share = sum(s == ("r", "c") for s in first) / len(users)
    assert 0.19 <= share <= 0.21
    assert set(first) == {("r", "c"), ("r", "p")}
    roles = {route(plan, u).role for u in users}
    assert roles == {"canary", "production"}


def test_raising_a_canary_share_keeps_the_users_it_had():
    small = launch_plan([rec("p", "live"), rec("c", "canary", traffic_share=0.05)], READY)
    large = launch_plan([rec("p", "live"), rec("c", "canary", traffic_share=0.3)], READY)
    users = [f"u{i}" for i in range(5000)]
    had = {u for u in users if route(small, u).serve == ("r", "c")}
    has = {u for u in users if route(large, u).serve == ("r", "c")}
    assert had and had < has


def test_bucket_is_a_stable_hash_not_pythons_salted_one():
    # Fixed values: every worker, every process, every run agrees.
    assert bucket("ranker", "42") == pytest.approx(bucket("ranker", "42"))
    assert round(bucket("ranker", "42"), 6) == round(
        int.from_bytes(__import__("hashlib").sha256(b"ranker\x0042").digest()[:8], "big")
        / 2.0 ** 64, 6)
    assert bucket("ranker", "42") != bucket("other", "42")


def test_shadows_score_everyone_and_never_serve():
    plan = launch_plan([rec("p", "live"), rec("s", "shadow"), rec("s2", "shadow", t=1.0)], READY)
    for u in ("a", "b", "c"):
        r = route(plan, u)
        assert r.serve == ("r", "p") and r.role == "production"
        assert r.shadows == (("r", "s"), ("r", "s2"))


def test_plan_needs_weights_and_a_production_version_of_the_same_model():
    records = [rec("p", "live"), rec("c", "canary", traffic_share=0.5), rec("s", "shadow"),
               rec("x", "shadow", model="other")]
    assert launch_plan(records, {("r", "c"), ("r", "s")}) == LaunchPlan()
    plan = launch_plan(records, {("r", "p"), ("r", "s"), ("other", "x")})
    assert plan == LaunchPlan(("r", "p"), (), (("r", "s"),))
    # Retired, rolled back and registered versions play no part.
    plan = launch_plan([rec("p", "live"), rec("c", "rolled_back"), rec("s", "retired"),
                        rec("c2", "registered")], READY)
    assert plan == LaunchPlan(("r", "p"))
    assert route(LaunchPlan(), "u").serve is None


def test_production_is_the_version_made_live_last():
    plan = launch_plan([rec("p0", "live", t=5.0), rec("p", "live", t=2.0)], READY)
    assert plan.production == ("r", "p0")


def test_canary_shares_never_add_up_beyond_everyone():
    plan = launch_plan([rec("p", "live"), rec("c", "canary", traffic_share=0.8, t=1.0),
                        rec("c2", "canary", traffic_share=0.8, t=2.0)], READY)
    assert plan.canaries == ((("r", "c"), 0.8), (("r", "c2"), 0.2))
    served = {route(plan, f"u{i}").serve for i in range(2000)}
    assert ("r", "p") not in served


def test_canary_share_is_validated_and_leaves_with_the_canary_state():
    for bad in (0, 1.5, -0.1, "half", True):
        with pytest.raises(ValueError, match="traffic_share must be a number in"):
            validate_record(rec("c", "canary", traffic_share=bad))
    canary = rec("c", "canary", traffic_share=0.1)
    assert "traffic_share" not in moved(canary, "live", by="op")
    assert moved(canary, "canary", by="op", traffic_share=0.5)["traffic_share"] == 0.5


# -- compare-and-set -------------------------------------------------------------------

def test_stamp_counts_revisions_and_refuses_a_stale_base():
    v1 = stamp(rec("v", "registered"), None)
    assert v1["rev"] == 1
    v2 = stamp(moved(v1, "shadow", by="ann"), v1)
    assert v2["rev"] == 2
    # A second writer that read v1 too: its move is refused, not written over ann's.
    with pytest.raises(RegistryConflict, match="revision 1, now 2: shadow, moved by ann"):
        stamp(moved(v1, "retired", by="bob"), v2)
    assert stamp(rec("v", "registered"), v2, overwrite=True)["rev"] == 3


# -- automatic rollback ----------------------------------------------------------------

BAD = {"click": {"n": 400, "rate": 0.1, "calibration": 3.0, "ne": 1.4}}
GOOD = {"click": {"n": 400, "rate": 0.1, "calibration": 1.02, "ne": 0.8}}


def test_a_shadow_or_canary_that_breaks_its_slo_is_taken_back_with_evidence():
    records = [rec("p", "live"), rec("s", "shadow"), rec("c", "canary", traffic_share=0.1)]
    verdicts = judge(records, {"r:p": GOOD, "r:s": BAD, "r:c": BAD}, now=10.0)
    assert [(v.version, v.state, v.action) for v in verdicts] == [
        ("s", "shadow", "roll_back"), ("c", "canary", "roll_back")]
    evidence = verdicts[0].evidence
    assert {(b["head"], b["metric"]) for b in evidence["breaches"]} == {
        ("click", "calibration"), ("click", "normalized_entropy")}
    assert evidence["slo"]["calibration"] == [0.8, 1.25] and evidence["slo"]["min_examples"] == 200
    assert verdicts[0].reason.startswith("click calibration 3 outside 0.8-1.25 on 400 labels")


def test_not_judged_before_the_minimum_sample():
    few = {"click": {"n": 150, "rate": 0.1, "calibration": 3.0, "ne": 1.4}}
    assert judge([rec("p", "live"), rec("s", "shadow")], {"r:s": few}, now=1.0) == []
    assert judge([rec("p", "live"), rec("s", "shadow")], {"r:s": few}, now=1.0,
                 min_examples=100)
    rare = {"click": {"n": 1000, "rate": 0.004, "calibration": 3.0, "ne": 1.4}}  # 4 positives
    assert judge([rec("p", "live"), rec("s", "shadow")], {"r:s": rare}, now=1.0) == []


def test_the_tier_sets_how_strict():
    slightly = {"click": {"n": 400, "rate": 0.1, "calibration": 1.16, "ne": 0.8}}
    assert judge([rec("s", "shadow", tier="TIER2")], {"r:s": slightly}, now=1.0) == []
    assert [v.version for v in judge([rec("s", "shadow", tier="TIER0")], {"r:s": slightly},
                                     now=1.0)] == ["s"]


def test_a_live_version_is_rolled_back_only_on_probation_with_somewhere_to_go():
    before = rec("p0", "retired", t=0.0)
    before["history"] = [[0.0, "live"], [100.0, "retired"]]
    live = rec("p", "live", t=100.0, promoted=100.0)
    assert [v.action for v in judge([before, live], {"r:p": BAD}, now=200.0)] == [
        "roll_back_live"]
    assert judge([before, live], {"r:p": GOOD}, now=200.0) == []
    # The online trainer's own versions (not promoted) answer to its gate, not to this.
    trainers = {k: v for k, v in live.items() if k != "promoted"}
    assert judge([before, trainers], {"r:p": BAD}, now=200.0) == []
    # Past its probation: it alerts, but stays.
    assert judge([before, live], {"r:p": BAD}, now=100.0 + launch.PROBATION_S + 1) == []
    # Nothing live before it: nowhere to roll back to.
    assert judge([live], {"r:p": BAD}, now=200.0) == []
    # A version a rollback put back holds until an operator moves it.
    held = {**live, "hold": {"reason": "rollback of p9"}}
    assert judge([before, held], {"r:p": BAD}, now=200.0) == []
    # Retired and rolled back versions are not on trial.
    assert judge([rec("s", "rolled_back"), rec("c", "retired")],
                 {"r:s": BAD, "r:c": BAD}, now=1.0) == []


# -- launch steps gated on stability ---------------------------------------------------

def figs(n=400, rate=0.1, calibration=1.02, ne=0.9) -> dict:
    return {"at": 1.0, "heads": {"click": {"n": n, "rate": rate, "calibration": calibration,
                                           "ne": ne}}}


def test_leaving_shadow_or_canary_needs_passing_figures_on_enough_labels():
    from models.launch import step_check
    shadow = rec("s", "shadow")
    assert "no stability figures yet" in step_check(shadow, "canary")
    assert "not judged yet: 150 labels in shadow, 200 needed" in step_check(
        {**shadow, "stability": figs(n=150)}, "canary")
    assert step_check({**shadow, "stability": figs(n=150)}, "canary", min_examples=100) is None
    assert step_check({**shadow, "stability": figs()}, "canary") is None
    canary = rec("c", "canary", traffic_share=0.1, stability=figs(ne=1.2))
    assert "breaks its TIER2 SLO in canary: click normalized entropy 1.2" in step_check(
        canary, "live")
    # Into shadow, and an operator's direct promote of a registered version: not gated.
    assert step_check(rec("r", "registered"), "shadow") is None
    assert step_check(rec("r", "registered"), "live") is None


def test_figures_are_kept_only_for_versions_on_trial():
    from models.launch import figures, on_trial
    assert on_trial(rec("s", "shadow"), 0.0) and on_trial(rec("c", "canary"), 0.0)
    assert on_trial(rec("p", "live", promoted=10.0), 20.0)
    assert not on_trial(rec("p", "live", promoted=10.0), 10.0 + launch.PROBATION_S + 1)
    assert not on_trial(rec("p", "live"), 20.0)  # the trainer's own
    assert not on_trial(rec("x", "rolled_back"), 0.0)
    kept = figures({"click": {"n": 10, "rate": 0.123456, "calibration": None, "ne": 0.5},
                    "share": {"n": 0}}, 3.0)
    assert kept == {"at": 3.0, "heads": {"click": {"n": 10, "rate": 0.1235, "calibration": None,
                                                   "ne": 0.5}}}

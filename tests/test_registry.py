"""The registry's rules (models/registry.py): transitions, tiers, holds, validation,
formatting, and which versions the stability monitor keeps (streams/stability.py)."""
from __future__ import annotations

import pytest

from models import registry
from models.registry import (TIERS, TRANSITIONS, TransitionError, check_transition,
                             filter_records, format_detail, format_table, hold_for_rollback,
                             moved, release, shed_order, slo_for, validate_record,
                             watched_versions)
from models.stability import SLO


def rec(version="v1", state="registered", tier="TIER2", model="ranker", **extra) -> dict:
    return {"model": model, "version": version, "state": state, "tier": tier, "owner": "trainer",
            "created": float(version.lstrip("v") or 0), "history": [[0.0, state]], **extra}


# -- transitions -------------------------------------------------------------------------

@pytest.mark.parametrize("old,new", [
    ("registered", "shadow"), ("registered", "canary"), ("registered", "live"),
    ("registered", "retired"), ("shadow", "canary"), ("shadow", "rolled_back"),
    ("canary", "live"), ("canary", "rolled_back"), ("live", "retired"),
    ("live", "rolled_back"), ("retired", "live"), ("rolled_back", "live"),
    ("registered", "production")])
def test_allowed_transitions(old, new):
    check_transition(rec(state=old), new)


@pytest.mark.parametrize("old,new", [
    ("registered", "rolled_back"), ("live", "registered"), ("live", "shadow"),
    ("live", "canary"), ("canary", "shadow"), ("retired", "rolled_back"),
    ("retired", "registered"), ("rolled_back", "registered")])
def test_disallowed_transitions_say_what_is_allowed(old, new):
    with pytest.raises(TransitionError) as err:
        check_transition(rec("v7", state=old), new)
    message = str(err.value)
    assert f"ranker v7: cannot go from {old} to {new}" in message
    assert all(s in message for s in TRANSITIONS[old])


def test_unknown_target_state_is_a_value_error():
    with pytest.raises(ValueError, match="unknown state 'prod'"):
        check_transition(rec(), "prod")


def test_every_state_has_rules_and_registered_is_never_reentered():
    assert set(TRANSITIONS) == set(registry.STATES)
    assert all("registered" not in targets for targets in TRANSITIONS.values())


def test_moved_records_history_and_who_moved_it():
    new = moved(rec(state="live", hold=hold_for_rollback("v2", 5.0)), "retired",
                by="registry", reason="replaced by v3", at=9.0, retired_by="v3")
    assert new["state"] == "retired" and new["history"][-1] == [9.0, "retired"]
    assert new["moves"] == [{"at": 9.0, "from": "live", "to": "retired", "by": "registry",
                             "reason": "replaced by v3"}]
    assert "hold" not in new  # a hold leaves with the live state
    assert new["retired_by"] == "v3"


def test_same_state_updates_without_a_history_entry_and_none_removes_a_field():
    held = rec(state="live", hold=hold_for_rollback("v2", 5.0))
    cleared = moved(held, "live", by="operator", reason="hold released", at=9.0, hold=None)
    assert "hold" not in cleared and cleared["history"] == held["history"]
    assert cleared["moves"][-1]["reason"] == "hold released"


def test_moved_refuses_a_disallowed_move():
    with pytest.raises(TransitionError):
        moved(rec(state="live"), "registered", by="operator")


# -- validation --------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["model", "version", "state", "tier", "owner"])
def test_each_required_field_is_required(field):
    record = rec()
    del record[field]
    with pytest.raises(ValueError, match=f"missing {field}"):
        validate_record(record)


@pytest.mark.parametrize("change,message", [
    ({"tier": "TIER9"}, "unknown tier 'TIER9' (known: TIER0, TIER1, TIER2, TIER3, TIER4)"),
    ({"state": "production"}, "unknown state 'production'"),  # stored as live only
    ({"version": "a/b"}, "may not contain '/'"),
    ({"owner": 3}, "owner must be a string"),
])
def test_invalid_records_are_refused_with_the_reason(change, message):
    with pytest.raises(ValueError) as err:
        validate_record({**rec(), **change})
    assert message in str(err.value)


def test_valid_record_passes_unchanged():
    record = rec(state="canary", tier="TIER0")
    assert validate_record(record) is record


# -- tiers -------------------------------------------------------------------------------

def test_tiers_documented_and_ordered_by_criticality():
    assert list(TIERS) == ["TIER0", "TIER1", "TIER2", "TIER3", "TIER4"]
    assert all(t.meaning for t in TIERS.values())
    assert [t.needs_approval for t in TIERS.values()] == [True, True, False, False, False]
    widths = [slo_for(t).calibration_high - slo_for(t).calibration_low for t in TIERS]
    assert widths == sorted(widths)  # TIER0 strictest
    ne_limits = [slo_for(t).max_normalized_entropy for t in TIERS]
    assert ne_limits == sorted(ne_limits) and ne_limits[0] < 1.0
    assert slo_for("TIER2") == SLO()


def test_tier_slo_band_is_symmetric_in_log_space():
    s = slo_for("TIER0")
    assert s.calibration_low * s.calibration_high == pytest.approx(0.8 * 1.25)


def test_shed_order_starts_with_the_least_critical():
    models = [rec(model=m, tier=t) for m, t in
              (("main", "TIER0"), ("trial", "TIER4"), ("side", "TIER3"), ("value", "TIER1"))]
    assert [r["model"] for r in shed_order(models)] == ["trial", "side", "value", "main"]


# -- the gate's go-live: holds and approval ----------------------------------------------

def test_rollback_hold_turns_the_gates_go_live_into_registered():
    live = rec("v1", state="live", hold=hold_for_rollback("v2", 5.0))
    candidate = rec("v3", state="live", history=[[10.0, "live"]],
                    decision={"go_live": True, "reason": "weighted NE 0.5 beats v1"})
    out = release(candidate, live)
    assert out["state"] == "registered" and out["history"] == [[10.0, "registered"]]
    assert out["reason"].startswith("held by a rollback: rollback of v2")
    assert out["decision"]["go_live"]  # the gate's verdict stays as evidence


def test_without_a_hold_the_gate_decides():
    candidate = rec("v3", state="live")
    assert release(candidate, rec("v1", state="live")) is candidate
    not_better = rec("v4", state="registered")
    assert release(not_better, rec("v1", state="live", hold={"reason": "x"})) is not_better


@pytest.mark.parametrize("tier,needs", [("TIER0", True), ("TIER1", True), ("TIER2", False),
                                        ("TIER3", False), ("TIER4", False)])
def test_tiers_that_need_approval_wait_for_an_operator(tier, needs):
    out = release(rec("v3", state="live", tier=tier), None)
    assert (out["state"] == "registered") == needs
    if needs:
        assert out["reason"] == f"awaiting approval ({tier})"


# -- what the stability monitor keeps ----------------------------------------------------

def test_watched_versions_serving_and_newest_registered_per_model():
    records = [rec("v1", "retired"), rec("v2", "rolled_back"), rec("v3", "live"),
               rec("v4", "registered"), rec("v5", "shadow"), rec("v6", "canary"),
               rec("v7", "registered"), rec("v8", "registered", model="other"),
               rec("v9", "retired", model="other")]
    assert watched_versions(records) == {"ranker:v3", "ranker:v5", "ranker:v6", "ranker:v7",
                                         "other:v8"}


def test_stability_monitor_memory_is_bounded_by_the_registry():
    from streams.stability import BoundedMonitor, watch_filter
    monitor = BoundedMonitor(("click",), window=10)
    records = []
    for n in range(1, 201):
        # A version a minute: each new one goes live and retires the one before.
        for r in records:
            if r["state"] == "live":
                r["state"] = "retired"
        records.append(rec(f"v{n}", "live"))
        monitor.update(f"ranker:v{n}", {"click": 1}, {"click": 0.4})
        monitor.retain(watch_filter(records))
    assert sorted(monitor.report()) == ["ranker:v200"]
    # A version not in the registry yet keeps its window until the registry says otherwise.
    monitor.update("ranker:v201", {"click": 0}, {"click": 0.4})
    assert monitor.retain(watch_filter(records)) == []
    assert not watch_filter(records)("ranker:v3")


def test_tier_violations_judge_each_version_by_its_tier():
    from streams.stability import tier_violations
    heads = {"click": {"n": 1000, "rate": 0.1, "calibration": 1.2, "ne": 0.97}}
    report = {"ranker:v1": heads, "ranker:v2": heads}
    alerts = tier_violations(report, [rec("v1", "live", tier="TIER0"),
                                      rec("v2", "registered", tier="TIER3")])
    assert {(a["model"], a["metric"], a["tier"]) for a in alerts} == {
        ("ranker:v1", "calibration", "TIER0"), ("ranker:v1", "normalized_entropy", "TIER0")}


# -- filters and formatting --------------------------------------------------------------

def test_filters_by_model_tier_and_state():
    records = [rec("v1", "live"), rec("v2", "registered", tier="TIER1"),
               rec("v3", "registered", model="other")]
    # Grouped by model, oldest first within a model.
    assert [r["version"] for r in filter_records(records, state="registered")] == ["v3", "v2"]
    assert [r["version"] for r in filter_records(records, tier="TIER1")] == ["v2"]
    assert [r["version"] for r in filter_records(records, model="ranker")] == ["v1", "v2"]
    with pytest.raises(ValueError, match="unknown tier"):
        filter_records(records, tier="gold")


def test_filters_by_surface_and_type():
    records = [rec("v1", "live"), rec("v2", "registered", surface="reels", type="reels_mtml"),
               rec("v3", "live", model="other", surface="reels", type="reels_two_tower"),
               rec("v4", "registered", surface="explore", type="explore_mtml")]
    assert [r["version"] for r in filter_records(records, surface="reels")] == ["v3", "v2"]
    assert [r["version"] for r in filter_records(records, type="explore_mtml")] == ["v4"]
    assert [r["version"] for r in filter_records(records, surface="reels",
                                                 type="reels_mtml")] == ["v2"]
    assert filter_records(records, surface="clips") == []


def test_table_has_a_header_a_row_per_version_and_the_reason():
    records = [rec("v1", "live", hold=hold_for_rollback("v2", 5.0)),
               rec("v3", "registered", reason="held by a rollback: rollback of v2",
                   decision={"reason": "gate says better"}),
               rec("v4", "registered", decision={"reason": "n 120 < 500: no decision yet"})]
    lines = format_table(records).splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "TIER", "SURFACE", "TYPE", "OWNER",
                                "PARENT", "EXAMPLES", "CREATED", "WHY"]
    assert len(lines) == 4
    assert "rollback of v2 holds it until a promote" in lines[1]
    assert "held by a rollback" in lines[2] and "gate says better" not in lines[2]
    assert lines[3].rstrip().endswith("n 120 < 500: no decision yet")
    # Columns line up: every row's state starts where the header's does.
    column = lines[0].index("STATE")
    assert [line[column:column + 10].split()[0] for line in lines[1:]] == [
        "live", "registered", "registered"]
    assert format_table([]) == "no versions match"


def test_detail_view_has_lineage_decision_and_every_move():
    record = moved(rec("v3", "registered", parent="v2", lineage={"examples_seen": 900},
                       decision={"go_live": True, "decided": True, "reason": "beats v2"},
                       history=[[60.0, "registered"]]),
                   "live", by="operator", reason="promoted by operator", at=120.0)
    text = format_detail(record)
    assert text.splitlines()[0] == "ranker v3: live (TIER2)"
    assert "parent     v2" in text and "examples_seen=900" in text
    assert "gate       go live: beats v2" in text
    assert "1970-01-01 00:01:00  registered" in text
    assert "1970-01-01 00:02:00  live  by operator: promoted by operator" in text

"""Serving's choice of model per surface (models/launch.py's serving_plan/select and the
glue in streams/serving.py), on a real SharedItemView fed registry records by hand; the
trainers are stand-ins (choosing a scorer never runs them)."""
from __future__ import annotations

import orjson
import pytest

from models.launch import LaunchPlan, ServingPlan, select, serving_plan
from schemas.requests import RecommendationRequest
from schemas.topics import MODEL_REGISTRY
from stores.shared_view import SharedItemView
from streams import serving


def rec(model, version, state, *, t=0.0, **extra) -> dict:
    return {"model": model, "version": version, "state": state, "tier": "TIER2", "owner": "o",
            "created": t, "history": [[t, state]], **extra}


class Weights:
    """A loaded version's stand-in (the view keeps a frozen Trainer per version)."""

    def __init__(self, key):
        self.key = key


@pytest.fixture
def view(monkeypatch):
    v = SharedItemView("127.0.0.1:1")  # never started: records are applied by hand
    monkeypatch.setattr(serving, "view", v)
    monkeypatch.setattr(serving, "_plan", {"plan": ServingPlan(), "launch": None,
                                           "sizes": None, "at": float("-inf")})
    monkeypatch.setattr(serving, "_scorers", {})
    return v


def put(view, *records, weights=True) -> None:
    for r in records:
        if weights:
            view.models[(r["model"], r["version"])] = Weights((r["model"], r["version"]))
        view.apply(MODEL_REGISTRY, f"{r['model']}/{r['version']}".encode(), orjson.dumps(r))


def ask(surface, user="u1", now=100.0):
    req = RecommendationRequest(f"q-{surface}-{user}", user, surface, 10, deadline=now + 1)
    scorer, role, shadows = serving.choose(req, now)
    key = (scorer.model, scorer.version) if scorer is not None else None
    return key, role, [(s.model, s.version) for s in shadows]


# -- the pure choice ----------------------------------------------------------------------

def test_each_surface_gets_its_own_model_and_the_rest_the_default():
    records = [rec("ranker", "p1", "live", t=1.0),
               rec("reels_ranker", "r1", "live", t=2.0, surface="reels"),
               rec("reels_ranker", "r0", "retired", t=0.5, surface="reels")]
    ready = {("ranker", "p1"), ("reels_ranker", "r1"), ("reels_ranker", "r0")}
    plan = serving_plan(records, ready)
    assert plan.default.production == ("ranker", "p1")
    assert dict(plan.surfaces) == {"reels": LaunchPlan(("reels_ranker", "r1"))}
    assert select(plan, "reels", "u").serve == ("reels_ranker", "r1")
    assert select(plan, "explore", "u").serve == ("ranker", "p1")
    assert select(plan, "home", "u").serve == ("ranker", "p1")


def test_a_surface_model_without_weights_or_production_leaves_its_surface_to_the_default():
    records = [rec("ranker", "p1", "live"), rec("reels_ranker", "r1", "live", surface="reels"),
               rec("clips", "c1", "canary", surface="clips", traffic_share=1.0)]
    plan = serving_plan(records, {("ranker", "p1"), ("clips", "c1")})
    assert plan.surfaces == ()
    assert select(plan, "reels", "u").serve == ("ranker", "p1")
    assert select(plan, "clips", "u").serve == ("ranker", "p1")


def test_one_model_without_surfaces_plans_as_launch_plan_did():
    from models.launch import launch_plan
    records = [rec("ranker", "p0", "retired", t=0.0), rec("ranker", "p1", "live", t=1.0),
               rec("ranker", "c1", "canary", t=2.0, traffic_share=0.3),
               rec("ranker", "s1", "shadow", t=3.0)]
    ready = {(r["model"], r["version"]) for r in records}
    plan = serving_plan(records, ready)
    assert plan.surfaces == () and plan.default == launch_plan(records, ready)
    users = [f"u{i}" for i in range(300)]
    from models.launch import route
    assert [select(plan, "any", u) for u in users] == [route(plan.default, u) for u in users]


def test_the_default_is_the_default_model_or_a_surfaceless_one_made_live_last():
    named = [rec("ranker", "p1", "live", t=1.0, surface="explore"),
             rec("other", "o1", "live", t=2.0, surface="reels")]
    ready = {("ranker", "p1"), ("other", "o1")}
    plan = serving_plan(named, ready)
    # ranker names explore, yet stays the default for every surface nobody names.
    assert select(plan, "home", "u").serve == ("ranker", "p1")
    assert select(plan, "reels", "u").serve == ("other", "o1")
    unnamed = [rec("ranker", "p1", "live", t=1.0), rec("handmade", "h1", "live", t=2.0)]
    plan = serving_plan(unnamed, {("ranker", "p1"), ("handmade", "h1")})
    assert plan.default.production == ("handmade", "h1")
    assert serving_plan([], set()) == ServingPlan()


def test_two_models_naming_one_surface_the_one_made_live_last_ranks_it():
    records = [rec("a", "1", "live", t=5.0, surface="reels"),
               rec("b", "1", "live", t=7.0, surface="reels")]
    plan = serving_plan(records, {("a", "1"), ("b", "1")})
    assert select(plan, "reels", "u").serve == ("b", "1")


def test_a_surface_models_canaries_and_shadows_are_its_own():
    records = [rec("ranker", "p1", "live"), rec("ranker", "s1", "shadow"),
               rec("reels_ranker", "r1", "live", surface="reels"),
               rec("reels_ranker", "rc", "canary", surface="reels", traffic_share=1.0),
               rec("reels_ranker", "rs", "shadow", surface="reels")]
    plan = serving_plan(records, {(r["model"], r["version"]) for r in records})
    reels, explore = select(plan, "reels", "u"), select(plan, "explore", "u")
    assert (reels.serve, reels.role, reels.shadows) == (
        ("reels_ranker", "rc"), "canary", (("reels_ranker", "rs"),))
    assert (explore.serve, explore.role, explore.shadows) == (
        ("ranker", "p1"), "production", (("ranker", "s1"),))


def test_a_retired_version_serves_until_the_live_ones_weights_arrive_a_rolled_back_does_not():
    records = [rec("reels_ranker", "r1", "retired", t=1.0, surface="reels"),
               rec("reels_ranker", "r2", "live", t=2.0, surface="reels")]
    ready = {("reels_ranker", "r1")}
    plan = serving_plan(records, ready, serving={"reels_ranker": "r1"})
    assert select(plan, "reels", "u").serve == ("reels_ranker", "r1")
    assert serving_plan(records, ready).surfaces == ()  # nothing served it before
    records[0]["state"] = "rolled_back"
    assert serving_plan(records, ready, serving={"reels_ranker": "r1"}).surfaces == ()


# -- the glue: scorers from the view --------------------------------------------------------

def test_one_model_serving_picks_exactly_what_the_view_routes(view):
    put(view, rec("ranker", "p1", "live", t=1.0),
        rec("ranker", "c1", "canary", t=2.0, traffic_share=0.25),
        rec("ranker", "s1", "shadow", t=3.0))
    for i in range(200):
        user = f"u{i}"
        req = RecommendationRequest(f"q{i}", user, "explore", 10, deadline=101.0)
        mine = serving.choose(req, 100.0)
        theirs = view.route(user)
        assert mine[0] is theirs[0] and mine[1] == theirs[1]
        assert [id(s) for s in mine[2]] == [id(s) for s in theirs[2]]
    assert serving._scorers == {}  # nothing built beside the view's own scorers


def test_two_surfaces_are_served_by_their_own_models(view):
    put(view, rec("ranker", "p1", "live", t=1.0),
        rec("reels_ranker", "r1", "live", t=2.0, surface="reels"))
    # The view's own scorer stays the default model's (the trainer, the tower index and
    # live_model follow it); reels_ranker's is kept by serving.
    assert (view.scorer.model, view.scorer.version) == ("ranker", "p1")
    assert ask("explore") == (("ranker", "p1"), "production", [])
    assert ask("home") == (("ranker", "p1"), "production", [])
    assert ask("reels") == (("reels_ranker", "r1"), "production", [])
    first = serving.choose(RecommendationRequest("a", "u1", "explore", 10, 200.0), 100.0)[0]
    again = serving.choose(RecommendationRequest("b", "u2", "explore", 10, 200.0), 100.0)[0]
    assert first is again and first.trainer.key == ("ranker", "p1")


def test_registry_moves_reach_serving_at_once(view):
    put(view, rec("ranker", "p1", "live", t=1.0),
        rec("reels_ranker", "r1", "live", t=2.0, surface="reels"),
        rec("reels_ranker", "rc", "registered", t=3.0, surface="reels"))
    assert ask("reels")[0] == ("reels_ranker", "r1")
    # A canary for everyone (same registry size, same loaded versions, same clock).
    put(view, rec("reels_ranker", "rc", "canary", t=3.0, surface="reels", traffic_share=1.0),
        weights=False)
    assert ask("reels") == (("reels_ranker", "rc"), "canary", [])
    assert ask("explore") == (("ranker", "p1"), "production", [])
    # The surface model retired: reels falls back to the default, its scorers go.
    put(view, rec("reels_ranker", "r1", "retired", t=4.0, surface="reels"),
        rec("reels_ranker", "rc", "retired", t=4.0, surface="reels"), weights=False)
    assert ask("reels") == (("ranker", "p1"), "production", [])
    assert not any(k[0] == "reels_ranker" for k in serving._scorers)


def test_no_model_live_is_the_cold_start(view):
    assert ask("explore") == (None, "production", [])
    put(view, rec("reels_ranker", "r1", "live", surface="reels"))
    assert ask("reels")[0] == ("reels_ranker", "r1")
    assert ask("explore") == (None, "production", [])

"""The simulator on a shared worker: its own namespace, a summary that covers the whole run."""
from __future__ import annotations

from models.funnel import DEFAULT_CONFIG, StaticItemView, fallback_items, recommend
from models.history import UserHistory
from schemas.requests import RecommendationRequest
from streams.simulate import aggregate, over_time, recovery

NOW = 1_700_000_000.0


def shared_view() -> StaticItemView:
    """A worker that also serves real data: its trending list is mostly foreign items."""
    foreign = [(f"movie-{i}", 100.0 - i, f"director-{i}") for i in range(30)]
    other_run = [(f"sim-old-i{i}", 50.0 - i, f"sim-old-a{i}") for i in range(10)]
    mine = [(f"sim-new-i{i}", 10.0 - i, f"sim-new-a{i}") for i in range(10)]
    return StaticItemView(trending={"explore": foreign + other_run + mine})


def request(k=5, deadline=NOW + 1.0, context=None) -> RecommendationRequest:
    return RecommendationRequest("r1", "sim-new-u1", "explore", k=k, deadline=deadline,
                                 context=context or {})


def test_namespace_keeps_foreign_items_out_of_the_list():
    view = shared_view()
    plain = recommend(request(), UserHistory(), view, clock=lambda: NOW)
    assert all(i.item_id.startswith("movie-") for i in plain.items)  # the defect it guards against
    reply = recommend(request(context={"namespace": "sim-new-"}), UserHistory(), view,
                      clock=lambda: NOW)
    assert [i.item_id for i in reply.items] == [f"sim-new-i{i}" for i in range(5)]


def test_namespace_applies_to_the_fallback_too():
    reply = recommend(request(deadline=NOW, context={"namespace": "sim-new-"}), UserHistory(),
                      shared_view(), clock=lambda: NOW)
    assert reply.fallback
    assert reply.items and all(i.item_id.startswith("sim-new-i") for i in reply.items)
    direct = fallback_items(request(context={"namespace": "sim-old-"}), UserHistory(),
                            shared_view(), NOW, DEFAULT_CONFIG)
    assert direct and all(c.item_id.startswith("sim-old-i") for c in direct)


def stats(system: float, random: float = 1.0, popularity: float = 1.5, oracle: float = 3.0,
          impressions: int = 10) -> dict:
    row = lambda v, n: {"value": v, "engagement": 0.0, "impressions": n,  # noqa: E731
                        "objectionable": 0, "same_author": 0, "pairs": max(n - 1, 0)}
    return {"system": row(system, impressions), "random": row(random, 10),
            "popularity": row(popularity, 10), "oracle": row(oracle, 10)}


def test_over_time_covers_the_whole_run_even_where_nothing_was_answered():
    # The first answered request came at second 48 of a 60 s run (the rest timed out).
    records = [{"t": 48.0 + i, "stats": stats(2.0)} for i in range(12)]
    outcomes = [(float(t), "timeout") for t in range(48)] + [(r["t"], "answered") for r in records]
    rows = over_time(records, 3.0, 60.0, outcomes)
    assert [r["t"] for r in rows] == [3.0 * i for i in range(20)]
    assert sum(r["sent"] for r in rows) == 60
    assert rows[0]["requests"] == 0 and rows[0]["outcomes"] == {"timeout": 3}
    assert rows[0]["share_of_oracle"] is None and rows[-1]["share_of_oracle"] == 0.5


def test_an_empty_reply_costs_the_system_what_the_policies_would_have_shown():
    served, empty = {"t": 1.0, "stats": stats(3.0)}, {"t": 2.0, "stats": stats(0.0, impressions=0)}
    assert aggregate([served])["share_of_oracle"] == 1.0
    # Before, empty replies were dropped from the summary: the system looked perfect.
    assert aggregate([served, empty])["share_of_oracle"] == 0.25


def test_recovery_compares_with_the_level_just_before_the_shift():
    # The system climbs from 0 to 0.6 before the shift at 300 s, drops, then comes back.
    shares = [0.0, 0.1, 0.2, 0.3, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.2, 0.4, 0.55, 0.6]
    series = [{"t": 30.0 * i, "share_of_oracle": s} for i, s in enumerate(shares)]
    out = recovery(series, 300.0, 30.0)
    assert out["share_before"] == 0.6            # the last two minutes, not the cold start
    assert out["recovered_after_s"] == 90.0      # the window 360-390 s is back above 0.54

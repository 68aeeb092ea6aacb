"""The simulator on a shared worker: its own namespace, a summary that covers the whole run."""
from __future__ import annotations

from models.funnel import StaticItemView, fallback_items, recommend, DEFAULT_CONFIG
from models.history import UserHistory
from schemas.requests import RecommendationRequest

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

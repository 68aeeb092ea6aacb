"""The serving funnel: retrieve -> blend -> rank -> rerank, within a deadline."""
from __future__ import annotations

import random

import pytest

from models.funnel import (DEFAULT_CONFIG, SOURCE_COUNT_PREFIX, Candidate, FunnelConfig,
                           SourceSpec, StaticItemView, blend, recommend, rerank)
from models.history import UserHistory
from schemas.requests import RecommendationRequest

NOW = 1_700_000_000.0


def fixed(t: float = NOW):
    return lambda: t


def ticking(*times: float):
    """A clock returning ``times`` in turn, then the last one for ever."""
    calls = {"n": 0}

    def clock():
        i = min(calls["n"], len(times) - 1)
        calls["n"] += 1
        return times[i]
    clock.calls = calls
    return clock


def req(k=5, deadline=NOW + 1.0, exclude=(), surface="explore", user="u1"):
    return RecommendationRequest("r1", user, surface, k=k, deadline=deadline,
                                 exclude=tuple(exclude))


def trending_list(n, authors=4, prefix="t"):
    """``n`` trending items, best first, authors cycling over ``authors``."""
    return [(f"{prefix}{i}", float(n - i), f"a{i % authors}") for i in range(n)]


def make_view(n_trending=30):
    return StaticItemView(
        trending={"explore": trending_list(n_trending)},
        neighbours={
            "liked1": [("n1", 5.0, "b1"), ("n2", 4.0, "b2"), ("t3", 3.0, "a3"),
                       ("seen1", 9.0, "b3"), ("bad1", 8.0, "b4")],
            "liked2": [("n1", 2.0, "b1"), ("n3", 1.0, "b3")],
        })


def make_history():
    h = UserHistory()
    h.apply("liked2", "like", NOW - 100, "x")
    h.apply("liked1", "save", NOW - 50, "y")
    h.apply("seen1", "impression", NOW - 40)
    h.apply("t0", "impression", NOW - 30)
    h.apply("t1", "click", NOW - 20, "a1")
    h.apply("bad1", "report", NOW - 10)
    h.apply("t2", "see_less", NOW - 5)
    return h


def ids(reply):
    return [i.item_id for i in reply.items]


# --------------------------------------------------------------------------- blend

def test_blend_keeps_every_source_attribution_and_dedupes():
    out = blend({"history": [("x", 4.0, "A"), ("y", 2.0, None)],
                 "trending": [("y", 10.0, "B"), ("z", 5.0, "C"), ("x", 1.0, "A")]},
                {"history": 1.0, "trending": 0.5})
    by_id = {c.item_id: c for c in out}
    assert len(out) == len(by_id) == 3
    assert by_id["x"].sources == {"history": 1.0, "trending": 0.1}
    assert by_id["y"].sources == {"history": 0.5, "trending": 1.0}
    assert by_id["z"].sources == {"trending": 0.5}
    assert by_id["x"].score == pytest.approx(1.0 + 0.05)
    assert by_id["y"].score == pytest.approx(0.5 + 0.5)
    assert by_id["z"].score == pytest.approx(0.25)
    assert by_id["y"].author_id == "B"  # a known author fills in a missing one
    assert [c.item_id for c in out] == ["x", "y", "z"]


def test_blend_skips_empty_sources_and_breaks_ties_by_id():
    out = blend({"history": [], "trending": [("b", 1.0, None), ("a", 1.0, None)]},
                {"history": 1.0, "trending": 1.0})
    assert [c.item_id for c in out] == ["a", "b"]
    assert all(set(c.sources) == {"trending"} for c in out)


def test_reply_lists_every_source_best_first():
    view = StaticItemView(trending={"explore": [("both", 10.0, "A"), ("t", 5.0, "B")]},
                          neighbours={"s": [("h", 4.0, "C"), ("both", 2.0, "A")]})
    h = UserHistory()
    h.apply("s", "like", NOW - 1)
    reply = recommend(req(k=5), h, view, clock=fixed())
    sources = {i.item_id: i.sources for i in reply.items}
    assert sources == {"both": ("trending", "coengagement"), "h": ("coengagement",), "t": ("trending",)}
    assert len(ids(reply)) == len(set(ids(reply)))


# --------------------------------------------------------------------------- filters

def test_seen_and_reported_items_never_come_back():
    h = make_history()
    reply = recommend(req(k=30), h, make_view(), clock=fixed())
    assert not reply.fallback
    got = set(ids(reply))
    assert got.isdisjoint(h.excluded())
    assert got.isdisjoint({"liked1", "liked2", "seen1", "bad1", "t0", "t1", "t2"})
    assert {"n1", "n2", "n3", "t3"} <= got  # history retrieval still works


def test_request_exclude_is_honoured():
    excluded = ["n1", "t3", "t4", "t5"]
    reply = recommend(req(k=50, exclude=excluded), make_history(), make_view(), clock=fixed())
    assert reply.items and set(ids(reply)).isdisjoint(excluded)
    assert not reply.fallback


def test_filters_apply_to_the_fallback_too():
    h = make_history()
    reply = recommend(req(k=50, deadline=NOW - 1, exclude=["t3", "t4"]), h, make_view(),
                      clock=fixed())
    assert reply.fallback
    got = set(ids(reply))
    assert got and got.isdisjoint(h.excluded() | {"t3", "t4"})


# --------------------------------------------------------------------------- rerank

def cands(spec):
    return [Candidate(i, 1.0 / (n + 1), a, {}) for n, (i, a) in enumerate(spec)]


def test_rerank_never_repeats():
    ranked = cands([("1", "A"), ("1", "A"), ("2", "B"), ("2", "B"), ("3", "C"), ("1", "A")])
    out = [c.item_id for c in rerank(ranked, 10)]
    assert sorted(out) == ["1", "2", "3"]


def _assert_no_avoidable_author_runs(ranked, out, max_run=1):
    used = []
    for pos, cand in enumerate(out):
        run = 0
        for prev in reversed(out[:pos]):
            if cand.author_id is None or prev.author_id != cand.author_id:
                break
            run += 1
        if run >= max_run:
            remaining = [c for c in ranked if c.item_id not in used]
            assert all(c.author_id == cand.author_id for c in remaining), \
                f"author {cand.author_id} repeated at {pos} while others were available"
        used.append(cand.item_id)


@pytest.mark.parametrize("seed", range(20))
def test_rerank_avoids_same_author_in_a_row_when_another_is_available(seed):
    rng = random.Random(seed)
    ranked = [Candidate(f"i{n}", rng.random(), rng.choice("AAAABBC") if n % 7 else None, {})
              for n in range(40)]
    ranked.sort(key=lambda c: -c.score)
    k = rng.randint(1, 40)
    out = rerank(ranked, k)
    assert len(out) == k
    assert len({c.item_id for c in out}) == k
    _assert_no_avoidable_author_runs(ranked, out)


def test_rerank_defers_rather_than_drops():
    ranked = cands([("1", "A"), ("2", "A"), ("3", "A"), ("4", "B"), ("5", "C")])
    out = rerank(ranked, 5)
    assert [c.item_id for c in out] == ["1", "4", "2", "5", "3"]


def test_rerank_respects_a_longer_author_run():
    ranked = cands([("1", "A"), ("2", "A"), ("3", "A"), ("4", "B")])
    assert [c.item_id for c in rerank(ranked, 4, max_author_run=2)] == ["1", "2", "4", "3"]


def test_one_author_left_still_fills_k_in_relevance_order():
    ranked = cands([("1", "A"), ("2", "A"), ("3", "A"), ("4", "A"), ("5", "A"), ("6", "A")])
    assert [c.item_id for c in rerank(ranked, 5)] == ["1", "2", "3", "4", "5"]
    ranked = cands([("1", "A"), ("2", "B"), ("3", "A"), ("4", "A"), ("5", "A")])
    assert [c.item_id for c in rerank(ranked, 4)] == ["1", "2", "3", "4"]


def test_recommend_fills_k_from_a_single_author():
    view = StaticItemView(trending={"explore": trending_list(10, authors=1)})
    reply = recommend(req(k=7), UserHistory(), view, clock=fixed())
    assert ids(reply) == [f"t{i}" for i in range(7)]


def test_recommend_reply_has_no_avoidable_author_runs():
    view = make_view()
    reply = recommend(req(k=20), make_history(), view, clock=fixed())
    authors = [i.author_id for i in reply.items]
    assert len(reply.items) == 20
    assert all(a != b for a, b in zip(authors, authors[1:]))


# --------------------------------------------------------------------------- deadline

def test_past_deadline_serves_trending_fallback():
    h = make_history()
    reply = recommend(req(k=5, deadline=NOW - 0.5), h, make_view(), clock=fixed())
    assert reply.fallback is True
    assert reply.fallback_reason and "deadline" in reply.fallback_reason
    assert len(reply.items) == 5
    assert all(i.sources == ("trending",) for i in reply.items)
    assert set(ids(reply)).isdisjoint(h.excluded())
    # Best unseen trending items, diversified: t0..t2 are seen/rejected.
    assert ids(reply) == ["t3", "t4", "t5", "t6", "t7"]
    assert reply.stage_counts == {"returned": 5}


def test_deadline_inside_min_budget_serves_fallback():
    cfg = FunnelConfig(min_budget_s=0.05)
    reply = recommend(req(deadline=NOW + 0.01), UserHistory(), make_view(), clock=fixed(),
                      config=cfg)
    assert reply.fallback and reply.items


# Two sources in a known order, so the deadline tests can say which one was skipped.
TWO_SOURCES = FunnelConfig(sources={"coengagement": SourceSpec(weight=1.0, fetch=500),
                                    "trending": SourceSpec(weight=0.6, fetch=500)})


def test_clock_jumping_past_deadline_during_retrieval_triggers_fallback():
    h = make_history()
    clock = ticking(NOW, NOW + 5.0)
    reply = recommend(req(k=5, deadline=NOW + 1.0), h, make_view(), clock=clock,
                      config=TWO_SOURCES)
    assert reply.fallback is True
    assert "during retrieval" in reply.fallback_reason and "'coengagement'" in reply.fallback_reason
    assert ids(reply) == ["t3", "t4", "t5", "t6", "t7"]
    assert reply.server_latency_ms == pytest.approx(5000.0)


def test_clock_jumping_between_sources_names_the_skipped_source():
    clock = ticking(NOW, NOW, NOW + 5.0)
    reply = recommend(req(k=5), make_history(), make_view(), clock=clock, config=TWO_SOURCES)
    assert reply.fallback and "'trending'" in reply.fallback_reason
    assert all(i.sources == ("trending",) for i in reply.items)


def test_clock_within_budget_runs_the_funnel():
    clock = ticking(NOW, NOW + 0.1, NOW + 0.2, NOW + 0.3)
    reply = recommend(req(k=5, deadline=NOW + 1.0), make_history(), make_view(), clock=clock)
    assert not reply.fallback and reply.fallback_reason is None
    assert any("coengagement" in i.sources for i in reply.items)


# --------------------------------------------------------------------------- cold start

def test_cold_start_user_gets_trending():
    reply = recommend(req(k=5), UserHistory(), make_view(), clock=fixed())
    assert not reply.fallback
    assert ids(reply) == ["t0", "t1", "t2", "t3", "t4"]
    assert all(i.sources == ("trending",) for i in reply.items)
    assert reply.stage_counts["retrieved"] == 30


def test_stale_seeds_behave_like_cold_start():
    h = UserHistory()
    h.apply("liked1", "like", NOW - 30 * 86400)
    reply = recommend(req(k=5), h, make_view(), clock=fixed())
    assert all(i.sources == ("trending",) for i in reply.items)


def test_unknown_surface_returns_empty_not_error():
    reply = recommend(req(surface="nowhere"), UserHistory(), make_view(), clock=fixed())
    assert reply.items == [] and reply.error is None


def test_heavy_user_still_gets_k_unseen_trending_items():
    view = StaticItemView(trending={"explore": trending_list(800, authors=50)})
    h = UserHistory()
    for i in range(500):
        h.apply(f"t{i}", "impression", NOW - 1000 + i)
    reply = recommend(req(k=10), h, view, clock=fixed())
    assert len(reply.items) == 10
    # The fallback path manages it:
    assert len(recommend(req(k=10, deadline=NOW - 1), h, view, clock=fixed()).items) == 10


# --------------------------------------------------------------------------- bookkeeping

def test_stage_counts_are_consistent():
    for k in (1, 5, 100):
        reply = recommend(req(k=k), make_history(), make_view(), clock=fixed())
        c = dict(reply.stage_counts)
        by_source = {key[len(SOURCE_COUNT_PREFIX):]: c.pop(key) for key in list(c)
                     if key.startswith(SOURCE_COUNT_PREFIX)}
        assert set(by_source) == set(DEFAULT_CONFIG.sources)
        # Items several sources proposed are counted by each, retrieved once.
        assert max(by_source.values()) <= c["retrieved"] <= sum(by_source.values())
        assert set(c) == {"retrieved", "after_filters", "ranked", "returned"}
        assert c["returned"] == len(reply.items) == min(k, c["ranked"])
        assert c["returned"] <= c["ranked"] <= c["after_filters"] <= c["retrieved"]
    # Sources skip excluded items (seen1, bad1, t0, t1, t2), so what is retrieved is
    # n1, n2, n3 and t3..t29, and nothing here is objectionable.
    assert c["retrieved"] == 30 and c["after_filters"] == 30


def test_reply_identifies_request_and_model():
    reply = recommend(req(k=3), make_history(), make_view(), clock=fixed())
    assert (reply.request_id, reply.user_id, reply.surface) == ("r1", "u1", "explore")
    assert reply.model_versions == {"ranker": "blend-v1"}
    assert reply.server_latency_ms == 0.0
    scores = [i.score for i in reply.items]
    assert all(s > 0 for s in scores)


def test_same_inputs_give_the_same_output():
    a = recommend(req(k=20), make_history(), make_view(), clock=fixed())
    b = recommend(req(k=20), make_history(), make_view(), clock=fixed())
    assert a.to_dict() == b.to_dict()
    assert ids(a) == ids(b) and len(ids(a)) == 20


def test_recommend_does_not_mutate_history_or_view():
    h, view = make_history(), make_view()
    before = (h.to_dict().__repr__(), repr(view.trending_lists), repr(view.neighbour_lists))
    recommend(req(k=20), h, view, clock=fixed())
    assert before == (h.to_dict().__repr__(), repr(view.trending_lists),
                      repr(view.neighbour_lists))


def test_source_weights_shift_the_blend():
    def config(history_w, trending_w):
        return FunnelConfig(sources={"coengagement": SourceSpec(weight=history_w, fetch=500),
                                     "trending": SourceSpec(weight=trending_w, fetch=500)})
    only_trending = recommend(req(k=30), make_history(), make_view(), clock=fixed(),
                              config=config(0.0, 1.0))
    assert ids(only_trending)[:3] == ["t3", "t4", "t5"]
    assert ids(only_trending).index("t29") < ids(only_trending).index("n1")
    only_history = recommend(req(k=3), make_history(), make_view(), clock=fixed(),
                             config=config(1.0, 0.0))
    assert ids(only_history) == ["n1", "n2", "t3"]
    default = recommend(req(k=30), make_history(), make_view(), clock=fixed(),
                        config=DEFAULT_CONFIG)
    assert ids(default)[0] == "t3"  # proposed by both sources
    assert ids(default).index("n1") < ids(default).index("t4")


def test_exploration_puts_an_item_from_below_the_top_k_in_the_last_slot():
    from models.funnel import explore
    ranked = [Candidate(f"i{n}", 100.0 - n, None, {}) for n in range(50)]
    out = explore(list(ranked), 10, 1.0, "r-1")
    assert [c.item_id for c in out[:9]] == [f"i{n}" for n in range(9)]
    assert int(out[9].item_id[1:]) in range(10, 40) and "explore" in out[9].why
    assert sorted(c.item_id for c in out) == sorted(c.item_id for c in ranked), "nothing lost"
    assert explore(list(ranked), 10, 0.0, "r-1") == ranked
    explored = sum(explore(list(ranked), 10, 0.2, f"r-{n}")[9].item_id != "i9"
                   for n in range(2000))
    assert 300 < explored < 500, "about a fifth of requests explore"
    assert explore(ranked[:10], 10, 1.0, "r-1") == ranked[:10], "nothing below the top k"


def test_explore_share_is_validated():
    with pytest.raises(ValueError, match="explore_share"):
        FunnelConfig.from_dict({"sources": {"trending": {}}, "explore_share": 2})

"""Each retrieval source on small synthetic data with known answers, the integrity
and configuration rules of the funnel around them, and the pre-generated batch
products (models/pregen.py) that feed two of them."""
from __future__ import annotations

import numpy as np
import pytest

from models.funnel import FunnelConfig, SourceSpec, StaticItemView, recommend
from models.history import SEED_WINDOW_S, UserHistory
from models.pregen import DAY_S, item_embeddings, popular
from models.sources import (SOURCES, RetrievalContext, author_source, coengagement_source,
                            embedding_source, history_source, pregen_popular_source,
                            trending_source, user_vector)
from schemas.events import EngagementEvent
from schemas.requests import RecommendationRequest

NOW = 1_700_000_000.0
REPORTED = {"report": 5, "pos": 0}        # objectionable by models/quality.py
SEE_LESS_A_LOT = {"pos": 2, "see_less": 8}  # a poor seed, but not objectionable


def ctx(history=None, view=None, *, excluded=None, surface="explore", region=None, now=NOW):
    history = history or UserHistory()
    return RetrievalContext(surface, history, view or StaticItemView(), now,
                            excluded=history.excluded() if excluded is None else set(excluded),
                            region=region)


def liked(*items, author=None, at=NOW - 60.0) -> UserHistory:
    """A history with one like per item, oldest first, a second apart."""
    h = UserHistory()
    for n, item in enumerate(items):
        h.apply(item, "like", at + n, author)
    return h


def ids(hits) -> list[str]:
    return [h.item_id for h in hits]


# --------------------------------------------------------------------------- author

def test_author_source_shows_a_followed_authors_new_item():
    h = UserHistory()
    h.follows["alice"] = NOW - 10.0
    view = StaticItemView(author_items={"alice": [("new1", 1.0, "alice")],
                                        "carol": [("c1", 9.0, "carol")]})
    hits = author_source(ctx(h, view), 10)
    assert ids(hits) == ["new1"]
    assert hits[0].author == "alice" and hits[0].why == "by alice, whom you follow"


def test_author_source_uses_authors_of_recent_positives_and_says_which_item():
    h = liked("p1", author="bob")
    view = StaticItemView(author_items={"bob": [("p1", 5.0, "bob"), ("b1", 4.0, "bob"),
                                                ("b2", 2.0, "bob")],
                                        "carol": [("c1", 9.0, "carol")]})
    hits = author_source(ctx(h, view), 10)
    # p1 was seen; scores are relative to the author's best item (p1's 5.0).
    assert ids(hits) == ["b1", "b2"]
    assert [round(x.score, 3) for x in hits] == [0.8, 0.4]
    assert all(x.why == "by bob, whose p1 you engaged with" for x in hits)


def test_author_source_weighs_the_most_recent_positives_author_first():
    h = UserHistory()
    h.apply("old", "like", NOW - 100.0, "old_author")
    h.apply("new", "like", NOW - 50.0, "new_author")
    view = StaticItemView(author_items={"old_author": [("o1", 1.0, "old_author")],
                                        "new_author": [("n1", 1.0, "new_author")]})
    hits = author_source(ctx(h, view), 10)
    assert ids(hits) == ["n1", "o1"] and hits[0].score > hits[1].score


def test_author_source_never_shows_excluded_items():
    h = UserHistory()
    h.follows["alice"] = NOW
    view = StaticItemView(author_items={"alice": [("a1", 3.0, "alice"), ("a2", 2.0, "alice")]})
    assert ids(author_source(ctx(h, view, excluded={"a1"}), 10)) == ["a2"]
    assert author_source(ctx(h, view, excluded={"a1", "a2"}), 10) == []


# --------------------------------------------------------------------------- co-engagement

def test_coengagement_source_finds_neighbours_of_recent_positives_and_names_the_seed():
    h = liked("s1", "s2")  # s2 is the newest seed, weight 1; s1 weight 1/2
    view = StaticItemView(neighbours={"s1": [("n1", 4.0, "a"), ("both", 2.0, "a")],
                                      "s2": [("n2", 1.0, "b"), ("both", 2.0, "a"),
                                             ("s1", 9.0, "a")]})
    hits = coengagement_source(ctx(h, view), 10)
    scores = {x.item_id: x.score for x in hits}
    assert scores == pytest.approx({"both": 3.0, "n1": 2.0, "n2": 1.0})  # s1 was seen
    assert ids(hits) == ["both", "n1", "n2"]
    why = {x.item_id: x.why for x in hits}
    assert why["n1"] == "engaged together with s1" and why["n2"] == "engaged together with s2"
    assert why["both"] == "engaged together with s2"  # the larger contribution


@pytest.mark.parametrize("bad_quality", [SEE_LESS_A_LOT, REPORTED])
def test_coengagement_source_drops_poor_seeds(bad_quality):
    h = liked("good", "bad")
    neighbours = {"good": [("g1", 1.0, "a")], "bad": [("b1", 5.0, "b")]}
    with_bad = coengagement_source(ctx(h, StaticItemView(neighbours=neighbours)), 10)
    assert ids(with_bad) == ["b1", "g1"]  # the bad seed counts until its quality says no
    view = StaticItemView(neighbours=neighbours, quality={"bad": bad_quality})
    hits = coengagement_source(ctx(h, view), 10)
    assert ids(hits) == ["g1"] and hits[0].why == "engaged together with good"


def test_coengagement_source_skips_excluded_and_respects_fetch():
    h = liked("s")
    view = StaticItemView(neighbours={"s": [(f"n{i}", 10.0 - i, "a") for i in range(6)]})
    assert ids(coengagement_source(ctx(h, view, excluded={"s", "n0"}), 3)) == ["n1", "n2", "n3"]


# --------------------------------------------------------------------------- history (ANN)

EMB = {
    "seed": np.array([1.0, 0.0, 0.0]),
    "near": np.array([0.95, 0.1, 0.0]),
    "mid": np.array([0.6, 0.6, 0.0]),
    "far": np.array([0.0, 0.0, 1.0]),
    "other_seed": np.array([0.0, 0.0, 1.0]),
}


def test_history_source_returns_items_similar_to_a_good_seed_nearest_first():
    view = StaticItemView(embeddings=EMB, authors={"near": "x"})
    hits = history_source(ctx(liked("seed"), view), 10)
    assert ids(hits)[:2] == ["near", "mid"] and "seed" not in ids(hits)
    assert hits[0].score == pytest.approx(float(EMB["near"] @ EMB["seed"]
                                                / np.linalg.norm(EMB["near"])))
    assert hits[0].author == "x" and hits[0].why == "similar to seed, which you engaged with"


def test_history_source_ignores_seeds_older_than_the_window():
    view = StaticItemView(embeddings=EMB)
    stale = liked("seed", at=NOW - SEED_WINDOW_S - 10.0)
    assert history_source(ctx(stale, view), 10) == []
    fresh = liked("seed", at=NOW - SEED_WINDOW_S + 10.0)
    assert ids(history_source(ctx(fresh, view), 10))[0] == "near"


def test_history_source_drops_objectionable_seeds():
    h = liked("other_seed", "seed")
    view = StaticItemView(embeddings=EMB, quality={"seed": REPORTED})
    hits = history_source(ctx(h, view), 10)
    # Only other_seed seeds: "far" is its twin; "near" is no longer first.
    assert hits[0].item_id == "far"
    assert all(x.why == "similar to other_seed, which you engaged with" for x in hits)


def test_history_source_without_embeddings_or_seeds_is_empty():
    assert history_source(ctx(liked("seed"), StaticItemView()), 10) == []
    assert history_source(ctx(UserHistory(), StaticItemView(embeddings=EMB)), 10) == []


# --------------------------------------------------------------------------- embedding

def test_user_vector_is_the_normalised_mean_of_recent_positives():
    view = StaticItemView(embeddings={"a": np.array([1.0, 0.0, 0.0]),
                                      "b": np.array([0.0, 1.0, 0.0])})
    vec = user_vector(ctx(liked("a", "b", "no_vector"), view))
    assert vec == pytest.approx(np.array([1.0, 1.0, 0.0]) / np.sqrt(2.0))


def test_embedding_source_returns_items_nearest_the_taste_profile():
    emb = {"a": np.array([1.0, 0.0, 0.0]), "b": np.array([0.0, 1.0, 0.0]),
           "ab": np.array([1.0, 1.0, 0.1]), "a2": np.array([1.0, 0.1, 0.0]),
           "c": np.array([0.0, 0.0, 1.0])}
    view = StaticItemView(embeddings=emb, authors={"ab": "x"})
    hits = embedding_source(ctx(liked("a", "b"), view), 3)
    assert ids(hits) == ["ab", "a2", "c"]  # a and b were seen
    assert hits[0].author == "x" and hits[0].why == "close to your taste profile"
    assert hits[0].score == pytest.approx(0.9975, abs=1e-3)


def test_embedding_source_without_embeddings_is_empty():
    assert embedding_source(ctx(liked("a"), StaticItemView()), 10) == []
    view = StaticItemView(embeddings={"x": np.array([1.0, 0.0])})
    assert embedding_source(ctx(liked("a"), view), 10) == []  # no positive has a vector


# --------------------------------------------------------------------------- pregen + trending

PREGEN = {"popular": {"explore/eu": [("r1", 5.0, "a"), ("r2", 4.0, "a")],
                      "explore": [("g1", 9.0, "b"), ("g2", 8.0, "b")]}}


def test_pregen_popular_prefers_the_region_key():
    hits = pregen_popular_source(ctx(view=StaticItemView(pregen=PREGEN), region="eu"), 10)
    assert ids(hits) == ["r1", "r2"] and hits[0].why == "popular on explore/eu in recent days"


@pytest.mark.parametrize("region", [None, "us"])
def test_pregen_popular_falls_back_to_the_surface(region):
    view = StaticItemView(pregen=PREGEN)
    hits = pregen_popular_source(ctx(view=view, region=region, excluded={"g1"}), 10)
    assert ids(hits) == ["g2"] and hits[0].why == "popular on explore in recent days"
    assert pregen_popular_source(ctx(view=view, surface="home", region=region), 10) == []


def test_trending_source_is_per_surface_skips_excluded_and_respects_fetch():
    view = StaticItemView(trending={"explore": [(f"t{i}", 10.0 - i, "a") for i in range(5)],
                                    "home": [("h1", 1.0, "b")]})
    hits = trending_source(ctx(view=view, excluded={"t0", "t2"}), 2)
    assert ids(hits) == ["t1", "t3"] and hits[0].why == "trending on explore"
    assert ids(trending_source(ctx(view=view, surface="home"), 5)) == ["h1"]


# --------------------------------------------------------------------------- funnel

def request(k=10):
    return RecommendationRequest("r1", "u1", "explore", k=k, deadline=NOW + 1.0)


def test_recommend_never_returns_an_objectionable_item_even_if_it_trends():
    view = StaticItemView(trending={"explore": [("bad", 100.0, "a"), ("ok", 1.0, "b")]},
                          neighbours={"s": [("bad", 50.0, "a"), ("n1", 1.0, "c")]},
                          quality={"bad": dict(REPORTED)})
    items = recommend(request(), liked("s"), view, clock=lambda: NOW).items
    assert {i.item_id for i in items} == {"ok", "n1"}
    # Without the reports it would lead the reply: the filter is what removed it.
    clean = StaticItemView(trending=view.trending_lists, neighbours=view.neighbour_lists)
    assert recommend(request(), liked("s"), clean, clock=lambda: NOW).items[0].item_id == "bad"


def test_recommend_uses_only_the_configured_sources_and_says_why():
    view = StaticItemView(trending={"explore": [("t1", 5.0, "a")]},
                          neighbours={"s": [("n1", 2.0, "b")]},
                          pregen={"popular": {"explore": [("p1", 3.0, "c")]}})
    only_co = FunnelConfig.from_dict({"sources": {"coengagement": {"weight": 1, "fetch": 10}}})
    items = recommend(request(), liked("s"), view, clock=lambda: NOW, config=only_co).items
    assert [(i.item_id, i.sources) for i in items] == [("n1", ("coengagement",))]
    assert items[0].why == {"coengagement": "engaged together with s"}
    two = FunnelConfig.from_dict({"sources": {"trending": {}, "pregen_popular": {}}})
    items = recommend(request(), liked("s"), view, clock=lambda: NOW, config=two).items
    assert {i.item_id: i.why for i in items} == {
        "t1": {"trending": "trending on explore"},
        "p1": {"pregen_popular": "popular on explore in recent days"}}


def test_funnel_config_accepts_known_sources():
    cfg = FunnelConfig.from_dict({"sources": {"history": {"weight": 0.5, "fetch": 20}},
                                  "seeds": 3})
    assert cfg.sources == {"history": SourceSpec(0.5, 20)} and cfg.seeds == 3
    assert set(FunnelConfig().sources) <= set(SOURCES)


@pytest.mark.parametrize("bad", [
    {"sources": {"telepathy": {"weight": 1, "fetch": 10}}},
    {"sources": {"trending": {"weight": -1, "fetch": 10}}},
    {"sources": {"trending": {"weight": 1, "fetch": 0}}},
    {"sources": {"trending": {"weight": 1, "fetch": 10_001}}},
    {"sources": {"trending": {"weight": "lots", "fetch": 10}}},
    {"sources": {}},
    {"sources": {"trending": {}}, "speed": 11},
])
def test_funnel_config_refuses_unknown_sources_and_bad_numbers(bad):
    with pytest.raises(ValueError):
        FunnelConfig.from_dict(bad)


# --------------------------------------------------------------------------- pregen batch

def ev(n, user, item, ts, event_type="like", region=None, author=None):
    return EngagementEvent(f"e{n}", user, item, event_type, "explore", ts, author_id=author,
                           region=region)


def test_popular_ranks_by_decayed_weight_and_keeps_region_keys():
    evs = [ev(0, "u1", "fresh", NOW - 60.0, region="eu", author="a"),
           ev(1, "u2", "older", NOW - 3 * DAY_S),
           ev(2, "u3", "ancient", NOW - 8 * DAY_S),   # outside the 7-day window
           ev(3, "u4", "disliked", NOW, event_type="see_less")]
    pop = popular(evs, now=NOW, window_days=7.0, half_life_days=3.0)
    surface = {i: s for i, s, _ in pop["explore"]}
    assert list(surface) == ["fresh", "older"]  # nothing outside the window or net negative
    assert surface["older"] == pytest.approx(1.0)  # a like (2.0) one half-life ago
    assert surface["fresh"] == pytest.approx(2.0, rel=1e-3)
    assert pop["explore/eu"] == [("fresh", pytest.approx(2.0, rel=1e-3), "a")]
    assert set(pop) == {"explore", "explore/eu"}


def test_popular_window_is_configurable():
    evs = [ev(0, "u1", "x", NOW - 2 * DAY_S)]
    assert popular(evs, now=NOW, window_days=1.0) == {}
    assert [i for i, _, _ in popular(evs, now=NOW, window_days=3.0)["explore"]] == ["x"]


def test_item_embeddings_put_co_engaged_items_close_and_are_unit_norm():
    evs, n = [], 0
    for group, items in (("g1", ("a", "b")), ("g2", ("c", "d")), ("g3", ("e", "f"))):
        for u in range(4):
            for item in items:
                evs.append(ev(n, f"{group}u{u}", item, NOW + n))
                n += 1
    for u in range(4):  # not positives: no vector, and no pull towards group 1
        evs.append(ev(n + u, f"g1u{u}", "z", NOW + n + u, event_type="see_less"))
    vecs = item_embeddings(evs, dim=4)
    assert set(vecs) == set("abcdef")
    for v in vecs.values():
        assert float(np.linalg.norm(v)) == pytest.approx(1.0, abs=1e-5)
    assert float(vecs["a"] @ vecs["b"]) > 0.9
    assert float(vecs["a"] @ vecs["b"]) > float(vecs["a"] @ vecs["c"]) + 0.5
    assert float(vecs["c"] @ vecs["d"]) > float(vecs["c"] @ vecs["e"]) + 0.5


def test_trending_prefers_the_requests_region_then_fills_from_the_surface():
    from models.funnel import StaticItemView
    from models.history import UserHistory
    from models.sources import RetrievalContext, trending_source
    view = StaticItemView(trending={"explore": [("g1", 9.0, None), ("r1", 1.0, None)],
                                    "explore@eu": [("r1", 5.0, None), ("r2", 4.0, None)]})
    ctx = RetrievalContext("explore", UserHistory(), view, now=0.0, region="eu")
    hits = trending_source(ctx, 3)
    assert [h.item_id for h in hits] == ["r1", "r2", "g1"]
    assert hits[0].why == "trending on explore in eu" and hits[2].why == "trending on explore"
    no_region = RetrievalContext("explore", UserHistory(), view, now=0.0)
    assert [h.item_id for h in trending_source(no_region, 3)] == ["g1", "r1"]

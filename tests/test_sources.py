"""Retrieval sources and item-side state: trending, co-engagement, user history,
and the pure per-event / per-delta folds used by the ingest and item-stats agents."""
from __future__ import annotations

import importlib
import random
import sys

import orjson
import pytest

# streams.ingest cannot be imported first (see test_ingest_module_imports_on_its_own);
# importing the app first assembles the modules in an order that works.
import streams.app  # noqa: F401
from models.coengagement import MAX_NEIGHBOURS, add_neighbours, coengagement_pairs
from models.history import (MAX_EVENT_IDS, MAX_NEGATIVES, MAX_POSITIVES, MAX_SEEN,
                            SEED_WINDOW_S, UserHistory)
from models.trending import (EVENT_WEIGHTS, TrendingBoard, decayed, event_weight, merge_score,
                             merge_snapshots)
from schemas.events import parse_event
from models.item_state import COENGAGEMENT_LOOKBACK, add_item_deltas
from streams.item_stats import apply_delta
from streams.settings import settings

HL = 60.0
T0 = 1_700_000_000.0


# --------------------------------------------------------------------------- trending

def test_burst_on_one_item_makes_it_top():
    board = TrendingBoard(half_life=HL)
    for i in range(20):
        board.add(f"i{i}", event_weight("click"), ts=T0 + i, author=f"a{i}")
    for j in range(5):
        board.add("i7", event_weight("like"), ts=T0 + 20 + j)
    top = board.top(3, now=T0 + 30)
    assert top[0][0] == "i7"
    assert top[0][1] > 5 * top[1][1]


def test_decay_halves_a_score_after_one_half_life():
    assert decayed(8.0, since=T0, now=T0 + HL, half_life=HL) == pytest.approx(4.0)
    assert decayed(8.0, since=T0, now=T0 + 3 * HL, half_life=HL) == pytest.approx(1.0)
    board = TrendingBoard(half_life=HL)
    board.add("x", 4.0, ts=T0)
    [(_, at_0)] = board.top(1, now=T0)
    [(_, at_hl)] = board.top(1, now=T0 + HL)
    assert at_0 == pytest.approx(4.0) and at_hl == pytest.approx(2.0)


def test_older_engagement_ranks_below_fresh_equal_engagement():
    board = TrendingBoard(half_life=HL)
    board.add("old", 3.0, ts=T0)
    board.add("new", 2.0, ts=T0 + HL)  # old is worth 1.5 by then
    assert [i for i, _ in board.top(2, now=T0 + HL)] == ["new", "old"]


def test_see_less_and_report_weigh_against():
    assert event_weight("see_less") < 0 and event_weight("report") < event_weight("see_less")
    board = TrendingBoard(half_life=HL)
    for item in ("liked", "disputed"):
        for _ in range(3):
            board.add(item, event_weight("like"), ts=T0)
    board.add("disputed", event_weight("see_less"), ts=T0)
    board.add("reported", event_weight("like"), ts=T0)
    board.add("reported", event_weight("report"), ts=T0)
    top = dict(board.top(10, now=T0))
    assert top["liked"] > top["disputed"] > 0
    assert "reported" not in top  # net negative: never trending


def test_dwell_weight_scales_with_duration_and_is_capped():
    assert event_weight("dwell", 10_000) == pytest.approx(EVENT_WEIGHTS["dwell"])
    assert event_weight("dwell", 20_000) == pytest.approx(2 * EVENT_WEIGHTS["dwell"])
    assert event_weight("dwell", 300_000) == event_weight("dwell", 30_000)


def test_out_of_order_merge_equals_in_order():
    rng = random.Random(7)
    events = [(rng.choice(list(EVENT_WEIGHTS.values())), T0 + rng.uniform(0, 5 * HL))
              for _ in range(50)]
    in_order = None
    for w, ts in sorted(events, key=lambda e: e[1]):
        in_order = merge_score(in_order, w, ts, HL)
    shuffled = list(events)
    rng.shuffle(shuffled)
    out_of_order = None
    for w, ts in shuffled:
        out_of_order = merge_score(out_of_order, w, ts, HL)
    assert out_of_order[1] == in_order[1] == max(ts for _, ts in events)
    assert out_of_order[0] == pytest.approx(in_order[0], rel=1e-9)


def test_late_event_is_decayed_to_the_stored_time():
    assert merge_score([1.0, T0 + HL], 4.0, T0, HL) == pytest.approx([3.0, T0 + HL])
    assert merge_score([4.0, T0], 1.0, T0 + HL, HL) == pytest.approx([3.0, T0 + HL])


def test_board_capacity_pruning_keeps_the_best():
    board = TrendingBoard(half_life=HL, capacity=3)
    weights = {"a": 5.0, "b": 1.0, "c": 7.0, "d": 2.0, "e": 6.0, "f": 0.5, "g": 3.0}
    for item, w in weights.items():
        board.add(item, w, ts=T0, author=item.upper())
    assert set(board.scores) == {"c", "e", "a"}
    assert set(board.authors) == {"c", "e", "a"}
    assert [i for i, _ in board.top(3, now=T0)] == ["c", "e", "a"]


def test_board_stays_bounded():
    board = TrendingBoard(half_life=HL, capacity=10)
    for i in range(500):
        board.add(f"i{i}", float(i % 37) + 0.1, ts=T0 + i * 0.01)
    assert len(board.scores) <= 20
    best = max(range(500), key=lambda i: (i % 37, i))
    assert f"i{best}" in board.scores


def test_pruning_triggered_by_a_late_event_keeps_the_best():
    board = TrendingBoard(half_life=HL, capacity=1)
    board.add("A", 10.0, ts=T0 + 100)
    board.add("B", 12.0, ts=T0 + 60)  # worth 12 * 0.5**(40/60) = 7.6 at T0+100: below A
    board.add("C", 0.1, ts=T0 + 50)   # a late event triggers the prune
    assert [i for i, _ in board.top(1, now=T0 + 100)] == ["A"]


def test_snapshot_lists_top_with_authors():
    board = TrendingBoard(half_life=HL)
    board.add("x", 2.0, ts=T0, author="ax")
    board.add("y", 1.0, ts=T0)
    snap = board.snapshot(5, now=T0 + HL)
    assert snap["ts"] == T0 + HL and snap["half_life"] == HL
    assert [[i, round(s, 6), a] for i, s, a in snap["items"]] == [["x", 1.0, "ax"], ["y", 0.5, None]]


def test_merge_snapshots_across_partitions_decays_by_snapshot_age():
    old = {"ts": T0, "half_life": HL, "items": [["a", 8.0, "A"], ["c", 1.0, "C"]]}
    new = {"ts": T0 + HL, "half_life": HL, "items": [["b", 5.0, "B"]]}
    merged = merge_snapshots([old, new], n=2, now=T0 + HL)
    assert [(i, a) for i, _, a in merged] == [("b", "B"), ("a", "A")]
    assert merged[0][1] == pytest.approx(5.0) and merged[1][1] == pytest.approx(4.0)
    # Later still, both have decayed by the same factor; order is unchanged.
    later = merge_snapshots([old, new], n=3, now=T0 + 2 * HL)
    assert [round(s, 6) for _, s, _ in later] == [2.5, 2.0, 0.25]


def test_merge_snapshots_does_not_duplicate_an_item():
    s1 = {"ts": T0, "half_life": HL, "items": [["a", 3.0, "A"]]}
    s2 = {"ts": T0, "half_life": HL, "items": [["a", 2.0, "A"], ["b", 1.0, None]]}
    merged = merge_snapshots([s1, s2], n=10, now=T0)
    assert [i for i, _, _ in merged] == ["a", "b"]
    assert merged[0][1] == pytest.approx(3.0)


def test_board_snapshot_feeds_merge_snapshots():
    boards = [TrendingBoard(half_life=HL) for _ in range(2)]
    boards[0].add("p0", 4.0, ts=T0)
    boards[1].add("p1", 3.0, ts=T0 + HL)
    snaps = [boards[0].snapshot(10, now=T0), boards[1].snapshot(10, now=T0 + HL)]
    snaps = [orjson.loads(orjson.dumps(s)) for s in snaps]
    merged = merge_snapshots(snaps, n=10, now=T0 + HL)
    assert [(i, round(s, 6)) for i, s, _ in merged] == [("p1", 3.0), ("p0", 2.0)]


# --------------------------------------------------------------------------- co-engagement

def test_pairs_are_symmetric_and_skip_self():
    pairs = coengagement_pairs(["a", "b", "c"], "b", weight=0.5)
    assert sorted(pairs) == sorted([("a", "b", 0.5), ("b", "a", 0.5),
                                    ("c", "b", 0.5), ("b", "c", 0.5)])
    assert all((dst, src, w) in pairs for src, dst, w in pairs)
    assert coengagement_pairs([], "x") == []


def test_neighbours_accumulate_and_cap_keeps_strongest():
    assert add_neighbours({"x": 1.0}, {"x": 2.0, "y": 0.5}) == {"x": 3.0, "y": 0.5}
    current = {f"n{i}": float(i) for i in range(10)}
    kept = add_neighbours(current, {"n0": 100.0, "new": 4.5}, max_neighbours=4)
    assert kept == {"n0": 100.0, "n9": 9.0, "n8": 8.0, "n7": 7.0}
    assert current["n0"] == 0.0  # input not mutated


# --------------------------------------------------------------------------- user history

def test_history_lists_are_bounded_keeping_the_newest():
    h = UserHistory()
    for i in range(MAX_SEEN + 20):
        h.apply(f"s{i}", "impression", T0 + i)
    assert len(h.seen) == MAX_SEEN and h.seen[0] == "s20" and h.seen[-1] == f"s{MAX_SEEN + 19}"
    for i in range(MAX_POSITIVES + 5):
        h.apply(f"p{i}", "like", T0 + i)
    assert len(h.positives) == MAX_POSITIVES and h.positives[0][0] == "p5"
    for i in range(MAX_NEGATIVES + 7):
        h.apply(f"n{i}", "report", T0 + i)
    assert len(h.negatives) == MAX_NEGATIVES and h.negatives[0] == "n7"
    assert h.events == MAX_SEEN + 20 + MAX_POSITIVES + 5 + MAX_NEGATIVES + 7


def test_repeat_engagement_moves_to_newest_without_duplicates():
    h = UserHistory()
    h.apply("a", "like", T0)
    h.apply("b", "click", T0 + 1)
    h.apply("a", "save", T0 + 2)
    assert [p[0] for p in h.positives] == ["b", "a"]
    assert h.seen == ["b", "a"]
    assert h.positive_seeds(now=T0 + 3) == ["a", "b"]


@pytest.mark.parametrize("negative", ["see_less", "report"])
def test_negatives_remove_from_positives_and_are_excluded(negative):
    h = UserHistory()
    h.apply("a", "like", T0, "A")
    h.apply("b", "like", T0 + 1, "B")
    h.apply("a", negative, T0 + 2)
    assert [p[0] for p in h.positives] == ["b"]
    assert h.positive_seeds(now=T0 + 3) == ["b"]
    assert "a" in h.excluded() and h.negatives == ["a"]


def test_negatives_stay_excluded_after_leaving_seen():
    h = UserHistory()
    h.apply("bad", "report", T0)
    for i in range(MAX_SEEN):
        h.apply(f"s{i}", "impression", T0 + 1 + i)
    assert "bad" not in h.seen
    assert "bad" in h.excluded()


def test_impressions_are_excluded_but_not_seeds():
    h = UserHistory()
    h.apply("shown", "impression", T0)
    h.apply("dwelt", "dwell", T0)
    assert h.positive_seeds(now=T0) == []
    assert h.excluded() == {"shown", "dwelt"}


def test_seed_window_drops_old_seeds():
    h = UserHistory()
    h.apply("ancient", "like", T0)
    h.apply("edge", "like", T0 + 1.0)
    h.apply("recent", "like", T0 + SEED_WINDOW_S)
    now = T0 + 1.0 + SEED_WINDOW_S
    assert h.positive_seeds(now=now) == ["recent", "edge"]
    assert h.positive_seeds(now=now, limit=1) == ["recent"]
    assert h.positive_seeds(now=now + 2 * SEED_WINDOW_S) == []
    # Old positives still count as seen.
    assert "ancient" in h.excluded()


def test_follow_records_the_author():
    h = UserHistory()
    h.apply("i", "follow", T0, "auth")
    h.apply("j", "follow", T0 + 1)  # no author: nothing to follow
    assert h.follows == {"auth": T0}


def test_history_round_trips_through_dict_and_json():
    h = UserHistory()
    h.apply("a", "like", T0, "A")
    h.apply("b", "impression", T0 + 1)
    h.apply("c", "report", T0 + 2, "C")
    h.apply("d", "follow", T0 + 3, "D")
    back = UserHistory.from_dict(orjson.loads(orjson.dumps(h.to_dict())))
    assert back == h
    assert back.positive_seeds(now=T0 + 4) == h.positive_seeds(now=T0 + 4) == ["d", "a"]
    assert back.excluded() == h.excluded()
    assert UserHistory.from_dict(None) == UserHistory() == UserHistory.from_dict({})


def test_duplicate_event_ids_are_recognised_bounded_and_persisted():
    h = UserHistory()
    assert h.is_duplicate("e1") is False
    assert h.is_duplicate("e1") is True
    back = UserHistory.from_dict(orjson.loads(orjson.dumps(h.to_dict())))
    assert back.is_duplicate("e1") is True and back.is_duplicate("e2") is False
    for i in range(MAX_EVENT_IDS):
        back.is_duplicate(f"x{i}")
    assert len(back.event_ids) == MAX_EVENT_IDS
    assert back.is_duplicate("e1") is False  # forgotten once out of the window


def test_from_dict_copies_so_stored_value_is_not_mutated():
    stored = UserHistory()
    stored.apply("a", "like", T0)
    d = orjson.loads(orjson.dumps(stored.to_dict()))
    h = UserHistory.from_dict(d)
    h.apply("b", "like", T0 + 1)
    assert [p[0] for p in d["pos"]] == ["a"] and d["seen"] == ["a"] and d["n"] == 1


# --------------------------------------------------------------------------- add_item_deltas

def ev(item, event_type="like", ts=T0, author=None, surface="explore", **extra):
    record = {"event_id": f"e-{item}-{ts}", "user_id": "u1", "item_id": item,
              "event_type": event_type, "surface": surface, "ts": ts, **extra}
    if author is not None:
        record["author_id"] = author
    return parse_event(record)


def fold(history, events, deltas=None):
    deltas = {} if deltas is None else deltas
    for e in events:
        add_item_deltas(deltas, history, e, half_life=3600.0)
        history.apply(e.item_id, e.event_type, e.ts, e.author_id)
    return deltas


def test_like_after_two_likes_coengages_both_ways_with_authors():
    h = UserHistory()
    fold(h, [ev("a", author="A", ts=T0), ev("b", author="B", ts=T0 + 1)])
    deltas = fold(h, [ev("c", author="C", ts=T0 + 2, surface="home")])
    assert deltas["c"]["author"] == "C"
    assert deltas["c"]["co"] == {"a": [1.0, "A"], "b": [1.0, "B"]}
    assert deltas["a"]["co"] == {"c": [1.0, "C"]}
    assert deltas["b"]["co"] == {"c": [1.0, "C"]}
    # The earlier items get no trending weight from c's like.
    assert deltas["a"]["trend"] == {} and deltas["b"]["trend"] == {}


def test_first_two_likes_in_one_batch_pair_with_each_other():
    deltas = fold(UserHistory(), [ev("a", author="A"), ev("b", author="B", ts=T0 + 1)])
    assert deltas["a"]["co"] == {"b": [1.0, "B"]} and deltas["b"]["co"] == {"a": [1.0, "A"]}
    assert deltas["a"]["author"] == "A"  # not overwritten by b's pairing


def test_trending_weight_lands_on_the_event_surface():
    deltas = fold(UserHistory(), [
        ev("x", "like", ts=T0, surface="home"),
        ev("x", "save", ts=T0 + 1, surface="explore"),
        ev("x", "dwell", ts=T0 + 2, surface="explore", dwell_ms=20_000),
    ])
    trend = deltas["x"]["trend"]
    assert set(trend) == {"home", "explore"}
    assert trend["home"] == [pytest.approx(EVENT_WEIGHTS["like"]), T0]
    hl = settings.trending_half_life_s
    expected = decayed(EVENT_WEIGHTS["save"], T0 + 1, T0 + 2, hl) + event_weight("dwell", 20_000)
    assert trend["explore"] == [pytest.approx(expected), T0 + 2]


def test_negative_and_neutral_events_do_not_coengage():
    h = UserHistory()
    fold(h, [ev("a")])
    deltas = fold(h, [ev("b", "impression", ts=T0 + 1), ev("c", "report", ts=T0 + 2)])
    assert deltas["b"]["co"] == {} and deltas["c"]["co"] == {}
    assert "a" not in deltas
    assert deltas["c"]["trend"]["explore"][0] == pytest.approx(EVENT_WEIGHTS["report"])


def test_coengagement_only_looks_back_a_bounded_number_of_positives():
    h = UserHistory()
    fold(h, [ev(f"p{i}", ts=T0 + i) for i in range(COENGAGEMENT_LOOKBACK + 3)])
    deltas = fold(h, [ev("new", ts=T0 + 100)])
    assert len(deltas["new"]["co"]) == COENGAGEMENT_LOOKBACK
    assert "p0" not in deltas["new"]["co"] and f"p{COENGAGEMENT_LOOKBACK + 2}" in deltas["new"]["co"]


# --------------------------------------------------------------------------- apply_delta

def test_apply_delta_merges_trend_scores_with_decay():
    stats, changed = apply_delta(None, {"author": "A", "trend": {"explore": [2.0, T0]}, "co": {}},
                                 half_life=HL)
    assert changed, "a new item's author is part of its published profile"
    assert stats == {"author": "A", "trend": {"explore": [2.0, T0]}, "nbrs": {}, "first": T0}
    stats, changed = apply_delta(stats, {"author": None, "trend": {"explore": [2.0, T0 + HL],
                                                                  "home": [1.0, T0]}}, half_life=HL)
    assert not changed, "trend scores travel in trending snapshots, not in the profile"
    assert stats["author"] == "A"
    assert stats["trend"]["explore"] == [pytest.approx(3.0), T0 + HL]
    assert stats["trend"]["home"] == [1.0, T0]
    # A late delta is decayed to the stored time, not the other way round.
    stats, _ = apply_delta(stats, {"trend": {"explore": [4.0, T0]}}, half_life=HL)
    assert stats["trend"]["explore"] == [pytest.approx(5.0), T0 + HL]


def test_apply_delta_neighbours_accumulate_and_keep_authors():
    stats, changed = apply_delta(None, {"author": "X", "trend": {},
                                        "co": {"a": [1.0, "A"], "b": [1.0, None]}}, half_life=HL)
    assert changed
    stats, changed = apply_delta(stats, {"author": None, "trend": {},
                                         "co": {"a": [2.0, None], "b": [1.0, "B"]}}, half_life=HL)
    assert changed
    assert stats["nbrs"] == {"a": [3.0, "A"], "b": [2.0, "B"]}


def test_apply_delta_caps_neighbours_keeping_the_strongest():
    co = {f"n{i}": [float(i), f"A{i}"] for i in range(MAX_NEIGHBOURS + 10)}
    stats, _ = apply_delta(None, {"co": co}, half_life=HL)
    assert len(stats["nbrs"]) == MAX_NEIGHBOURS
    assert "n0" not in stats["nbrs"]
    assert stats["nbrs"][f"n{MAX_NEIGHBOURS + 9}"] == [float(MAX_NEIGHBOURS + 9),
                                                       f"A{MAX_NEIGHBOURS + 9}"]


def test_ingest_deltas_feed_item_stats_end_to_end():
    h = UserHistory()
    batches = [fold(h, [ev("a", author="A", ts=T0)]),
               fold(h, [ev("b", author="B", ts=T0 + 1)]),
               fold(h, [ev("c", author="C", ts=T0 + 2)])]
    stats: dict = {}
    for deltas in batches:
        for item, delta in deltas.items():
            stats[item], _ = apply_delta(stats.get(item), orjson.loads(orjson.dumps(delta)),
                                         settings.trending_half_life_s)
    assert stats["a"]["nbrs"] == {"b": [1.0, "B"], "c": [1.0, "C"]}
    assert stats["c"]["nbrs"] == {"a": [1.0, "A"], "b": [1.0, "B"]}
    assert stats["b"]["author"] == "B"
    assert set(stats["a"]["trend"]) == {"explore"}


# --------------------------------------------------------------------------- module wiring

def test_ingest_module_imports_on_its_own():
    # Import afresh, as a new interpreter would, then put the original modules back.
    def ours(name):
        return name == "streams" or name.startswith("streams.")
    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved:
        del sys.modules[k]
    try:
        module = importlib.import_module("streams.ingest")
        assert callable(module.add_item_deltas)
    finally:
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_neighbour_lists_follow_new_evidence():
    """Full lists must not freeze: ties go to the neighbour just seen, and old weight decays."""
    full = {f"n{i}": 1.0 for i in range(MAX_NEIGHBOURS)}
    assert "new" in add_neighbours(full, {"new": 1.0})
    heavy_old = {f"n{i}": 3.0 for i in range(MAX_NEIGHBOURS)}
    assert "new" not in add_neighbours(heavy_old, {"new": 1.0})
    from models.coengagement import NEIGHBOUR_HALF_LIFE_S, neighbour_decay
    two_half_lives = neighbour_decay(0.0, 2 * NEIGHBOUR_HALF_LIFE_S)
    assert two_half_lives == 0.25
    assert "new" in add_neighbours(heavy_old, {"new": 1.0}, decay=two_half_lives)


def test_apply_delta_decays_old_neighbours_by_event_time():
    day = 86400.0
    stats, _ = apply_delta(None, {"author": "X", "trend": {"explore": [1.0, T0]},
                                  "co": {"a": [4.0, "A"]}}, half_life=HL)
    stats, _ = apply_delta(stats, {"trend": {"explore": [1.0, T0 + 7 * day]},
                                   "co": {"b": [1.0, "B"]}}, half_life=HL)
    assert stats["nbrs"]["a"][0] == pytest.approx(2.0)  # a week later: half the weight
    assert stats["nbrs"]["b"][0] == 1.0 and stats["nbrs_ts"] == T0 + 7 * day

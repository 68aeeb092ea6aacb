"""The item-side fold (models/item_state.py) and the offline bench that must run it.

bench/retrieval.py keeps the streaming state in-process; its answers have to be
the ones the ingest and item-stats agents would give, or its recall table
measures a fold production does not run.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from models.coengagement import MAX_NEIGHBOURS, NEIGHBOUR_HALF_LIFE_S
from models.history import UserHistory
from models.item_state import (QUALITY_KEYS, add_item_deltas, apply_delta, decode_bundle,
                               profile, total_score)
from schemas.events import NEGATIVE_TYPES, POSITIVE_TYPES, EngagementEvent

ROOT = Path(__file__).resolve().parents[1]
HL = 3600.0
T0 = 1_700_000_000.0
WEEK = 7 * 86400.0


def event(n, item, event_type="like", ts=T0, author=None, region=None, user="u1"):
    return EngagementEvent(f"e{n}", user, item, event_type, "explore", ts, author_id=author,
                           region=region)


def load_bench(name: str):
    """A bench script as a module (bench/ is scripts, not an installed package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def production_fold(events, half_life, batch):
    """What ingest (deltas per batch) and item_stats (apply_delta) keep, per item."""
    histories: dict[str, UserHistory] = {}
    stats: dict = {}
    for start in range(0, len(events), batch):
        deltas: dict = {}
        for ev in events[start:start + batch]:
            h = histories.setdefault(ev.user_id, UserHistory())
            add_item_deltas(deltas, h, ev, half_life)
            h.apply(ev.item_id, ev.event_type, ev.ts, ev.author_id)
        for item, delta in deltas.items():
            stats[item], _ = apply_delta(stats.get(item), delta, half_life)
    return stats


# --------------------------------------------------------------------------- the pure fold

def test_quality_keys_count_every_positive_and_negative_type():
    assert {t for t, k in QUALITY_KEYS.items() if k == "pos"} == POSITIVE_TYPES
    assert {QUALITY_KEYS[t] for t in NEGATIVE_TYPES} == set(NEGATIVE_TYPES)
    assert QUALITY_KEYS["impression"] == "imp" and "dwell" not in QUALITY_KEYS


def test_two_events_fold_into_counts_trend_neighbours_and_profile():
    h = UserHistory()
    deltas: dict = {}
    for ev in (event(1, "a", author="A"), event(2, "b", "click", ts=T0 + HL, author="B",
                                                region="eu")):
        add_item_deltas(deltas, h, ev, HL)
        h.apply(ev.item_id, ev.event_type, ev.ts, ev.author_id)
    assert set(deltas["b"]["trend"]) == {"explore", "explore@eu"}
    stats = {item: apply_delta(None, d, HL)[0] for item, d in deltas.items()}
    assert stats["a"]["q"] == {"pos": 1} and stats["b"]["q"] == {"pos": 1}
    assert stats["a"]["trend"]["explore"] == [2.0, T0]
    # "b" was engaged after "a": each is the other's neighbour, with its author.
    assert profile(stats["a"])["nbrs"] == [["b", 1.0, "B"]]
    assert profile(stats["b"]) == {"author": "B", "q": {"pos": 1}, "first": T0 + HL,
                                   "nbrs": [["a", 1.0, "A"]]}
    assert total_score(stats["b"]["trend"], HL) == [2.0, T0 + HL]


def test_neighbours_decay_by_event_time_and_stay_bounded():
    stats, _ = apply_delta(None, {"author": "X", "trend": {"explore": [1.0, T0]},
                                  "co": {f"n{i}": [1.0, None] for i in range(MAX_NEIGHBOURS)}},
                           HL)
    stats, _ = apply_delta(stats, {"trend": {"explore": [1.0, T0 + NEIGHBOUR_HALF_LIFE_S]},
                                   "co": {"new": [0.75, "N"]}}, HL)
    assert len(stats["nbrs"]) == MAX_NEIGHBOURS
    assert stats["nbrs"]["new"] == [0.75, "N"]  # beats the old ones, now worth 0.5
    assert stats["nbrs"]["n1"][0] == pytest.approx(0.5)


def test_decode_bundle_refuses_what_apply_delta_cannot_read():
    assert decode_bundle(b'{"i": {"co": {"j": [1.0, null]}}}') == {"i": {"co": {"j": [1.0, None]}}}
    assert "not JSON" in decode_bundle(b"{")
    assert "must be an object" in decode_bundle(b'{"i": 3}')
    assert "'co'" in decode_bundle(b'{"i": {"co": {"j": 1}}}')


# --------------------------------------------------------------------------- the bench

def bench_view(events, half_life, batch):
    retrieval = load_bench("retrieval")
    state = retrieval.LiveState(half_life, batch=batch)
    for ev in events:
        state.apply(ev)
    state.flush()
    return retrieval.ReplayView(state, {}, None)


def test_bench_state_is_the_production_fold():
    """bench/retrieval.py's ItemView answers what the agents' fold would publish:
    regional trending boards, neighbours decayed by event time, quality counts, age."""
    events = [event(1, "old", author="O", ts=T0), event(2, "x", author="X", ts=T0 + 1),
              # A week later u1 likes "y" (pairs with "old" and "x"); u2, in "eu",
              # clicks "x" and rejects "z".
              event(3, "y", author="Y", ts=T0 + WEEK), event(4, "x", "click", ts=T0 + WEEK + 1,
                                                          author="X", user="u2", region="eu"),
              event(5, "z", "see_less", ts=T0 + WEEK + 2, author="Z", user="u2", region="eu")]
    view = bench_view(events, HL, batch=2)
    want = production_fold(events, HL, batch=2)
    for item, stats in want.items():
        published = profile(stats)
        assert view.neighbours(item) == [tuple(n) for n in published["nbrs"]], item
        assert view.quality(item) == (published["q"] or None), item
        assert view.first_seen(item) == published["first"], item
        assert view.author_of(item) == published["author"], item
    # x's neighbour "old" came a week before "y": it counts half as much.
    assert dict((o, w) for o, w, _ in view.neighbours("x")) == {
        "old": pytest.approx(0.5), "y": 1.0}
    now = T0 + WEEK + 2
    # z's see_less scores it below zero: it trends nowhere.
    assert [i for i, _, _ in view.trending("explore@eu", 10, now)] == ["x"]
    assert {i for i, _, _ in view.trending("explore", 10, now)} == {"old", "x", "y"}

"""bench/final_list.py's scoring and the training examples it builds from the replay."""
from __future__ import annotations


import pytest

from schemas.events import EngagementEvent
from tests.test_item_state import load_bench

T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def bench():
    return load_bench("final_list")


def event(n, user, item, event_type, ts, author=None):
    return EngagementEvent(f"e{n}", user, item, event_type, "explore", ts, author_id=author)


def test_hit_rate_and_ndcg_of_returned_lists(bench):
    tally = bench.ListTally(k=3)
    tally.add(["a", "b", "c"], "a")   # first place: 1
    tally.add(["a", "b", "c"], "c")   # third place: 1 / log2(4) = 0.5
    tally.add(["a", "b", "c", "d"], "d")  # beyond k: a miss
    tally.add([], "a")
    got = tally.result()
    assert got["hit_rate@3"] == 0.5
    assert got["ndcg@3"] == pytest.approx((1 + 0.5) / 4, abs=1e-4)
    assert got["mean_returned"] == 2.5
    assert "median_likes_of_returned" not in got
    tally.add(["a", "b", "x"], "b", likes={"a": 5, "b": 1})
    assert tally.result()["median_likes_of_returned"] == 1.0  # of 5, 1 and 0


def test_rating_examples_read_the_state_before_the_rating(bench):
    retrieval = load_bench("retrieval")
    state = retrieval.LiveState(3600.0, batch=1)
    view = retrieval.ReplayView(state, {}, None)
    for ev in (event(1, "u2", "pop", "click", T0, "P"), event(2, "u2", "pop", "like", T0, "P"),
               event(3, "u1", "seen", "click", T0 + 1, "S"),
               event(4, "u1", "seen", "like", T0 + 1, "S")):
        state.apply(ev)
    state.flush()
    group = [event(5, "u1", "new", "click", T0 + 60, "N"),
             event(6, "u1", "new", "like", T0 + 60, "N")]
    from models.movielens import IgnoredImpressions
    passed_over = IgnoredImpressions({"u1": {"seen", "new"}}, seed=0)
    for movie in ("seen", "pop"):
        passed_over.liked(movie)
    examples = bench.rating_examples(state, view, group, 0, 2, passed_over)
    rated, *negatives = examples
    assert rated.item_id == "new" and rated.author_id == "N" and rated.position == 0
    assert rated.labels == {"click": 1, "like": 1, "see_less": 0}
    assert rated.user_recent == ["seen"] and rated.user_authors == {"S": 1}
    assert rated.item_counts == {} and rated.item_age_s == 0.0  # "new" is not in the state yet
    # Negatives: liked movies the user never rated, each once, labelled 0, with the
    # item's own features.
    assert [n.item_id for n in negatives] == ["pop"]
    assert all(n.labels == {"click": 0, "like": 0, "see_less": 0} for n in negatives)
    assert negatives[0].author_id == "P" and negatives[0].item_counts == {"pos": 2}
    assert negatives[0].item_age_s == 60.0
    assert "new" in passed_over.draw("u3", 3), "a liked rating joins the draw afterwards"

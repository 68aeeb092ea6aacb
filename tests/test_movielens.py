"""One MovieLens rating -> engagement mapping, for the live replay and the benches."""
from __future__ import annotations

import pytest

from models.features import labels_from_events
from models.movielens import RATED_HEADS, rating_labels
from streams.replay import Rating, to_events


@pytest.mark.parametrize("stars", [1, 2, 3, 4, 5])
def test_replayed_events_label_like_the_benches(stars):
    """What the label join makes of the replay's events is what bench/quality.py trains on."""
    events = list(to_events([Rating(7, 42, stars, 1000)], {42: "genre:Drama"}, end_at=2000.0,
                            time_scale=1.0, impressions=True))
    assert events[0].event_type == "impression"
    assert len({ev.event_id for ev in events}) == len(events), "dedupe would drop an event"
    assert all(ev.ts == 2000.0 and ev.item_id == "42" for ev in events)
    joined = labels_from_events([ev.event_type for ev in events[1:]], None)
    assert {h: joined[h] for h in RATED_HEADS} == rating_labels(stars)


def test_a_good_rating_is_a_click_then_a_like():
    events = list(to_events([Rating(7, 42, 5, 1000)], {}, end_at=1000.0, time_scale=1.0))
    assert [ev.event_type for ev in events] == ["click", "like"]

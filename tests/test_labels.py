"""The label join: windows close on event time, skewed clocks and early engagements."""
from __future__ import annotations

import pytest

from models.history import UserHistory
from models.labels import MAX_ORPHANS, EventClock, PendingLabels
from schemas.events import MAX_FUTURE_SKEW_S, EngagementEvent
from streams import labels, metrics

T0 = 1_700_000_000.0
WINDOW = 1800.0
IDLE = 120.0


def engagement(item, kind, ts, request_id=None):
    return EngagementEvent(event_id=f"{item}-{kind}-{ts}", user_id="u1", item_id=item,
                           event_type=kind, surface="explore", ts=ts, request_id=request_id)


@pytest.fixture
def fresh_clocks(monkeypatch):
    monkeypatch.setattr(labels, "clocks", {})


def test_busy_partition_keeps_an_impression_open_past_the_wall_window():
    """A save three minutes after the impression, on a partition whose events keep coming."""
    clock, p = EventClock(idle_s=IDLE), PendingLabels(window_s=WINDOW)
    p.impression("i1", "r1", ts=T0, features={})
    for t in range(0, 171, 10):  # other users' events move event time with the wall clock
        clock.advance(T0 + t, now=T0 + t)
    assert p.due(watermark=clock.at(now=T0 + 170.0)) == []
    assert p.engagement("i1", "r1", "save", ts=T0 + 175.0) == "joined"
    clock.advance(T0 + WINDOW, now=T0 + WINDOW)
    [example] = p.due(watermark=clock.at(now=T0 + WINDOW))
    assert example["labels"]["save"] == 1 and example["labels"]["click"] == 0


def test_quiet_partition_closes_once_idle_time_covers_the_window():
    clock, p = EventClock(idle_s=IDLE), PendingLabels(window_s=WINDOW)
    p.impression("i1", "r1", ts=T0, features={})
    clock.advance(T0, now=T0)  # the partition's last event
    assert p.due(watermark=clock.at(now=T0 + IDLE + WINDOW - 1.0)) == []
    [example] = p.due(watermark=clock.at(now=T0 + IDLE + WINDOW))
    assert sum(example["labels"].values()) == 0, "nobody engaged: a negative"


def test_an_event_after_a_quiet_spell_brings_the_clock_back_to_event_time():
    clock = EventClock(idle_s=IDLE)
    clock.advance(T0, now=T0)
    assert clock.at(now=T0 + IDLE + 50.0) == T0 + 50.0
    clock.advance(T0 + 10.0, now=T0 + IDLE + 50.0)
    assert clock.at(now=T0 + IDLE + 50.0) == T0 + 10.0


def test_a_future_stamped_event_does_not_close_open_impressions(fresh_clocks):
    partition = 3
    p = PendingLabels(window_s=WINDOW)
    p.impression("i1", "r1", ts=T0, features={})
    labels.advance_watermark(partition, T0 + 86_000.0, now=T0)  # a clock a day ahead
    assert labels.due_examples(p, partition, now=T0 + 1.0) == []
    assert labels.clocks[partition].at(now=T0) == T0 + MAX_FUTURE_SKEW_S
    # Event time that really passes still closes the window.
    labels.advance_watermark(partition, T0 + WINDOW, now=T0 + WINDOW)
    assert [e["item_id"] for e in labels.due_examples(p, partition, now=T0 + WINDOW)] == ["i1"]


def test_an_engagement_before_its_impression_is_kept_and_attached():
    p = PendingLabels(window_s=WINDOW)
    assert p.engagement("i1", "r1", "like", ts=T0 + 0.5) == "waiting"
    assert p.engagement("i1", "r2", "share", ts=T0 + 0.5) == "waiting"  # another request
    # The state goes through the table (and survives a restart) in between.
    p = PendingLabels(p.to_dict(), window_s=WINDOW)
    assert p.impression("i1", "r1", ts=T0, features={}) == 1
    [example] = p.due(watermark=T0 + 0.5 + WINDOW)
    assert example["labels"]["like"] == 1 and example["labels"]["share"] == 0
    assert p.unmatched == 1 and p.orphans == [], "the other request's share waited in vain"


def test_orphans_are_bounded_per_user():
    p = PendingLabels(window_s=WINDOW)
    for i in range(MAX_ORPHANS + 5):
        p.engagement(f"i{i}", None, "like", ts=T0 + i)
    assert len(p.orphans) == MAX_ORPHANS and p.unmatched == 5
    assert p.orphans[0]["item_id"] == "i5", "the oldest go first"


def test_an_engagement_after_its_impression_closed_is_counted_late():
    p = PendingLabels(window_s=WINDOW)
    p.impression("i1", "r1", ts=T0, features={})
    assert len(p.due(watermark=T0 + WINDOW)) == 1
    before = metrics.counters["late_engagements"]
    labels.label_event(p, UserHistory(), engagement("i1", "save", T0 + 60.0, "r1"))
    assert metrics.counters["late_engagements"] == before + 1
    assert p.orphans == [], "a late engagement does not wait for another impression"
    # Closed impressions are forgotten one window after their close.
    p.due(watermark=T0 + 2 * WINDOW)
    assert p.empty


def test_state_stored_before_orphans_were_kept_is_read():
    old = {"r1|i1": {"item_id": "i1", "request_id": "r1", "ts": T0, "arrived": T0, "labels": {}}}
    p = PendingLabels(old, window_s=WINDOW)
    assert p.engagement("i1", "r1", "click", ts=T0 + 1.0) == "joined"
    [example] = p.due(watermark=T0 + WINDOW)
    assert example["labels"]["click"] == 1 and "arrived" not in example


def test_engagements_of_users_without_label_state_wait_only_when_they_name_a_request(
        monkeypatch):
    """A producer that logs no impressions (a ratings replay) must not put every user
    in the label table; an engagement that answers a served list may wait."""
    monkeypatch.setattr(labels, "label_users", {0: set()})
    assert labels.pending_for("u1", 0, [engagement("i1", "like", T0)], now=T0) is None
    waiting = labels.pending_for("u1", 0, [engagement("i1", "like", T0, "r1")], now=T0)
    assert waiting is not None and waiting.empty

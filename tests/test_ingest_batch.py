"""Batch folding: folding a batch at once gives what folding it event by event gave.

Ingest folds a batch's events into one delta per item and source, and the item
side folds a batch's deltas of an item into one write; these tests hold both to
the event-by-event fold they replace.
"""
from __future__ import annotations

import random

import pytest

from models.coengagement import coengagement_pairs, neighbour_decay
from models.history import MAX_EVENT_IDS, MAX_SEEN, UserHistory
from models.item_state import (COENGAGEMENT_LOOKBACK, add_item_deltas, apply_delta, apply_sourced,
                               fold_sourced, merge_delta, profile)
from models.trending import event_weight, merge_score
from schemas.events import EVENT_TYPES, POSITIVE_TYPES, EngagementEvent

T0 = 1_700_000_000.0
HL = 3600.0


def random_events(seed: int, n: int = 400) -> list:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        kind = rng.choice(EVENT_TYPES)
        item = f"i{rng.randrange(25)}"
        out.append(EngagementEvent(
            f"e{k}", f"u{rng.randrange(6)}", item, kind, rng.choice(["home", "explore"]),
            T0 + k * rng.uniform(0, 120), author_id=rng.choice([None, f"a{item}"]),
            dwell_ms=rng.randrange(60_000) if kind == "dwell" else None,
            region=rng.choice([None, "eu"])))
    return out


def reference_deltas(deltas: dict, history: UserHistory, ev) -> None:
    """The per-event fold as it was written before, with coengagement_pairs."""
    d = deltas.setdefault(ev.item_id, {"author": ev.author_id, "trend": {}, "co": {}})
    if ev.author_id is not None:
        d["author"] = ev.author_id
    counts = d.setdefault("counts", {})
    counts[ev.event_type] = counts.get(ev.event_type, 0) + 1
    weight = event_weight(ev.event_type, ev.dwell_ms)
    for key in (ev.surface, f"{ev.surface}@{ev.region}") if ev.region else (ev.surface,):
        d["trend"][key] = merge_score(d["trend"].get(key), weight, ev.ts, HL)
    if ev.event_type in POSITIVE_TYPES:
        recent = history.positives[-COENGAGEMENT_LOOKBACK:]
        authors = {p[0]: p[2] for p in recent}
        for src, dst, w in coengagement_pairs([p[0] for p in recent], ev.item_id):
            dd = deltas.setdefault(src, {"author": None, "trend": {}, "co": {}})
            prev = dd["co"].get(dst)
            dd["co"][dst] = [(prev[0] if prev else 0.0) + w,
                             ev.author_id if dst == ev.item_id else authors.get(dst)]


@pytest.mark.parametrize("seed", range(5))
def test_add_item_deltas_is_the_pairwise_fold(seed):
    events = random_events(seed)
    got, want = {}, {}
    histories: dict = {}
    for ev in events:
        h = histories.setdefault(ev.user_id, UserHistory())
        add_item_deltas(got, h, ev, HL)
        reference_deltas(want, h, ev)
        h.apply(ev.item_id, ev.event_type, ev.ts, ev.author_id)
    assert got == want
    assert list(got) == list(want)  # the same order: ties between neighbours break alike
    assert any(d["co"] for d in got.values())


def sourced_parts(events, per_part: int):
    """Events of one source folded ``per_part`` at a time: [(part, {item: delta})]."""
    histories: dict = {}
    parts = []
    for start in range(0, len(events), per_part):
        items: dict = {}
        for ev in events[start:start + per_part]:
            h = histories.setdefault(ev.user_id, UserHistory())
            add_item_deltas(items, h, ev, HL)
            h.apply(ev.item_id, ev.event_type, ev.ts, ev.author_id)
        parts.append(({"src": "events/0", "from": [start, 0],
                       "to": [min(start + per_part, len(events)) - 1, 0]}, items))
    return parts


@pytest.mark.parametrize("seed", range(5))
def test_fold_sourced_is_apply_sourced_delta_by_delta(seed):
    """One write per item per batch: counts, marks, age and author as delta by delta;
    trend scores and neighbour weights up to rounding and the decay between deltas."""
    events = random_events(seed)
    parts = sourced_parts(events, per_part=7)
    # Merged, earlier deltas skip the decay to the later ones: at most this much.
    span = neighbour_decay(events[0].ts, max(ev.ts for ev in events))
    # The batch the item side sees: every part once, then some again (a redelivery).
    rng = random.Random(seed)
    arriving = parts + rng.sample(parts, 10)
    sent = repr(arriving)
    one, batch = {}, {}
    verdicts = {"applied": 0, "duplicate": 0}
    for part, items in arriving:
        for item, delta in items.items():
            one[item], _, verdict = apply_sourced(one.get(item), delta, part["src"], part["from"],
                                                  part["to"], HL)
            verdicts[verdict] += 1
            batch.setdefault(item, []).append((part, delta))
    got_verdicts = {"applied": 0, "duplicate": 0}
    for item, deltas in batch.items():
        stats, changed, v = fold_sourced(None, deltas, HL)
        assert changed
        for k, n in v.items():
            got_verdicts[k] += n
        want = one[item]
        assert stats["q"] == want["q"] and stats["src"] == want["src"]
        assert stats.get("first") == want.get("first") and stats["author"] == want["author"]
        assert stats["trend"].keys() == want["trend"].keys()
        for surface, (score, ts) in want["trend"].items():
            assert stats["trend"][surface] == [pytest.approx(score), ts]
        assert set(stats["nbrs"]) == set(want["nbrs"])
        for other, (weight, author) in want["nbrs"].items():
            assert weight - 1e-9 <= stats["nbrs"][other][0] <= weight / span + 1e-9
    assert got_verdicts == verdicts and verdicts["duplicate"] > 0
    assert repr(arriving) == sent  # a failed batch is retried from the same deltas


def test_fold_sourced_skips_a_whole_redelivered_batch_and_changes_nothing():
    parts = sourced_parts(random_events(1, n=40), per_part=40)
    (part, items), = parts
    item, delta = next(iter(items.items()))
    stats, _, _ = fold_sourced(None, [(part, delta)], HL)
    before = profile(stats)
    again, changed, verdicts = fold_sourced(stats, [(part, delta), (part, delta)], HL)
    assert (changed, dict(verdicts), profile(again)) == (False, {"duplicate": 2}, before)


def test_merge_delta_keeps_the_first_engagement_and_never_changes_its_input():
    a = {"author": "A", "trend": {"home": [1.0, T0 + 60]}, "counts": {"like": 1}, "co": {}}
    b = {"author": None, "trend": {"home": [1.0, T0]}, "co": {"x": [1.0, None]}}
    copies = repr(a), repr(b)
    merged = merge_delta(merge_delta(None, a, HL), b, HL)
    assert (repr(a), repr(b)) == copies
    stats, _ = apply_delta(None, merged, HL)
    assert stats["first"] == T0 and stats["author"] == "A" and stats["q"] == {"pos": 1}


def test_is_duplicate_remembers_the_last_ids_with_a_set():
    h = UserHistory.from_dict({"ids": [f"e{k}" for k in range(MAX_EVENT_IDS)]})
    assert h.is_duplicate("e0") and h.is_duplicate(f"e{MAX_EVENT_IDS - 1}")
    assert not h.is_duplicate("new")
    assert len(h.event_ids) == MAX_EVENT_IDS and h.event_ids[-1] == "new"
    assert not h.is_duplicate("e0")          # pushed out by "new"; then remembered again
    assert h.is_duplicate("e0") and not h.is_duplicate("e1")
    assert UserHistory.from_dict(h.to_dict()).event_ids == h.event_ids


def test_history_apply_repeats_keep_one_entry_per_item():
    h = UserHistory()
    for kind, ts in (("impression", 1.0), ("click", 2.0), ("like", 3.0), ("see_less", 4.0),
                     ("like", 5.0), ("like", 6.0)):
        h.apply("i", kind, T0 + ts, "a")
    h.apply("j", "click", T0 + 7, "b")
    h.apply("i", "like", T0 + 8, "a")
    assert h.seen == ["j", "i"] and h.negatives == ["i"]
    assert h.positives == [["j", T0 + 7, "b"], ["i", T0 + 8, "a"]]


def test_seen_stays_bounded_and_ordered_with_its_set():
    h = UserHistory()
    for k in range(MAX_SEEN + 100):
        h.apply(f"i{k}", "impression", T0 + k)
    assert len(h.seen) == MAX_SEEN and h.seen[0] == "i100"
    h.apply("i5", "impression", T0)       # fell out: comes back as new, i100 goes
    h.apply("i300", "impression", T0)     # still there: moves to the newest end
    assert h.seen[-2:] == ["i5", "i300"] and len(h.seen) == MAX_SEEN
    assert len(set(h.seen)) == MAX_SEEN and h.seen[0] == "i101"

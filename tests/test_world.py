"""The simulated world: bounded, monotone, reproducible, drifting, and the policies on it."""
from __future__ import annotations

import numpy as np
import pytest

from models.policies import oracle_policy, popularity_policy, random_policy, served_value
from models.world import (BASE_LOGITS, ENGAGEMENT_HEADS, World, WorldConfig, head_probabilities,
                          sample_engagements)

BASE = [BASE_LOGITS[h] for h in ENGAGEMENT_HEADS]
COL = {h: j for j, h in enumerate(ENGAGEMENT_HEADS)}
SMALL = WorldConfig(n_users=30, n_authors=8, items_per_author=10, seed=7)


def probs(affinity=0.5, objectionable=0.0, seen=1.0, noise=0.0):
    return head_probabilities(affinity, 0.5, 0.5, 0.5, 0.5, objectionable, 0.0, seen, BASE, noise)


def test_probabilities_are_bounded_everywhere():
    rng = np.random.default_rng(0)
    n = 5000
    p = head_probabilities(rng.random(n), rng.random(n), rng.random(n), rng.random(n),
                           rng.random(n), rng.random(n) < 0.5, rng.normal(0, 5, n),
                           rng.random(n), rng.normal(0, 3, (len(BASE),)), rng.uniform(-1, 1, n))
    assert p.shape == (n, len(ENGAGEMENT_HEADS))
    assert np.all((p >= 0) & (p <= 1))
    # After-click heads never exceed the click probability.
    for head in ("like", "save", "share", "comment", "follow", "long_dwell"):
        assert np.all(p[:, COL[head]] <= p[:, COL["click"]] + 1e-12)


def test_monotone_in_affinity_and_position():
    a = np.linspace(0, 1, 21)
    p = probs(affinity=a)
    for head in ("click", "like", "save", "share", "comment", "follow", "long_dwell"):
        assert np.all(np.diff(p[:, COL[head]]) > 0), head
    for head in ("see_less", "report"):
        assert np.all(np.diff(p[:, COL[head]]) < 0), head
    w = World(SMALL)
    by_position = np.array([list(w.true_probabilities(0, 3, pos, 0.0).values())
                            for pos in range(10)])
    assert np.all(np.diff(by_position, axis=0) < 0)


def test_objectionable_raises_see_less_and_report():
    clean, bad = probs(objectionable=0.0)[0], probs(objectionable=1.0)[0]
    assert bad[COL["see_less"]] > 2 * clean[COL["see_less"]]
    assert bad[COL["report"]] > 5 * clean[COL["report"]]
    assert bad[COL["click"]] < clean[COL["click"]]


def test_noise_is_bounded():
    w = World(WorldConfig(n_users=50, n_authors=10, items_per_author=10, noise=0.3))
    pair = w.item_noise @ w.user_noise.T
    assert np.abs(pair).max() <= 1.0 + 1e-9


def world_fingerprint(cfg: WorldConfig):
    w = World(cfg)
    w.step(120.0)
    events = [e.to_dict() for u in range(5) for e in w.events_for(u, list(range(u, u + 8)), f"r{u}", 60.0)]
    return w.item_topics.copy(), w.interests.copy(), events


def test_same_seed_same_world_and_samples_different_seed_differs():
    t1, i1, e1 = world_fingerprint(SMALL)
    t2, i2, e2 = world_fingerprint(SMALL)
    assert np.array_equal(t1, t2) and np.array_equal(i1, i2) and e1 == e2
    t3, i3, e3 = world_fingerprint(WorldConfig(**{**SMALL.__dict__, "seed": 8}))
    assert not np.array_equal(i1, i3) and e1 != e3


def test_sudden_shift_and_gradual_drift_change_interests():
    w = World(WorldConfig(n_users=20, n_authors=4, items_per_author=5, shift_at=100.0,
                          drift_per_minute=0.05))
    before, just_before, after = (np.array([w.interest_at(u, t) for u in range(20)])
                                  for t in (0.0, 99.0, 100.0))
    gradual = np.abs(just_before - before).sum(axis=1)
    sudden = np.abs(after - just_before).sum(axis=1)
    assert 0 < gradual.mean() < sudden.mean()
    # The shift changes what the user likes: the oracle's picks change.
    cands = w.live_items(0.0)
    assert oracle_policy(w, 0, cands, 5, 99.0) != oracle_policy(w, 0, cands, 5, 100.0)


def test_item_creation_adds_fresh_items_step_size_does_not_matter():
    cfg = WorldConfig(n_users=5, n_authors=4, items_per_author=5, items_per_minute=30)
    a, b = World(cfg), World(cfg)
    assert a.n_items == 20
    a.step(60.0)
    for t in np.arange(0.5, 60.5, 0.5):
        b.step(float(t))
    assert a.n_items == b.n_items == 50
    assert np.array_equal(a.item_topics, b.item_topics)
    fresh = np.arange(20, 50)
    assert set(fresh) <= set(a.live_items(60.0).tolist())
    assert np.all(a.item_created[fresh] > 0)
    # Fresh items appeal more than the same item a day later.
    assert a.true_probabilities(0, 49, 0, 60.0)["click"] > a.true_probabilities(0, 49, 0, 86400.0)["click"]


def test_viral_burst_lifts_one_item():
    w = World(WorldConfig(n_users=5, n_authors=4, items_per_author=5, burst_at=30.0,
                          drift_per_minute=0.0))
    item = w.burst_item
    assert w.true_probabilities(0, item, 0, 31.0)["click"] > w.true_probabilities(0, item, 0, 29.0)["click"]
    other = (item + 1) % w.n_items
    assert w.true_probabilities(0, other, 0, 31.0) == pytest.approx(w.true_probabilities(0, other, 0, 29.0))


def test_oracle_beats_popularity_and_random():
    w = World(SMALL)
    # Some observed history so popularity has something to go on.
    for u in range(SMALL.n_users):
        w.events_for(u, random_policy(w, u, w.candidates(u), 10, 0.0), f"warm{u}", 0.0)
    totals = {"random": 0.0, "popularity": 0.0, "oracle": 0.0}
    for u in range(SMALL.n_users):
        cands = w.candidates(u)
        for name, policy in (("random", random_policy), ("popularity", popularity_policy),
                             ("oracle", oracle_policy)):
            totals[name] += served_value(w, u, policy(w, u, cands, 10, 0.0), 0.0)[0]
    assert totals["oracle"] > totals["popularity"] and totals["oracle"] > totals["random"]
    assert totals["oracle"] > 2 * max(totals["random"], totals["popularity"], 0.1)


def test_sampled_rates_converge_to_true_probabilities():
    p = dict(zip(ENGAGEMENT_HEADS, probs(affinity=0.8)[0]))
    rng = np.random.default_rng(123)
    n = 40_000
    hits = {h: 0 for h in ENGAGEMENT_HEADS}
    for _ in range(n):
        for head in sample_engagements(p, rng):
            hits[head] += 1
    for head, prob in p.items():
        sigma = np.sqrt(prob * (1 - prob) / n)
        assert abs(hits[head] / n - prob) < 4 * sigma + 1e-4, head


def test_events_follow_the_conditional_structure():
    w = World(SMALL)
    events = []
    for u in range(SMALL.n_users):
        events += w.events_for(u, list(range(10)), f"r{u}", 0.0)
    by_slot: dict = {}
    for e in events:
        by_slot.setdefault((e.request_id, e.item_id), []).append(e)
    for slot in by_slot.values():
        kinds = [e.event_type for e in slot]
        assert kinds.count("impression") == 1
        if {"like", "save", "share", "comment", "follow", "dwell"} & set(kinds):
            assert "click" in kinds
        assert all(e.dwell_ms is not None for e in slot if e.event_type == "dwell")
        assert len({e.event_id for e in slot}) == len(slot)
    assert all(e.user_id.startswith("sim-u") and e.author_id.startswith("sim-a") for e in events)


def test_a_tagged_world_names_every_id_in_its_namespace_and_only_parses_its_own():
    from models.world import item_id, namespace, parse_item
    tagged = World(WorldConfig(**{**SMALL.__dict__, "tag": "run7"}))
    events = tagged.events_for(0, [1, 2], "r", 0.0)
    assert all(e.user_id.startswith("sim-run7-u") and e.item_id.startswith("sim-run7-i")
               and e.author_id.startswith("sim-run7-a") for e in events)
    assert all(e.item_id.startswith(namespace("run7")) for e in events)
    assert parse_item(item_id(12, "run7"), "run7") == 12
    assert parse_item(item_id(12, "run8"), "run7") is None and parse_item("sim-i12", "run7") is None
    # The tag names the ids only: the same seed gives the same world and the same draws.
    plain = World(SMALL).events_for(0, [1, 2], "r", 0.0)
    assert [(e.event_type, e.position) for e in events] == [(e.event_type, e.position) for e in plain]
    with pytest.raises(ValueError):
        WorldConfig(tag="a-b")

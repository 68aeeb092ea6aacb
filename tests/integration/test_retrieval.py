"""Retrieval against the real broker: pre-generated batches, live funnel config, freshness."""
from __future__ import annotations

import time

import pytest

from streams.client import RecommendationClient
from streams.producer import EventProducer

from .conftest import new_event

pytestmark = pytest.mark.integration


def seed_world(kafka, worker, prefix: str) -> None:
    """Three taste groups: users in a group like the same five items."""
    before = worker.counter("events_applied")
    with EventProducer(kafka) as p:
        for g in range(3):
            for u in range(4):
                for i in range(5):
                    p.send(new_event(f"{prefix}u{g}-{u}", f"{prefix}g{g}-i{i}", "like",
                                     author=f"{prefix}author{g}-{i % 2}"))
    worker.wait_for("events_applied", before + 60, timeout=30)
    worker.wait_drained(timeout=30)


def test_pregen_batch_goes_live_and_feeds_ann_sources(kafka, worker):
    from streams.pregen import run
    seed_world(kafka, worker, "pg-")
    result = run(kafka, progress=False)
    assert result["parts"] >= 2 and result["events"] >= 60
    deadline = time.time() + 20
    while worker.stats()["shared_view"]["pregen_version"] != result["version"]:
        assert time.time() < deadline, "worker did not switch to the new pre-generated batch"
        time.sleep(0.2)
    # A new user who liked one item of group 1 gets that group's other items from the
    # embedding-based sources, with reasons.
    with EventProducer(kafka) as p:
        p.send(new_event("pg-newbie", "pg-g1-i0", "like", author="pg-author1-0"))
    worker.wait_drained(timeout=30)
    with RecommendationClient(kafka) as client:
        deadline = time.time() + 10
        while True:
            reply = client.recommend("pg-newbie", "explore", k=10, timeout=2.0)
            ann = [i for i in reply.items if {"history", "embedding"} & set(i.sources)]
            if ann or time.time() > deadline:
                break
            time.sleep(0.2)
    assert ann, f"no ANN-sourced items in {reply.items}"
    assert {i.item_id for i in ann} & {f"pg-g1-i{n}" for n in range(1, 5)}
    assert all(i.why for i in reply.items)
    assert "pg-g1-i0" not in {i.item_id for i in reply.items}


def test_funnel_config_changes_apply_without_restart(kafka, worker):
    from streams.pregen import set_funnel_config
    seed_world(kafka, worker, "cf-")
    with RecommendationClient(kafka) as client:
        before = client.recommend("cf-u0-0", "explore", k=10, timeout=2.0)
        assert {s for i in before.items for s in i.sources} - {"trending"}
        set_funnel_config(kafka, "explore", {"sources": {"trending": {"weight": 1, "fetch": 50}}})
        try:
            deadline = time.time() + 10
            while True:
                after = client.recommend("cf-u0-0", "explore", k=10, timeout=2.0)
                if all(i.sources == ("trending",) for i in after.items) or time.time() > deadline:
                    break
                time.sleep(0.2)
            assert after.items and all(i.sources == ("trending",) for i in after.items)
        finally:
            set_funnel_config(kafka, "explore", None)


def test_fresh_like_changes_candidates_within_a_second(kafka, worker):
    seed_world(kafka, worker, "fr-")
    time.sleep(1.0)  # let profiles (co-engagement neighbours) reach the shared view
    with RecommendationClient(kafka) as client:
        before = client.recommend("fr-fresh", "explore", k=20, timeout=2.0)
        assert not any("coengagement" in i.sources for i in before.items)
        with EventProducer(kafka) as p:
            p.send(new_event("fr-fresh", "fr-g2-i0", "like", author="fr-author2-0"))
        sent = time.time()
        while True:
            reply = client.recommend("fr-fresh", "explore", k=20, timeout=2.0)
            if any("coengagement" in i.sources for i in reply.items):
                break
            assert time.time() - sent < 5.0, "candidates did not change"
        elapsed = time.time() - sent
    print(f"\nfresh like -> changed candidates in {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0
    assert {i.item_id for i in reply.items if "coengagement" in i.sources} <= {
        f"fr-g2-i{n}" for n in range(1, 5)}

"""The worker against a real broker: ingest, dead letters, serving, restart."""
from __future__ import annotations

import shutil
import subprocess
import time

import orjson
import pytest

from schemas.deadletter import original_bytes
from schemas.topics import EVENTS_DLQ, changelog_name, partition_for
from streams.client import RecommendationClient
from streams.producer import EventProducer
from streams.settings import settings

from .conftest import latest_by_key, new_event, read_topic

pytestmark = pytest.mark.integration
HISTORY_CHANGELOG = changelog_name(settings.app_id, "user_history")


def history_of(bootstrap: str, user: str, want_n: int) -> dict:
    """The user's latest history as written to the table's changelog."""
    key = orjson.dumps(user)

    def done(msgs):
        value = latest_by_key(msgs).get(key)
        return value is not None and value.get("n", 0) >= want_n
    return latest_by_key(read_topic(bootstrap, HISTORY_CHANGELOG, until=done)).get(key)


def test_events_reach_the_user_history_table(kafka, worker):
    before = worker.counter("events_applied")
    events = [new_event("alice", f"a{i}", "like", author="auth1") for i in range(3)]
    events += [new_event("alice", "a9", "report"), new_event("bob", "b1", "click")]
    with EventProducer(kafka) as p:
        for e in events:
            p.send(e)
    worker.wait_for("events_applied", before + 5, timeout=30)
    alice = history_of(kafka, "alice", 4)
    assert alice["n"] == 4
    assert [p[0] for p in alice["pos"]] == ["a0", "a1", "a2"]
    assert alice["neg"] == ["a9"]
    assert history_of(kafka, "bob", 1)["n"] == 1


def test_duplicates_are_not_counted_twice(kafka, worker):
    ev = new_event("dup-user", "d1", "like")
    before = worker.counter("duplicates_dropped")
    with EventProducer(kafka) as p:
        p.send(ev)
        p.send(ev)
    worker.wait_for("duplicates_dropped", before + 1, timeout=30)
    assert history_of(kafka, "dup-user", 1)["n"] == 1


def test_bad_events_go_to_the_dead_letter_topic_with_reasons(kafka, worker):
    good = new_event("carol", "c1", "like")
    bad = {**new_event("carol", "c2"), "event_type": "poke"}
    batch = orjson.dumps([good, bad])
    before = worker.counter("dead_letters")
    with EventProducer(kafka) as p:
        p.send_raw(b"carol", b"{not json")
        p.send_raw(b"carol", orjson.dumps({**new_event("carol", "c3"), "ts": 1.7e12}))
        p.send_raw(b"carol", batch)
    worker.wait_for("dead_letters", before + 3, timeout=30)
    letters = [orjson.loads(v) for _, v in read_topic(kafka, EVENTS_DLQ, timeout=5,
                                                      until=lambda m: len(m) >= before + 3)]
    by_bytes = {original_bytes(d): d for d in letters}
    assert "not valid JSON" in by_bytes[b"{not json"]["reason"]
    # A bad element's record keeps that element, not the whole message.
    assert by_bytes[orjson.dumps(bad)]["index"] == 1 and "poke" in by_bytes[orjson.dumps(bad)]["reason"]
    assert any("ts" in d["reason"] for d in letters)
    assert all(d["source_topic"] == "events" and d["source_offset"] >= 0 for d in letters)
    # The valid element of the mixed batch was not lost.
    assert history_of(kafka, "carol", 1)["pos"][0][0] == "c1"


def test_events_on_the_wrong_partition_are_rerouted(kafka, worker):
    user = "dave"
    wrong = (partition_for(user, settings.partitions) + 1) % settings.partitions
    from confluent_kafka import Producer
    before = worker.counter("events_rerouted")
    p = Producer({"bootstrap.servers": kafka})
    p.produce("events", orjson.dumps(new_event(user, "x1", "like")), partition=wrong)
    p.flush(10)
    worker.wait_for("events_rerouted", before + 1, timeout=30)
    assert history_of(kafka, user, 1)["pos"][0][0] == "x1"


def test_request_gets_a_correct_reply_within_its_deadline(kafka, worker):
    # A small world: erin and frank like the same items; trending is made of them.
    before = worker.counter("events_applied")
    with EventProducer(kafka) as p:
        for u in ("erin", "frank", "gina"):
            for i in range(6):
                p.send(new_event(u, f"m{i}", "like", author=f"au{i % 3}"))
        p.send(new_event("erin", "m7", "like", author="au1"))
        p.send(new_event("hank", "m0", "like", author="au0"))
    worker.wait_for("events_applied", before + 20, timeout=30)
    time.sleep(1.5)  # trending snapshots are published at most every 0.5-1 s
    with RecommendationClient(kafka) as client:
        t0 = time.time()
        reply = client.recommend("hank", "explore", k=5, timeout=2.0)
        elapsed = time.time() - t0
    assert elapsed < 2.0
    assert reply.request_id and reply.user_id == "hank" and not reply.error
    ids = [i.item_id for i in reply.items]
    assert ids and "m0" not in ids, "an item the user already engaged with was served"
    assert len(ids) == len(set(ids))
    assert all(i.sources for i in reply.items)
    assert "coengagement" in {s for i in reply.items for s in i.sources}
    authors = [i.author_id for i in reply.items]
    assert all(a != b for a, b in zip(authors, authors[1:]))
    assert reply.stage_counts["returned"] == len(ids)


def test_concurrent_clients_get_only_their_own_replies(kafka, worker):
    from concurrent.futures import ThreadPoolExecutor
    clients = [RecommendationClient(kafka, reply_partition=0) for _ in range(3)]
    try:
        def ask(args):
            client, user = args
            return user, client.recommend(user, "explore", k=3, timeout=3.0)
        jobs = [(clients[n % 3], f"user{n}") for n in range(30)]
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(ask, jobs))
    finally:
        for c in clients:
            c.close()
    assert all(reply.user_id == user for user, reply in results)
    assert len({reply.request_id for _, reply in results}) == 30


def test_invalid_request_gets_an_error_reply(kafka, worker):
    from schemas.requests import RecommendationRequest
    with RecommendationClient(kafka) as client:
        bad = RecommendationRequest("bad-req-1", "ivy", "Not A Surface", 5, time.time() + 3,
                                    reply_partition=client.reply_partition)
        reply = client.request(bad, timeout=3.0)
    assert reply.error and "surface" in reply.error and reply.items == []


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is not installed")
def test_kcat_can_produce_events(kafka, worker):
    ev = new_event("kcat-user", "k1", "like")
    subprocess.run(["kcat", "-P", "-b", kafka, "-t", "events", "-k", "kcat-user",
                    "-X", "partitioner=murmur2_random"], input=orjson.dumps(ev), check=True,
                   timeout=30)
    assert history_of(kafka, "kcat-user", 1)["pos"][0][0] == "k1"


def test_restart_keeps_table_state(kafka, worker, tmp_path):
    """A new worker with an EMPTY data dir rebuilds user history from the changelog."""
    from streams.local import WorkerProcess
    before = worker.counter("events_applied")
    with EventProducer(kafka) as p:
        for i in range(4):
            p.send(new_event("judy", f"j{i}", "like"))
    worker.wait_for("events_applied", before + 4, timeout=30)
    assert history_of(kafka, "judy", 4)["n"] == 4
    worker.stop()
    try:
        with WorkerProcess(kafka, tmp_path / "fresh", web_port=worker.web_port + 1) as w2:
            with EventProducer(kafka) as p:
                p.send(new_event("judy", "j9", "like"))
            w2.wait_for("events_applied", 1, timeout=60)
            judy = history_of(kafka, "judy", 5)
            assert judy["n"] == 5, "history was not recovered before new events were applied"
            assert [x[0] for x in judy["pos"]] == ["j0", "j1", "j2", "j3", "j9"]
    finally:
        worker.start()


def test_dashboard_and_consumer_lag_are_served(kafka, worker):
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.web_port}/dashboard/", timeout=10) as r:
        page = r.read().decode()
    assert r.status == 200 and "streamrec worker" in page and "/stats/" in page
    before = worker.counter("events_applied")
    with EventProducer(kafka) as p:
        p.send(new_event("lag-user", "lag-item", "like"))
    worker.wait_for("events_applied", before + 1, timeout=30)
    lag = worker.stats()["lag"]
    # Partitions appear once the worker has read from them; this user's has.
    assert str(partition_for("lag-user", settings.partitions)) in lag["events"]
    assert all(v >= 0 for parts in lag.values() for v in parts.values())

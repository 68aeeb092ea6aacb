"""Model weights as deltas through the real broker (stores/model_store.py, WeightDeltas).

A small model trains between publishes; with a full snapshot every 4th version, v1
and v5 are full snapshots and the others deltas on them.  v2, a delta, is the live
version (for the test's own surface, so no other test's serving changes); v1 is never
live, so only v2's need keeps v1's weights.  Then:

- a reader tailing the topic while they are published, and one started after the
  last, both rebuild every version whose weights are kept and score exactly as the
  full snapshot of the same version does;
- retention (the newest three, plus the live version) dropped v3 and v4 but kept v1,
  the base the live delta needs;
- ``version_blobs`` (``models register --parent``, ``launch evaluate``) rebuilds a
  delta version as its full snapshot;
- a worker started after all of it, on an empty data dir, serves the live delta
  version on the test's surface.
"""
from __future__ import annotations

import random
import time

import numpy as np
import orjson
import pytest

from streams.client import RecommendationClient
from streams.producer import EventProducer

from .conftest import WEB_PORT, new_event

pytestmark = pytest.mark.integration
MODEL, SURFACE, NAMESPACE = "wdtest", "wdsurf", "wd-"
SMALL = dict(hash_size=2 ** 10, author_size=2 ** 6)


def record(version: str, state: str) -> dict:
    now = time.time()
    return {"model": MODEL, "version": version, "tier": "TIER2", "owner": "deltas-test",
            "type": "explore_mtml", "surface": SURFACE, "state": state, "created": now,
            "history": [[now, state]], "lineage": {"examples_seen": 0}}


def examples(rng: random.Random, n: int = 64):
    from models.features import Example
    out = []
    for _ in range(n):
        u, i = rng.randrange(50), rng.randrange(80)
        like = rng.random() < 0.3
        out.append(Example(f"wd-u{u}", f"{NAMESPACE}i{i}", f"wd-a{i % 7}", SURFACE, 1.0,
                           labels={"click": int(like or rng.random() < 0.2), "like": int(like)},
                           user_recent=[f"{NAMESPACE}i{rng.randrange(80)}" for _ in range(3)],
                           request_id=f"wd-r{u}"))
    return out


def wait_loaded(view, versions, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not {(MODEL, v) for v in versions} <= set(view.models):
        assert time.time() < deadline, (sorted(view.models), view.missing_bases)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def published(kafka, worker):
    """v1..v7 published as the trainer publishes (full every 4th); v2 live.  Returns the
    full snapshot of every version and the reader that tailed the topic meanwhile."""
    from models.mtml import RankerConfig
    from models.training import Trainer
    from models.two_tower import TowerConfig
    from schemas.topics import MODEL_REGISTRY, MODEL_WEIGHTS
    from stores import model_store
    from stores.shared_view import SharedItemView
    # Items trending on the test's surface, so the funnel has something to rank.
    with EventProducer(kafka) as p:
        for i in range(20):
            for u in range(3):
                p.send(new_event(f"wd-seed{u}", f"{NAMESPACE}i{i}", "like",
                                 author=f"wd-a{i % 7}", surface=SURFACE))
    early = SharedItemView(kafka, topics=(MODEL_WEIGHTS, MODEL_REGISTRY)).start()
    assert early.wait_caught_up(60)
    trainer = Trainer(TowerConfig(**SMALL), RankerConfig(**SMALL))
    deltas = model_store.WeightDeltas(full_every=4)
    rng, blobs = random.Random(7), {}
    for n in range(1, 8):
        for _ in range(3):
            trainer.fit(examples(rng))
        version = f"v{n}"
        blobs[version] = model_store.serving_bytes(trainer)
        model_store.publish(kafka, MODEL, version, blobs[version],
                            record(version, "live" if version == "v2" else "registered"),
                            deltas=deltas)
    yield {"kafka": kafka, "blobs": blobs, "early": early}
    early.stop()
    for r in model_store.read_registry(kafka).values():
        if r["model"] == MODEL and r["state"] == "live":
            model_store.set_state(kafka, r, "retired", reason="test cleanup")


def test_retention_keeps_the_base_the_live_delta_needs(published):
    from stores import model_store
    manifests = model_store.published_manifests(published["kafka"], MODEL)
    kinds = {v: m.get("base") or m["kind"] for v, m in manifests.items()}
    # v3 and v4 (deltas on v1, neither kept nor live) are gone; v1 stays for v2.
    assert kinds == {"v1": "full", "v2": "v1", "v5": "full", "v6": "v5", "v7": "v5"}
    full = manifests["v1"]["bytes"]
    assert all(manifests[v]["bytes"] < full / 3 for v in ("v2", "v6", "v7"))


def test_readers_early_and_late_rebuild_deltas_exactly(published):
    from schemas.topics import MODEL_REGISTRY, MODEL_WEIGHTS
    from stores import model_store
    from stores.shared_view import SharedItemView
    kafka, blobs = published["kafka"], published["blobs"]
    probe = examples(random.Random(99), 40)
    kept = ("v1", "v2", "v5", "v6", "v7")
    late = SharedItemView(kafka, topics=(MODEL_WEIGHTS, MODEL_REGISTRY)).start()
    try:
        assert late.wait_caught_up(60)
        for view in (published["early"], late):
            wait_loaded(view, kept)
            assert view.missing_bases == 0 and view.bad_messages == 0
            for version in kept:
                expected = model_store.trainer_from_bytes(blobs[version]).predict(probe)
                assert np.array_equal(view.models[(MODEL, version)].predict(probe), expected)
            assert view.registry[f"{MODEL}/v2"]["state"] == "live"
        # v3 and v4 were tombstoned: a reader forgets them, early or late.
        assert not {(MODEL, "v3"), (MODEL, "v4")} & set(late.models)
    finally:
        late.stop()
    rebuilt = model_store.version_blobs(kafka, MODEL, ["v2", "v6"])
    for version, blob in rebuilt.items():
        assert np.array_equal(model_store.trainer_from_bytes(blob).predict(probe),
                              model_store.trainer_from_bytes(blobs[version]).predict(probe))
    with pytest.raises(RuntimeError, match="v3: weights not published"):
        model_store.version_blobs(kafka, MODEL, ["v3"])


def test_a_worker_started_late_serves_the_live_delta_version(published, worker, tmp_path):
    from streams.local import WorkerProcess
    kafka = published["kafka"]
    worker.stop()
    try:
        env = {"STREAMREC_LABEL_WINDOW_S": "2", "STREAMREC_LABEL_WALL_WINDOW_S": "2",
               "STREAMREC_ONLINE_TRAINING": "0"}
        with WorkerProcess(kafka, tmp_path / "late", web_port=WEB_PORT + 5, env=env) as late:
            deadline = time.time() + 60
            while f"{MODEL}:v2" not in late.stats()["shared_view"]["model_versions_loaded"]:
                assert time.time() < deadline, late.stats()["shared_view"]
                time.sleep(0.3)
            with RecommendationClient(kafka) as client:
                deadline = time.time() + 30
                while True:
                    reply = client.recommend(f"wd-late{int(time.time() * 10)}", SURFACE, k=5,
                                             timeout=5.0, context={"namespace": NAMESPACE})
                    if reply.items:
                        break
                    assert time.time() < deadline, "no items for the test surface"
                    time.sleep(0.5)
            assert reply.model_versions.get("ranker") == f"{MODEL}:v2"
            assert reply.stage_counts.get("second_stage", 0) > 0 and not reply.fallback
    finally:
        worker.start()


def test_the_online_trainer_publishes_deltas_that_workers_load(kafka, worker, tmp_path):
    """The trainer agent itself (a full snapshot every 3rd version here): versions after
    its first are deltas, and the worker loads them."""
    from confluent_kafka import Producer

    from schemas.topics import TRAINING_EXAMPLES
    from stores import model_store
    from streams.local import WorkerProcess
    owner = "deltas-trainer"
    worker.stop()  # one consumer of training.examples: this test's trainer
    trainer = WorkerProcess(kafka, tmp_path / "delta-trainer", web_port=WEB_PORT + 5,
                            env={"STREAMREC_PUBLISH_INTERVAL_S": "1",
                                 "STREAMREC_WEIGHTS_FULL_EVERY": "3",
                                 "STREAMREC_MODEL_OWNER": owner})
    producer = Producer({"bootstrap.servers": kafka, "linger.ms": 5})
    rng = random.Random(11)
    try:
        trainer.start()
        deadline = time.time() + 90
        while True:
            for _ in range(10):
                producer.produce(TRAINING_EXAMPLES, key=b"examples", value=orjson.dumps(
                    [e.to_dict() for e in examples(rng, 100)]))
            assert not producer.flush(10)
            ours = sorted(r["version"] for r in model_store.read_registry(kafka).values()
                          if r.get("owner") == owner)
            manifests = model_store.published_manifests(kafka, "ranker")
            kinds = {v: manifests[v].get("kind") for v in ours if v in manifests}
            if list(kinds.values()).count("delta") >= 2:
                break
            assert time.time() < deadline, kinds
            time.sleep(0.5)
        if ours[0] in kinds:  # still kept: a trainer's first version after it starts
            assert kinds[ours[0]] == "full", kinds
        deltas = [v for v, kind in kinds.items() if kind == "delta"]
        assert all(manifests[v]["base"] in kinds and kinds[manifests[v]["base"]] == "full"
                   for v in deltas)
        deadline = time.time() + 30
        while not {f"ranker:{v}" for v in deltas} <= set(
                trainer.stats()["shared_view"]["model_versions_loaded"]):
            assert time.time() < deadline, trainer.stats()["shared_view"]
            time.sleep(0.3)
    finally:
        trainer.stop()
        for r in model_store.read_registry(kafka).values():
            if r["model"] == "ranker" and r["state"] == "live":
                model_store.set_state(kafka, r, "retired", reason="test cleanup")
        worker.start()

"""Models against the real broker: bootstrap, hot swap into serving, predictions, rollback."""
from __future__ import annotations

import time

import orjson
import pytest

from schemas.topics import PREDICTIONS
from streams.client import RecommendationClient
from streams.producer import EventProducer

from .conftest import new_event, read_topic

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def retire_models_afterwards(kafka):
    """Later tests check retrieval and the cold-start path: leave no model live."""
    yield
    from stores import model_store
    for record in model_store.read_registry(kafka).values():
        if record["state"] == "live":
            model_store.set_state(kafka, record, "retired")


def wait_live(worker, version: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while worker.stats()["shared_view"].get("live_model") != f"ranker:{version}":
        assert time.time() < deadline, f"worker never served ranker:{version}"
        time.sleep(0.3)


def test_bootstrap_swap_predictions_and_rollback(kafka, worker):
    from stores import model_store
    from streams.trainer import bootstrap
    # Labelled examples: impressions, some liked; windows close on the 2 s wall clock.
    now = time.time()
    with EventProducer(kafka) as p:
        for u in range(12):
            for i in range(8):
                p.send(new_event(f"mdl-u{u}", f"mdl-i{i}", "impression", ts=now,
                                 request_id=f"mdl-r{u}", author=f"mdl-a{i % 3}", position=i))
                if (u + i) % 3 == 0:
                    p.send(new_event(f"mdl-u{u}", f"mdl-i{i}", "like", ts=now + 1,
                                     request_id=f"mdl-r{u}", author=f"mdl-a{i % 3}"))
    worker.wait_for("training_examples", 96, timeout=30)
    first = bootstrap(kafka, epochs=1, progress=False)
    assert first["state"] == "live" and first["lineage"]["examples_seen"] >= 96
    wait_live(worker, first["version"])

    with RecommendationClient(kafka) as client:
        # A user who has seen nothing: every item is a candidate for the model to rank.
        reply = client.recommend("mdl-newcomer", "explore", k=5, timeout=3.0)
    assert reply.model_versions["ranker"] == f"ranker:{first['version']}"
    assert reply.stage_counts.get("second_stage", 0) > 0 and not reply.fallback

    def logged(msgs):
        return [v for _, v in msgs if orjson.loads(v)["request_id"] == reply.request_id]
    record = orjson.loads(logged(read_topic(kafka, PREDICTIONS, timeout=10,
                                            until=lambda m: bool(logged(m))))[0])
    assert record["model"] == f"ranker:{first['version']}" and len(record["heads"]) == 8
    assert all(0.0 <= p <= 1.0 for _, _, probs in record["items"] for p in probs)

    # The user sees what was served and likes one item: the example carries the model's
    # prediction, and the stability monitor reports calibration for that version.
    shown = [i.item_id for i in reply.items]
    with EventProducer(kafka) as p:
        for pos, item in enumerate(shown):
            p.send(new_event("mdl-newcomer", item, "impression", request_id=reply.request_id,
                             position=pos))
        p.send(new_event("mdl-newcomer", shown[0], "like", request_id=reply.request_id))
    served_by = reply.model_versions["ranker"]
    deadline = time.time() + 40
    while served_by not in worker.stats()["stability"]["report"]:
        assert time.time() < deadline, "no stability report for the serving model"
        time.sleep(0.5)
    like = worker.stats()["stability"]["report"][served_by]["like"]
    assert like["n"] == len(shown) and like["rate"] == round(1 / len(shown), 4)

    # The live version's item tower feeds the ANN index the embedding sources use.
    view_stats = worker.stats()["shared_view"]
    assert view_stats["tower_index_items"] >= 8

    # A second version goes live, retires the first and is served; rolling it back
    # returns to the first.
    time.sleep(1.1)  # versions are named by the second
    second = bootstrap(kafka, epochs=1, progress=False)
    wait_live(worker, second["version"])
    assert model_store.read_registry(kafka)[f"ranker/{first['version']}"]["state"] == "retired"
    gone, back = model_store.rollback(kafka, "ranker")
    assert (gone["version"], back["version"]) == (second["version"], first["version"])
    wait_live(worker, first["version"])


def test_freshness_event_to_published_model(kafka, worker, tmp_path):
    """Seconds from an engagement to a published model version that has learned from it.

    Whether that version serves is the gate's decision (tests/integration/test_gate.py):
    one example is too little evidence, so it stays registered.
    """
    from schemas.topics import TRAINING_EXAMPLES
    from streams.local import WorkerProcess
    worker.stop()
    fast = WorkerProcess(kafka, tmp_path / "fresh-trainer", web_port=worker.web_port + 2,
                         env={"STREAMREC_LABEL_WINDOW_S": "1",
                                  "STREAMREC_LABEL_WALL_WINDOW_S": "1",
                              "STREAMREC_PUBLISH_INTERVAL_S": "1"})
    try:
        fast.start()
        t0 = time.time()
        with EventProducer(kafka) as p:
            p.send(new_event("fresh-u", "fresh-i", "impression", ts=t0, request_id="fresh-r"))
            p.send(new_event("fresh-u", "fresh-i", "like", ts=t0 + 0.1, request_id="fresh-r"))
        # Where the example landed in training.examples...
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
        c = Consumer({"bootstrap.servers": kafka, "group.id": "fresh", "enable.auto.commit": False})
        c.assign([TopicPartition(TRAINING_EXAMPLES, 0, OFFSET_BEGINNING)])
        offset = None
        while offset is None:
            assert time.time() - t0 < 30, "no training example for the fresh engagement"
            for m in c.consume(100, timeout=0.5):
                if not m.error() and any(e["user_id"] == "fresh-u" for e in orjson.loads(m.value())):
                    offset = m.offset()
        c.close()
        # ...and when a published version's lineage covers it.
        from stores import model_store
        while True:
            learned = [r for r in model_store.read_registry(kafka).values()
                       if r.get("lineage", {}).get("offsets", {}).get("0", -1) >= offset]
            if learned:
                break
            assert time.time() - t0 < 90, "no published version learned from the fresh engagement"
            time.sleep(0.2)
        elapsed = time.time() - t0
        print(f"\nfreshness: engagement -> published model that learned it in {elapsed:.1f} s")
        assert elapsed < 90
        decision = learned[0]["decision"]
        assert learned[0]["state"] == "registered" and not decision["decided"], decision
    finally:
        fast.stop()
        worker.start()

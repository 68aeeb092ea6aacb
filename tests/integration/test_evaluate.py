"""``streamrec models register`` and ``streamrec launch evaluate`` through the real broker
and worker: traffic recorded by a short run (requests answered by production, the
impressions and clicks that followed, labelled by the label join) is replayed against
registered candidates.  A copy of production passes; a candidate from a checkpoint whose
click predictions are three times production's fails on its click calibration.

Production predicts 10% click for every item and the test clicks one item of each
ten-item reply, so production is calibrated (1.0) on the recorded labels, as in
test_launch.py, and its NE is 1 (a constant prediction at the base rate: the TIER2
limit, not beyond it).  The
run uses a surface of its own, which the candidates are registered for, so the
evaluation sees only this run's examples; production's lineage names the
``training.examples`` offset the run started after, so the examples before it are
left out as "trained on".
"""
from __future__ import annotations

import json
import time

import orjson
import pytest

from schemas.topics import TRAINING_EXAMPLES
from streams.client import RecommendationClient
from streams.producer import EventProducer

from .conftest import new_event, read_topic
from .test_launch import weights

pytestmark = pytest.mark.integration
MODEL = "evaltest"
SURFACE = "evaltest"
NAMESPACE = "ev-"
REQUESTS = 40


def end_offset(kafka: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": kafka, "group.id": "evaltest-offsets"})
    try:
        return c.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    finally:
        c.close()


def cli(capsys, kafka, *argv) -> tuple[int, str, str]:
    from streams.cli import main
    code = main([*argv, "--bootstrap", kafka])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def recorded(kafka, worker):
    """p1 live (10% click) for the test's surface, and REQUESTS requests it answered,
    every shown item's impression recorded and one in ten clicked, all labelled."""
    from stores import model_store
    trained_through = end_offset(kafka, TRAINING_EXAMPLES) - 1
    now = time.time()
    p1 = {"model": MODEL, "version": "p1", "tier": "TIER2", "owner": "eval-test",
          "type": "explore_mtml", "surface": SURFACE, "state": "live", "created": now,
          "history": [[now, "live"]],
          "lineage": {"source_topic": TRAINING_EXAMPLES, "offsets": {"0": trained_through}}}
    model_store.publish(kafka, MODEL, "p1", weights(0.1), p1)
    with EventProducer(kafka) as p:
        for i in range(40):
            for u in range(3):
                p.send(new_event(f"ev-seed{u}", f"{NAMESPACE}i{i}", "like",
                                 author=f"ev-a{i % 7}", surface=SURFACE))
    # p1 names its surface, so it ranks that surface (not the worker's default model).
    deadline = time.time() + 60
    with RecommendationClient(kafka) as client:
        while client.recommend("ev-wait", SURFACE, k=10, timeout=3.0,
                               context={"namespace": NAMESPACE}
                               ).model_versions.get("ranker") != f"{MODEL}:p1":
            assert time.time() < deadline, "the worker never served evaltest:p1"
            time.sleep(0.3)

    # Only full replies are shown (the first may come before every seed item is counted),
    # and each gets exactly one click: the click rate is exactly production's 10%.
    requests, shown, asked = set(), 0, 0
    with RecommendationClient(kafka) as client, EventProducer(kafka) as p:
        while len(requests) < REQUESTS:
            assert asked < 3 * REQUESTS, f"only {len(requests)} of {asked} replies were full"
            user = f"ev-u{asked}"
            asked += 1
            reply = client.recommend(user, SURFACE, k=10, timeout=3.0,
                                     context={"namespace": NAMESPACE})
            assert reply.model_versions.get("ranker") == f"{MODEL}:p1", reply.to_dict()
            if len(reply.items) < 10:
                time.sleep(0.5)
                continue
            requests.add(reply.request_id)
            for pos, item in enumerate(reply.items):
                p.send(new_event(user, item.item_id, "impression", author=item.author_id,
                                 request_id=reply.request_id, position=pos, surface=SURFACE))
                if pos == len(requests) % 10:
                    p.send(new_event(user, item.item_id, "click", author=item.author_id,
                                     request_id=reply.request_id, surface=SURFACE))
                shown += 1

    def labelled(messages) -> int:
        return sum(1 for _, v in messages for e in orjson.loads(v)
                   if e.get("request_id") in requests)
    got = labelled(read_topic(kafka, TRAINING_EXAMPLES, timeout=90,
                              until=lambda ms: labelled(ms) >= shown))
    assert got == shown, f"{got} of {shown} impressions labelled"
    yield {"kafka": kafka, "shown": shown, "trained_through": trained_through}
    for r in model_store.read_registry(kafka).values():
        if r["model"] == MODEL and r["state"] == "live":
            model_store.set_state(kafka, r, "retired", reason="test cleanup")


def test_register_refuses_an_unknown_tier_parent_or_an_existing_version(recorded, capsys):
    kafka = recorded["kafka"]
    code, _, err = cli(capsys, kafka, "models", "register", "--model", MODEL, "--parent", "p1",
                       "--tier", "TIER9")
    assert code == 1 and "unknown tier 'TIER9' (known: TIER0" in err
    code, _, err = cli(capsys, kafka, "models", "register", "--model", MODEL, "--parent", "p0")
    assert code == 1 and "unknown parent: no version 'p0' of 'evaltest'" in err
    code, _, err = cli(capsys, kafka, "models", "register", "--model", MODEL, "--parent", "p1",
                       "--version", "p1")
    assert code == 1 and "evaltest p1 is already in the registry (live)" in err
    code, _, err = cli(capsys, kafka, "models", "register", "--model", MODEL)
    assert code == 2 and "--checkpoint FILE or --parent VERSION" in err


def test_a_copy_of_production_passes(recorded, capsys):
    kafka = recorded["kafka"]
    code, out, err = cli(capsys, kafka, "models", "register", "--model", MODEL, "--parent", "p1",
                         "--version", "copy1", "--owner", "eval-test-copy")
    assert code == 0, err
    assert "evaltest copy1: registered (TIER2, explore_mtml on evaltest, owner eval-test-copy)" \
        " from a copy of p1" in out
    assert "next: streamrec launch evaluate evaltest@copy1" in out
    from stores import model_store
    copy1 = model_store.read_registry(kafka)[f"{MODEL}/copy1"]
    assert (copy1["state"], copy1["parent"], copy1["registered_by"]) == ("registered", "p1",
                                                                         "operator")
    assert copy1["lineage"]["offsets"] == {"0": recorded["trained_through"]}

    code, out, err = cli(capsys, kafka, "launch", "evaluate", f"{MODEL}@copy1", "-q")
    assert code == 0, out + err
    assert "evaltest: candidate copy1 (registered) vs production p1 (live), TIER2" in out
    assert "verdict    PASS: click inside the TIER2 SLO" in out

    code, out, err = cli(capsys, kafka, "launch", "evaluate", f"{MODEL}@copy1", "-q", "--json")
    assert code == 0, err
    report = json.loads(out)
    # Every example of the run, nothing from before production's lineage offset.
    assert report["examples"]["n"] == recorded["shown"]
    assert report["examples"]["requests"] == REQUESTS
    assert report["examples"]["after_offset"] == recorded["trained_through"]
    assert report["examples"]["offsets"][0] > recorded["trained_through"]
    cand, prod = report["candidate"]["heads"]["click"], report["production"]["heads"]["click"]
    assert cand["n"] == recorded["shown"] == 10 * REQUESTS and cand["positives"] == REQUESTS
    assert cand["calibration"] == prod["calibration"] == 1.0 and cand["ne"] == prod["ne"] == 1.0
    assert report["verdict"]["judged"] == ["click"] and report["verdict"]["breaches"] == []
    # Each request showed 10 items: HitRate cannot tell orders apart, so it is null, with why.
    hit = report["candidate"]["hit_rate"]
    assert hit["value"] is None and "more than 10 labelled items" in hit["reason"]
    for side in ("candidate", "production"):
        cost = report[side]["cost"]
        assert cost["examples"] == recorded["shown"] and cost["requests"] == REQUESTS
        assert cost["ms_per_example"] > 0 and cost["ms_per_request"] > 0 and cost["cpu_s"] > 0


def test_a_candidate_three_times_too_high_fails(recorded, capsys, tmp_path):
    from stores import model_store
    kafka = recorded["kafka"]
    path = tmp_path / "bad.pt"
    model_store.trainer_from_bytes(weights(0.3), frozen=False).save(path)
    code, out, err = cli(capsys, kafka, "models", "register", "--model", MODEL, "--checkpoint",
                         str(path), "--version", "bad1", "--parent", "p1", "--owner", "eval-test",
                         "--type", "explore_mtml", "--surface", SURFACE, "--tier", "TIER2")
    assert code == 0, err
    assert "from checkpoint bad.pt" in out

    code, out, err = cli(capsys, kafka, "launch", "evaluate", "--model", MODEL, "--version",
                         "bad1", "-q", "--json")
    assert code == 1, err
    report = json.loads(out)
    verdict = report["verdict"]
    assert verdict["verdict"] == "fail"
    breach = next(b for b in verdict["breaches"] if b["metric"] == "calibration")
    assert breach["head"] == "click" and 2.7 <= breach["value"] <= 3.3
    assert breach["bounds"] == [0.8, 1.25] and breach["n"] == recorded["shown"]
    assert report["production"]["heads"]["click"]["calibration"] == 1.0
    # Its lineage names no offset: only production's cut applies, and the report says so.
    assert report["candidate"]["trained_through"] is None
    assert any("bad1's lineage names no training.examples offset" in n for n in report["notes"])

    code, out, _ = cli(capsys, kafka, "launch", "evaluate", f"{MODEL}@bad1", "-q")
    assert code == 1 and "verdict    FAIL: click calibration 3" in out


def test_evaluate_says_what_is_missing(recorded, capsys):
    kafka = recorded["kafka"]
    code, _, err = cli(capsys, kafka, "launch", "evaluate", f"{MODEL}@nope", "-q")
    assert code == 2 and "unknown version: no 'nope' of 'evaltest'" in err
    code, _, err = cli(capsys, kafka, "launch", "evaluate", f"{MODEL}@p1", "-q")
    assert code == 2 and "is the production version" in err
    code, _, err = cli(capsys, kafka, "launch", "evaluate", f"{MODEL}@copy1", "--since", "0m",
                       "-q")
    assert code == 2 and "no recorded traffic to evaluate on" in err
    code, _, err = cli(capsys, kafka, "launch", "evaluate", "-q")
    assert code == 2 and "name the candidate" in err


def test_a_worker_restart_keeps_the_registry(recorded, worker, tmp_path):
    """A worker started on an empty data dir reads the registry back from its compacted
    topic: production serves again, and the registered candidates' weights are there."""
    from streams.local import WorkerProcess
    kafka = recorded["kafka"]
    worker.stop()
    try:
        env = {"STREAMREC_LABEL_WINDOW_S": "2", "STREAMREC_LABEL_WALL_WINDOW_S": "2",
               "STREAMREC_ONLINE_TRAINING": "0"}
        with WorkerProcess(kafka, tmp_path / "fresh", web_port=worker.web_port + 2,
                           env=env) as fresh:
            versions = {f"{MODEL}:p1", f"{MODEL}:copy1", f"{MODEL}:bad1"}
            deadline = time.time() + 60
            while True:  # weights load as they stream in
                view = fresh.stats()["shared_view"]
                if versions <= set(view["model_versions_loaded"]):
                    break
                assert time.time() < deadline, view
                time.sleep(0.3)
            with RecommendationClient(kafka) as client:
                reply = client.recommend("ev-after-restart", SURFACE, k=10, timeout=5.0,
                                         context={"namespace": NAMESPACE})
            # p1 names its surface: it ranks that surface again (the reply says so).
            assert reply.model_versions.get("ranker") == f"{MODEL}:p1"
    finally:
        worker.start()
    from stores import model_store
    states = {r["version"]: r["state"] for r in model_store.read_registry(kafka).values()
              if r["model"] == MODEL}
    assert states == {"p1": "live", "copy1": "registered", "bad1": "registered"}

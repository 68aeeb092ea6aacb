"""Launch tooling through the real broker and worker: a version in shadow scores real
requests beside production and is never served; one whose predictions are three
times too high is caught by the stability monitor and rolled back with the evidence;
a canary serves exactly the users its hash picks; ``streamrec models promote`` steps
a version shadow -> canary -> production, each step out of shadow or canary gated on
its stability figures; an operator-promoted version that degrades is rolled back to
the one before, which holds.

The versions are small real models whose calibration layer is set so that every item
gets the same probabilities: production says 10% click, the bad shadow 30%, and the
test clicks exactly one impression in ten, so production is calibrated (1.0) and the
shadow is off by 3.
"""
from __future__ import annotations

import time

import orjson
import pytest

from schemas.topics import PREDICTIONS
from streams.client import RecommendationClient
from streams.producer import EventProducer

from .conftest import new_event, read_topic

pytestmark = pytest.mark.integration
MODEL = "launchtest"
NAMESPACE = "lt-"


def weights(click: float) -> bytes:
    """A small model that predicts ``click`` for the click head of every item (and three
    times a small base for the others, so only the click head has labels to judge)."""
    import torch

    from models.features import HEADS
    from models.mtml import RankerConfig
    from models.training import Trainer
    from models.two_tower import TowerConfig
    from stores import model_store
    small = dict(hash_size=2 ** 10, author_size=2 ** 6)
    trainer = Trainer(TowerConfig(**small), RankerConfig(**small))
    target = torch.tensor([click if h == "click" else click / 10 for h in HEADS])
    with torch.no_grad():
        cal = trainer.calibration
        cal.scale.zero_()
        cal.shift.copy_(torch.logit(target) - cal.centre)
    return model_store.serving_bytes(trainer)


def record(version: str, state: str) -> dict:
    now = time.time()
    return {"model": MODEL, "version": version, "tier": "TIER2", "owner": "launch-test",
            "state": state, "created": now, "history": [[now, state]],
            "lineage": {"examples_seen": 0}}


@pytest.fixture(scope="module")
def launched(kafka, worker):
    """p1 live (10% click), s1 (30%: "scaled by 3") registered, items to recommend."""
    from stores import model_store
    model_store.publish(kafka, MODEL, "p1", weights(0.1), record("p1", "live"))
    model_store.publish(kafka, MODEL, "s1", weights(0.3), record("s1", "registered"))
    with EventProducer(kafka) as p:
        for i in range(40):
            for u in range(3):
                p.send(new_event(f"lt-seed{u}", f"{NAMESPACE}i{i}", "like",
                                 author=f"lt-a{i % 7}"))
    deadline = time.time() + 60
    while worker.stats()["shared_view"].get("live_model") != f"{MODEL}:p1":
        assert time.time() < deadline, "the worker never served launchtest:p1"
        time.sleep(0.3)
    yield kafka
    for r in model_store.read_registry(kafka).values():
        if r["model"] == MODEL and r["state"] in ("live", "shadow", "canary"):
            model_store.set_state(kafka, r, "retired", reason="test cleanup")


def ask(client, user: str):
    return client.recommend(user, "explore", k=10, timeout=3.0,
                            context={"namespace": NAMESPACE})


def traffic(kafka, prefix: str, click_every: int, until, what: str, timeout: float = 150.0,
            stats=None) -> tuple[set, list]:
    """Ask for users ``prefix0``, ``prefix1``, ... ten at a time; each sees what was served
    and clicks one impression in ``click_every``; until ``until()``.  Returns the versions
    that answered and the request ids."""
    served, requests, shown = set(), [], 0
    deadline = time.time() + timeout
    with RecommendationClient(kafka) as client, EventProducer(kafka) as p:
        while not until():
            assert time.time() < deadline, f"{what}: {stats() if stats else ''}"
            for _ in range(10):
                user = f"{prefix}{len(requests)}"
                reply = ask(client, user)
                requests.append(reply.request_id)
                served.add(reply.model_versions.get("ranker"))
                for pos, item in enumerate(reply.items):
                    p.send(new_event(user, item.item_id, "impression", author=item.author_id,
                                     request_id=reply.request_id, position=pos))
                    if shown % click_every == 0:
                        p.send(new_event(user, item.item_id, "click", author=item.author_id,
                                         request_id=reply.request_id))
                    shown += 1
            p.flush()
            time.sleep(1.0)
    return served, requests


def registry(kafka) -> dict:
    from stores import model_store
    return {r["version"]: r for r in model_store.read_registry(kafka).values()
            if r["model"] == MODEL}


def test_bad_shadow_is_caught_and_never_served(launched, worker):
    from stores import model_store
    kafka = launched
    shadow = model_store.promote(kafka, registry(kafka)["s1"], by="launch-test", to="shadow")
    assert shadow["state"] == "shadow" and shadow["moves"][-1]["by"] == "launch-test"

    served, requests = traffic(kafka, "lt-u", 10,
                               lambda: registry(kafka)["s1"]["state"] != "shadow",
                               "s1 never rolled back", stats=lambda: worker.stats()["stability"])
    # Everyone was answered by production, never by the shadow.
    assert served == {f"{MODEL}:p1"}

    s1 = registry(kafka)["s1"]
    assert s1["state"] == "rolled_back"
    move = s1["moves"][-1]
    assert move["by"] == "stability monitor" and move["from"] == "shadow"
    breach = next(b for b in move["evidence"]["breaches"] if b["head"] == "click"
                  and b["metric"] == "calibration")
    # Three times too high, judged on at least the launch's minimum sample.
    assert 2.4 <= breach["value"] <= 3.6 and breach["n"] >= 200
    assert "click calibration" in s1["reason"] and "shadow" in s1["reason"]
    assert registry(kafka)["p1"]["state"] == "live"
    # Production itself was calibrated on the same labels.
    report = worker.stats()["stability"]["report"]
    assert 0.75 <= report[f"{MODEL}:p1"]["click"]["calibration"] <= 1.3

    # The shadow's predictions were logged beside production's, tagged, never served.
    logged = [orjson.loads(v) for _, v in read_topic(kafka, PREDICTIONS, timeout=8)]
    mine = [m for m in logged if m["request_id"] in set(requests)]
    shadow_msgs = [m for m in mine if m["model"] == f"{MODEL}:s1"]
    assert shadow_msgs and all(m["role"] == "shadow" and m["served"] is False
                               and m["beside"] == f"{MODEL}:p1" for m in shadow_msgs)
    assert all(m["role"] == "production" for m in mine if m["model"] == f"{MODEL}:p1")
    probs = {round(p[0], 2) for m in shadow_msgs for _, _, p in m["items"]}
    assert probs == {0.3}

    # Once rolled back it scores nothing more; the rollback holds (it stays rolled back).
    time.sleep(2.0)
    with RecommendationClient(kafka) as client:
        after = ask(client, "lt-after")
    later = [orjson.loads(v) for _, v in read_topic(
        kafka, PREDICTIONS, timeout=8,
        until=lambda ms: any(orjson.loads(v)["request_id"] == after.request_id for _, v in ms))]
    assert {m["model"] for m in later if m["request_id"] == after.request_id} == {f"{MODEL}:p1"}
    assert registry(kafka)["s1"]["state"] == "rolled_back"


def test_canary_serves_the_users_its_hash_picks_then_promote_to_production(
        launched, worker, capsys):
    from models.launch import bucket
    from streams.cli import main
    kafka = launched
    from stores import model_store
    model_store.publish(kafka, MODEL, "c1", weights(0.1), record("c1", "registered"))

    def cli(*argv):
        code = main(["models", *argv, "--bootstrap", kafka])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = cli("promote", "--model", MODEL, "--version", "c1", "--to", "shadow")
    assert code == 0, err
    assert f"{MODEL} c1: registered -> shadow" in out
    assert "next: streamrec models promote --model launchtest --version c1 --to canary" in out
    # The next step is gated on its stability: nothing judged yet.
    code, out, err = cli("promote", "--model", MODEL, "--version", "c1", "--to", "canary",
                         "--share", "0.5")
    assert code == 1 and "c1 has no stability figures yet" in err
    assert registry(kafka)["c1"]["state"] == "shadow"

    def judged() -> bool:
        heads = (registry(kafka)["c1"].get("stability") or {}).get("heads") or {}
        return heads.get("click", {}).get("n", 0) >= 200
    served, _ = traffic(kafka, "lt-j", 10, judged, "c1 never judged in shadow",
                        stats=lambda: worker.stats()["stability"])
    assert served == {f"{MODEL}:p1"}
    code, out, err = cli("promote", "--model", MODEL, "--version", "c1", "--to", "canary",
                         "--share", "0.5")
    assert code == 0, err
    assert f"{MODEL} c1: shadow -> canary (50% of users)" in out
    assert "judged in shadow: click calibration" in out
    move = registry(kafka)["c1"]["moves"][-1]
    assert move["evidence"]["stability"]["heads"]["click"]["n"] >= 200

    users = [f"lt-c{n}" for n in range(40)]
    expected = {u: "c1" if bucket(MODEL, u) < 0.5 else "p1" for u in users}
    assert set(expected.values()) == {"c1", "p1"}
    deadline = time.time() + 30
    with RecommendationClient(kafka) as client:
        while True:  # until the worker has read the canary and loaded its scorer
            if ask(client, next(u for u in users if expected[u] == "c1")).model_versions.get(
                    "ranker") == f"{MODEL}:c1":
                break
            assert time.time() < deadline, "the canary never served"
            time.sleep(0.3)
        for _ in range(2):  # the same users, the same versions, every time
            got = {u: ask(client, u).model_versions.get("ranker") for u in users}
            assert got == {u: f"{MODEL}:{v}" for u, v in expected.items()}

    code, out, err = cli("promote", "--model", MODEL, "--version", "c1")
    assert code == 0, err
    assert f"{MODEL} c1: canary -> live" in out and "p1 retired" in out
    assert "judged in canary: click calibration" in out and "within its probation" in out
    states = {v: r["state"] for v, r in registry(kafka).items()}
    assert (states["c1"], states["p1"]) == ("live", "retired")
    deadline = time.time() + 30
    with RecommendationClient(kafka) as client:
        while {ask(client, u).model_versions.get("ranker") for u in users[:10]} != {
                f"{MODEL}:c1"}:
            assert time.time() < deadline, "production never moved to c1"
            time.sleep(0.3)


def test_a_promoted_version_that_degrades_is_rolled_back_and_the_hold_persists(
        launched, worker):
    """An operator promotes d1; on its labels it predicts three times too many clicks
    (one impression in thirty is clicked), so within its probation the monitor rolls it
    back to the version live before, which then holds against the trainer's gate."""
    from stores import model_store
    kafka = launched
    model_store.publish(kafka, MODEL, "d1", weights(0.1), record("d1", "registered"))
    before = next(v for v, r in registry(kafka).items() if r["state"] == "live")
    promoted = model_store.promote(kafka, registry(kafka)["d1"], by="launch-test")
    assert promoted["state"] == "live" and promoted["promoted"]
    deadline = time.time() + 30
    while worker.stats()["shared_view"].get("live_model") != f"{MODEL}:d1":
        assert time.time() < deadline, "the worker never served d1"
        time.sleep(0.3)

    served, _ = traffic(kafka, "lt-d", 30, lambda: registry(kafka)["d1"]["state"] != "live",
                        "d1 never rolled back", stats=lambda: worker.stats()["stability"])
    assert f"{MODEL}:d1" in served

    states = registry(kafka)
    d1, back = states["d1"], states[before]
    assert (d1["state"], back["state"]) == ("rolled_back", "live")
    move = d1["moves"][-1]
    assert move["by"] == "stability monitor" and move["from"] == "live"
    breach = next(b for b in move["evidence"]["breaches"] if b["metric"] == "calibration")
    assert breach["head"] == "click" and 2.2 <= breach["value"] <= 4.0 and breach["n"] >= 200
    assert back["hold"]["rolled_back"] == "d1" and back["hold"]["by"] == "stability monitor"
    deadline = time.time() + 30
    while worker.stats()["shared_view"].get("live_model") != f"{MODEL}:{before}":
        assert time.time() < deadline, "serving never returned to the version before"
        time.sleep(0.3)

    # The hold persists: a version the trainer's gate would make live stays registered.
    gate = {**record("t1", "live"), "decision": {"go_live": True, "decided": True,
                                                 "reason": "weighted NE 0.5 beats it"}}
    model_store.publish_candidate(kafka, MODEL, "t1", weights(0.1), gate)
    t1 = registry(kafka)["t1"]
    assert t1["state"] == "registered"
    assert t1["reason"].startswith("held by a rollback: rollback of d1")
    assert registry(kafka)[before]["state"] == "live"

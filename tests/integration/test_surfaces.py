"""Two models on two surfaces serving side by side, through the real broker and worker.

The default model (``ranker``, whose records name no surface: the online trainer's) is
live and predicts 10% click for every item.  A second model, ``reels_ranker``, is
registered for the ``reels`` surface from a checkpoint that predicts three times that
(``streamrec models register --checkpoint``) and promoted to production
(``streamrec models promote``).  Then requests for ``explore``, ``reels`` and ``home``
are sent at once: ``reels`` is answered by reels_ranker, ``explore`` and ``home`` (no
model of their own) by ranker, each reply naming the model and version, and the
predictions each model logged differ by the factor of 3.  A canary of reels_ranker
then takes every reels user while explore stays with ranker.
"""
from __future__ import annotations

import contextlib
import io
import time
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest

from schemas.topics import PREDICTIONS
from streams.client import RecommendationClient
from streams.producer import EventProducer

from .conftest import new_event, read_topic
from .test_launch import weights

pytestmark = pytest.mark.integration
DEFAULT, REELS = "ranker", "reels_ranker"
SURFACES = ("explore", "reels", "home")
NAMESPACE = "sf-"


def cli(kafka, *argv) -> tuple[int, str, str]:
    """``streamrec ARGV --bootstrap KAFKA``: exit code, stdout, stderr."""
    from streams.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--bootstrap", kafka])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def two_models(kafka, worker, tmp_path_factory):
    """ranker sf-d1 live (10% click, no surface); items trending on every test surface;
    reels_ranker r1 registered for reels from a 30% checkpoint and promoted, by the CLI."""
    from stores import model_store
    now = time.time()
    model_store.publish(kafka, DEFAULT, "sf-d1", weights(0.1), {
        "model": DEFAULT, "version": "sf-d1", "tier": "TIER2", "owner": "surfaces-test",
        "state": "live", "created": now, "history": [[now, "live"]],
        "lineage": {"examples_seen": 0}})
    with EventProducer(kafka) as p:
        for surface in SURFACES:
            for i in range(30):
                for u in range(3):
                    p.send(new_event(f"sf-seed{u}", f"{NAMESPACE}{surface}-i{i}", "like",
                                     author=f"sf-a{i % 7}", surface=surface))
    path = tmp_path_factory.mktemp("surfaces") / "reels3x.pt"
    model_store.trainer_from_bytes(weights(0.3), frozen=False).save(path)
    code, out, err = cli(kafka, "models", "register", "--model", REELS, "--checkpoint",
                         str(path), "--version", "r1", "--type", "reels_mtml", "--surface",
                         "reels", "--tier", "TIER2", "--owner", "surfaces-test")
    assert code == 0, err
    assert "reels_ranker r1: registered (TIER2, reels_mtml on reels" in out
    code, out, err = cli(kafka, "models", "promote", "--model", REELS, "--version", "r1")
    assert code == 0, err
    yield kafka
    for r in model_store.read_registry(kafka).values():
        if r["model"] in (DEFAULT, REELS) and r["state"] in ("live", "canary", "shadow"):
            model_store.set_state(kafka, r, "retired", reason="test cleanup")


def ask_all(client, users: dict) -> dict:
    """One request per (surface, user), all sent at once; (surface, user) -> reply."""
    with ThreadPoolExecutor(len(users)) as pool:
        futures = {key: pool.submit(client.recommend, key[1], key[0], k=10, timeout=3.0,
                                    context={"namespace": NAMESPACE})
                   for key in users}
        return {key: f.result() for key, f in futures.items()}


def answered_by(replies: dict) -> dict:
    """surface -> the set of ``model:version`` that ranked its replies."""
    out: dict = {}
    for (surface, _), reply in replies.items():
        out.setdefault(surface, set()).add(reply.model_versions.get("ranker"))
    return out


def wait_for(client, want: dict, prefix: str, timeout: float = 60.0) -> dict:
    """Ask until every surface is answered as ``want`` says, with items; the last replies."""
    deadline, n = time.time() + timeout, 0
    while True:
        users = {(s, f"{prefix}{n}-{i}"): None for s in SURFACES for i in range(3)}
        n += 1
        replies = ask_all(client, users)
        got = answered_by(replies)
        if got == want and all(r.items for r in replies.values()):
            return replies
        assert time.time() < deadline, f"wanted {want}, got {got}"
        time.sleep(0.5)


def test_each_surface_is_served_by_its_own_model_at_the_same_time(two_models):
    kafka = two_models
    code, out, _ = cli(kafka, "models", "list", "--surface", "reels")
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [(r[0], r[1], r[2], r[4], r[5]) for r in rows] == [
        (REELS, "r1", "live", "reels", "reels_mtml")]

    want = {"explore": {f"{DEFAULT}:sf-d1"}, "reels": {f"{REELS}:r1"},
            "home": {f"{DEFAULT}:sf-d1"}}
    with RecommendationClient(kafka) as client:
        wait_for(client, want, "sf-w")
        # Both live at once: thirty requests over the three surfaces, sent together.
        users = {(s, f"sf-u{i}"): None for s in SURFACES for i in range(10)}
        replies = ask_all(client, users)
    assert answered_by(replies) == want
    assert all(r.items and not r.fallback for r in replies.values())

    # What each model predicted for the items it served: 10% and 30% click.
    requests = {r.request_id: surface for (surface, _), r in replies.items()}

    def logged(messages):
        return [m for m in (orjson.loads(v) for _, v in messages)
                if m.get("request_id") in requests and m.get("role") == "production"]
    messages = logged(read_topic(kafka, PREDICTIONS, timeout=30,
                                 until=lambda ms: len(logged(ms)) >= len(requests)))
    assert len(messages) == len(requests)
    click = {}
    for m in messages:
        head = m["heads"].index("click")
        assert m["surface"] == requests[m["request_id"]]
        click.setdefault(m["model"], []).extend(
            p[2][head] for p in m["items"] if p[1] == "served")
    assert set(click) == {f"{DEFAULT}:sf-d1", f"{REELS}:r1"}
    mean = {k: sum(v) / len(v) for k, v in click.items()}
    assert mean[f"{DEFAULT}:sf-d1"] == pytest.approx(0.1, abs=0.01)
    assert mean[f"{REELS}:r1"] == pytest.approx(0.3, abs=0.03)


def test_a_canary_of_the_reels_model_takes_reels_users_and_leaves_explore_alone(two_models):
    kafka = two_models
    code, out, err = cli(kafka, "models", "register", "--model", REELS, "--parent",
                         "r1", "--version", "r2")
    assert code == 0, err
    code, out, err = cli(kafka, "models", "promote", "--model", REELS, "--version",
                         "r2", "--to", "canary", "--share", "1.0")
    assert code == 0, err
    want = {"explore": {f"{DEFAULT}:sf-d1"}, "reels": {f"{REELS}:r2"},
            "home": {f"{DEFAULT}:sf-d1"}}
    with RecommendationClient(kafka) as client:
        wait_for(client, want, "sf-c")
        # The canary retired: reels returns to its production version at once.
        from stores import model_store
        model_store.set_state(kafka, model_store.read_registry(kafka)[f"{REELS}/r2"], "retired",
                              reason="surfaces-test: canary over")
        wait_for(client, {**want, "reels": {f"{REELS}:r1"}}, "sf-r", timeout=30.0)

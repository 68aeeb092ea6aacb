"""The go-live gate against the real broker: a worker trains online on labelled examples
written to ``training.examples``; a version worse than the live one is kept registered and
never served, a better one goes live and is served."""
from __future__ import annotations

import random
import threading
import time

import orjson
import pytest

from models.features import Example

pytestmark = pytest.mark.integration

ITEMS, USERS = 10, 20


def examples(phase: str, n: int, rng: random.Random) -> list[dict]:
    """``P``: items 0-4 get clicked (60%), 5-9 rarely (5%); ``Q``: the other way round;
    ``noise``: every item at the same rate.  Half the clicks are liked."""
    out = []
    for _ in range(n):
        u, i = rng.randrange(USERS), rng.randrange(ITEMS)
        good = i < ITEMS // 2 if phase == "P" else i >= ITEMS // 2
        rate = 0.325 if phase == "noise" else 0.6 if good else 0.05
        click = rng.random() < rate
        like = click and rng.random() < 0.5
        out.append(Example(f"gate-u{u}", f"gate-i{i}", f"gate-a{i % 3}", "explore", ts=time.time(),
                           labels={"click": int(click), "like": int(like)}).to_dict())
    return out


class Feed:
    """Writes phases of examples and watches the registry and what the worker serves."""

    def __init__(self, kafka: str, worker):
        from confluent_kafka import Producer
        self.kafka, self.worker = kafka, worker
        self.producer = Producer({"bootstrap.servers": kafka, "linger.ms": 5})
        self.rng = random.Random(0)
        self.last_offset, self.written = -1, 0
        self.served: set[str] = set()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                live = self.worker.stats()["shared_view"].get("live_model")
            except OSError:
                live = None
            if live:
                self.served.add(live.split(":", 1)[1])
            time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        self._watcher.join(5)
        self.producer = None  # no reconnect attempts once the broker is gone

    def serving(self):
        live = self.worker.stats()["shared_view"].get("live_model")
        return live.split(":", 1)[1] if live else None

    def write(self, phase: str, n: int = 5000, per_message: int = 100) -> None:
        from schemas.topics import TRAINING_EXAMPLES

        def delivered(err, msg):
            assert err is None, err
            self.last_offset = max(self.last_offset, msg.offset())
        for start in range(0, n, per_message):
            self.producer.produce(TRAINING_EXAMPLES, key=b"examples", on_delivery=delivered,
                                  value=orjson.dumps(examples(phase, per_message, self.rng)))
        assert not self.producer.flush(10)
        self.written += n

    def decided(self) -> list[dict]:
        """The trainer's decided versions, oldest first."""
        from stores import model_store
        return sorted((r for r in model_store.read_registry(self.kafka).values()
                       if r.get("owner") == "gate-test" and r["decision"]["decided"]),
                      key=lambda r: r["created"])

    def until(self, phase: str, found, timeout: float = 40.0):
        """Write ``phase`` until ``found(records)`` returns something, judged only once a
        decision covers everything written (so the next phase starts a fresh window)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.write(phase)
            caught_up = None
            while time.time() < deadline:
                if caught_up is None and self.worker.counter("examples_trained") >= self.written:
                    caught_up = time.time()
                if caught_up is not None:
                    records = self.decided()
                    if records and records[-1]["lineage"]["offsets"].get("0", -1) >= self.last_offset:
                        hit = found(records)
                        if hit:
                            return hit
                        break
                    if time.time() - caught_up > 5.0:
                        break  # the trainer decides on a batch after the interval: write more
                time.sleep(0.2)
        counters = self.worker.stats()["counters"]
        raise AssertionError(
            f"phase {phase}: not found within {timeout:.0f} s; written up to offset "
            f"{self.last_offset}; trainer counters: "
            + str({k: v for k, v in counters.items() if "train" in k or "model" in k})
            + "; decisions: " + "; ".join(f"{r['state']}: {r['decision']['reason']}"
                                          for r in self.decided()[-8:]))


@pytest.fixture
def feed(kafka, worker, tmp_path):
    from stores import model_store
    from streams.local import WorkerProcess
    def retire_live():
        for record in model_store.read_registry(kafka).values():
            if record["state"] == "live":
                model_store.set_state(kafka, record, "retired")
    retire_live()  # the trainer starts fresh, with nothing live
    worker.stop()  # one consumer of training.examples: this test's trainer
    trainer = WorkerProcess(kafka, tmp_path / "gate-trainer", web_port=worker.web_port + 4,
                            env={"STREAMREC_PUBLISH_INTERVAL_S": "1",
                                 "STREAMREC_MODEL_OWNER": "gate-test"})
    trainer.start()
    f = Feed(kafka, trainer)
    try:
        yield f
    finally:
        f.close()
        trainer.stop()
        retire_live()  # later tests check retrieval and the cold-start path
        worker.start()


def wait_served(feed: Feed, version: str, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    while version not in feed.served:
        assert time.time() < deadline, f"worker never served {version}; serves {feed.serving()}"
        time.sleep(0.2)


def test_worse_version_stays_registered_better_one_is_served(feed):
    # 1. Until a version beats the base rate nothing is served; the first that does is.
    first = feed.until("P", lambda rs: next((r for r in rs if r["decision"]["go_live"]), None))
    assert first["decision"]["evidence"]["live_version"] is None
    assert first["decision"]["evidence"]["heads"]["click"]["candidate"]["ne"] < 1
    rejected_first = [r for r in feed.decided() if r["created"] < first["created"]]
    assert rejected_first and all(r["state"] == "registered" for r in rejected_first)
    assert all("does not beat the base rate" in r["decision"]["reason"] for r in rejected_first)
    wait_served(feed, first["version"])
    assert not {r["version"] for r in rejected_first} & feed.served

    # 2. Labels that carry no signal teach the trainer to forget the pattern: none of its
    # versions beats the base rate there, so none goes live.
    noisy_from = len(feed.decided())
    feed.until("noise", lambda rs: len(rs) >= noisy_from + 2)
    live, back_from = feed.serving(), len(feed.decided())

    # 3. Back on the pattern, the trainer's version is worse than the live one on the same
    # examples: it is registered with that evidence and never served.
    def worse_than_live(records):
        return next((r for r in records[back_from:] if r["state"] == "registered"
                     and r["decision"]["evidence"]["live_version"] == live
                     and r["decision"]["evidence"]["candidate_ne"]
                     > r["decision"]["evidence"]["live_ne"]), None)
    worse = feed.until("P", worse_than_live)
    assert live in feed.served and worse["version"] not in feed.served
    click = worse["decision"]["evidence"]["heads"]["click"]
    assert click["n"] >= 500 and click["positives"] >= 30
    assert click["candidate"]["ne"] > click["live"]["ne"]

    # 4. The items swap: the live version is now wrong, the trainer learns the new pattern,
    # its version beats the live one on the newest examples, goes live and is served.
    def better_than_live(records):
        return next((r for r in records if r["created"] > worse["created"]
                     and r["decision"]["go_live"]), None)
    better = feed.until("Q", better_than_live)
    evidence = better["decision"]["evidence"]
    assert evidence["live_version"] is not None
    assert evidence["candidate_ne"] < evidence["live_ne"] - evidence["rules"]["min_ne_gain"]
    wait_served(feed, better["version"])
    # One version is live: the one it replaced was retired, and its weights are kept
    # however many registered versions came after it.
    from stores import model_store
    registry = model_store.read_registry(feed.kafka)
    assert [r["version"] for r in model_store.live_records(registry, "ranker")] == [better["version"]]
    assert registry[f"ranker/{evidence['live_version']}"]["state"] == "retired"
    weights = dict(model_store.published_versions(feed.kafka, "ranker"))
    assert better["version"] in weights and evidence["live_version"] in weights

"""The label join against the real broker: impressions meet engagements, negatives too.

These tests run their own worker with a short attribution window (windows close on
event time, so the shared worker's 30 minutes would make them wait that long); the
shared worker is stopped meanwhile so the two do not split the partitions.
"""
from __future__ import annotations

import time

import orjson
import pytest

from schemas.deadletter import original_bytes
from schemas.topics import EVENTS_DLQ, TRAINING_EXAMPLES
from streams.producer import EventProducer

from .conftest import new_event, read_topic

pytestmark = pytest.mark.integration
#: Attribution window (event time) and quiet time before a quiet partition's clock runs on.
WINDOW_S, IDLE_S = 6.0, 2.0


@pytest.fixture(scope="module")
def label_worker(kafka, worker, tmp_path_factory):
    from streams.local import WorkerProcess
    worker.stop()
    try:
        with WorkerProcess(kafka, tmp_path_factory.mktemp("label-worker"),
                           web_port=worker.web_port + 3,
                           env={"STREAMREC_LABEL_WINDOW_S": str(WINDOW_S),
                                "STREAMREC_LABEL_WALL_WINDOW_S": str(IDLE_S),
                                "STREAMREC_ONLINE_TRAINING": "0"}) as w:
            yield w
    finally:
        worker.start()


def examples_of(kafka, user: str, want: int, timeout: float = 30.0) -> dict:
    """The user's training examples by item, once ``want`` have been written."""
    def mine(msgs):
        return [e for _, v in msgs for e in orjson.loads(v) if e["user_id"] == user]
    examples = mine(read_topic(kafka, TRAINING_EXAMPLES, timeout=timeout,
                               until=lambda m: len(mine(m)) >= want))
    assert len(examples) == want, f"{user}: {len(examples)} examples, wanted {want}"
    return {e["item_id"]: e for e in examples}


def test_impressions_become_labelled_examples(kafka, label_worker):
    now = time.time()
    with EventProducer(kafka) as p:
        p.send(new_event("lab-u", "lab-a", "impression", ts=now, request_id="lab-r1", position=0))
        p.send(new_event("lab-u", "lab-b", "impression", ts=now, request_id="lab-r1", position=1))
        p.send(new_event("lab-u", "lab-c", "impression", ts=now, request_id="lab-r1", position=2))
        p.send(new_event("lab-u", "lab-a", "click", ts=now + 1, request_id="lab-r1"))
        p.send(new_event("lab-u", "lab-a", "like", ts=now + 2, request_id="lab-r1"))
        p.send(new_event("lab-u", "lab-c", "dwell", ts=now + 3, dwell_ms=15_000))
        # An engagement for an item never shown is not a label.
        p.send(new_event("lab-u", "lab-z", "like", ts=now + 3))
    by_item = examples_of(kafka, "lab-u", 3)
    assert set(by_item) == {"lab-a", "lab-b", "lab-c"}, "one example per impression, no more"
    assert by_item["lab-a"]["labels"]["click"] == 1 and by_item["lab-a"]["labels"]["like"] == 1
    assert sum(by_item["lab-b"]["labels"].values()) == 0, "a shown, ignored item is a negative"
    assert by_item["lab-c"]["labels"]["long_dwell"] == 1 and by_item["lab-c"]["labels"]["like"] == 0
    assert by_item["lab-b"]["position"] == 1 and by_item["lab-a"]["request_id"] == "lab-r1"


def test_an_engagement_after_a_quiet_spell_still_counts(kafka, label_worker):
    """A save that comes after the wall window but inside the attribution window."""
    now = time.time()
    with EventProducer(kafka) as p:
        p.send(new_event("quiet-u", "quiet-a", "impression", ts=now, request_id="quiet-r"))
    time.sleep(IDLE_S + 1.0)
    with EventProducer(kafka) as p:
        p.send(new_event("quiet-u", "quiet-a", "save", ts=time.time(), request_id="quiet-r"))
    assert examples_of(kafka, "quiet-u", 1)["quiet-a"]["labels"]["save"] == 1


def test_an_engagement_before_its_impression_is_attached(kafka, label_worker):
    before = label_worker.counter("engagements_waiting")
    now = time.time()
    with EventProducer(kafka) as p:
        p.send(new_event("early-u", "early-a", "like", ts=now + 0.5, request_id="early-r"))
    label_worker.wait_for("engagements_waiting", before + 1, timeout=30)
    with EventProducer(kafka) as p:
        p.send(new_event("early-u", "early-a", "impression", ts=now, request_id="early-r"))
    assert examples_of(kafka, "early-u", 1)["early-a"]["labels"]["like"] == 1


def test_an_engagement_after_its_window_closed_is_counted_late(kafka, label_worker):
    now = time.time()
    with EventProducer(kafka) as p:
        p.send(new_event("late-u", "late-a", "impression", ts=now, request_id="late-r"))
    assert sum(examples_of(kafka, "late-u", 1)["late-a"]["labels"].values()) == 0
    before = label_worker.counter("late_engagements")
    with EventProducer(kafka) as p:
        p.send(new_event("late-u", "late-a", "comment", ts=time.time(), request_id="late-r"))
    label_worker.wait_for("late_engagements", before + 1, timeout=30)


def test_a_future_stamped_event_goes_to_the_dead_letter_topic(kafka, label_worker):
    skewed = orjson.dumps(new_event("skew-u", "skew-a", "like", ts=time.time() + 3600))
    before = label_worker.counter("dead_letters")
    with EventProducer(kafka) as p:
        p.send_raw(b"skew-u", skewed)
    label_worker.wait_for("dead_letters", before + 1, timeout=30)
    letters = [orjson.loads(v) for _, v in read_topic(
        kafka, EVENTS_DLQ, timeout=10,
        until=lambda m: any(original_bytes(orjson.loads(v)) == skewed for _, v in m))]
    [letter] = [d for d in letters if original_bytes(d) == skewed]
    assert "in the future" in letter["reason"] and "clock skew" in letter["reason"]

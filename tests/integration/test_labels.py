"""The label join against the real broker: impressions meet engagements, negatives too."""
from __future__ import annotations

import time

import orjson
import pytest

from schemas.topics import TRAINING_EXAMPLES
from streams.producer import EventProducer

from .conftest import new_event, read_topic

pytestmark = pytest.mark.integration


def test_impressions_become_labelled_examples(kafka, worker):
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

    def mine(msgs):
        return [e for _, v in msgs for e in orjson.loads(v) if e["user_id"] == "lab-u"]
    examples = mine(read_topic(kafka, TRAINING_EXAMPLES, timeout=20,
                               until=lambda m: len(mine(m)) >= 3))
    by_item = {e["item_id"]: e for e in examples}
    assert set(by_item) == {"lab-a", "lab-b", "lab-c"}, "one example per impression, no more"
    assert by_item["lab-a"]["labels"]["click"] == 1 and by_item["lab-a"]["labels"]["like"] == 1
    assert sum(by_item["lab-b"]["labels"].values()) == 0, "a shown, ignored item is a negative"
    assert by_item["lab-c"]["labels"]["long_dwell"] == 1 and by_item["lab-c"]["labels"]["like"] == 0
    assert by_item["lab-b"]["position"] == 1 and by_item["lab-a"]["request_id"] == "lab-r1"

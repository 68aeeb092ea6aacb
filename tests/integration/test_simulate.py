"""The closed loop against a real broker and worker: every served item is seen once."""
from __future__ import annotations

import orjson
import pytest

from models.world import WorldConfig
from schemas.topics import EVENTS
from streams.simulate import NAMES, run

from .conftest import read_topic

pytestmark = pytest.mark.integration


def sim_events(messages) -> list[dict]:
    """Events of simulated users; a message holds one event or a JSON array of them."""
    out = []
    for _, value in messages:
        data = orjson.loads(value)
        for e in data if isinstance(data, list) else [data]:
            if isinstance(e, dict) and str(e.get("user_id", "")).startswith("sim-u"):
                out.append(e)
    return out


def test_closed_loop_events_match_what_was_served(kafka, worker):
    served: list = []
    config = WorldConfig(n_users=30, n_authors=10, items_per_author=6, seed=11,
                         shift_at=3.0)
    result = run(kafka, config, requests_per_s=10, duration_s=5, k=5, progress=False,
                 warmup_sessions=60, settle_s=2.0, log=served)
    assert result["run"]["sent"] >= 40
    assert result["run"]["answered"] >= 0.8 * result["run"]["sent"]
    assert served, f"the system served no simulated items: {result['run']}"

    expected = {(r["request_id"], item, pos) for r in served for pos, item in enumerate(r["items"])}
    served_ids = {r["request_id"] for r in served}

    def complete(messages):
        got = {(e.get("request_id"), e["item_id"], e.get("position"))
               for e in sim_events(messages) if e["event_type"] == "impression"}
        return expected <= got
    events = [e for e in sim_events(read_topic(kafka, EVENTS, timeout=20, until=complete))
              if e.get("request_id") in served_ids]

    impressions = [(e["request_id"], e["item_id"], e["position"])
                   for e in events if e["event_type"] == "impression"]
    assert sorted(impressions) == sorted(expected)  # exactly one each, right request and position
    engagements = [e for e in events if e["event_type"] != "impression"]
    assert engagements, "no engagement at all in a 5 s loop"
    for e in engagements:
        assert (e["request_id"], e["item_id"], e["position"]) in expected
        if e["event_type"] == "dwell":
            assert e["dwell_ms"] >= 0

    for name in NAMES:
        p = result["policies"][name]
        assert p["value_per_request"] is not None and p["engagement_per_impression"] is not None
    assert result["policies"]["oracle"]["value_per_request"] >= result["policies"]["random"]["value_per_request"]
    assert "share_of_oracle" in result and result["over_time"]
    assert "available" in result["prediction_quality"]
    assert result["adaptation"]["shift_at"] == 3.0
    orjson.dumps(result)  # the summary is JSON

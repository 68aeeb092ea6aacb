"""The closed loop against a real broker and worker: every served item is seen once,
and a run on a worker that serves other data (and earlier runs) serves only its own world."""
from __future__ import annotations

import orjson
import pytest

from models.world import WorldConfig
from schemas.topics import EVENTS
from streams.simulate import NAMES, run

from .conftest import new_event, read_topic

pytestmark = pytest.mark.integration


def sim_events(messages, namespace: str = "sim-") -> list[dict]:
    """Events of simulated users in ``namespace``; a message holds one event or a JSON
    array of them.  Other tests share the topic and some send malformed messages on
    purpose: those are not the simulator's and are skipped."""
    out = []
    for _, value in messages:
        try:
            data = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
        for e in data if isinstance(data, list) else [data]:
            if isinstance(e, dict) and str(e.get("user_id", "")).startswith(namespace):
                out.append(e)
    return out


def test_closed_loop_events_match_what_was_served(kafka, worker):
    served: list = []
    config = WorldConfig(n_users=30, n_authors=10, items_per_author=6, seed=11,
                         shift_at=3.0)
    result = run(kafka, config, requests_per_s=10, duration_s=5, k=5, progress=False,
                 warmup_sessions=60, settle_s=2.0, log=served)
    namespace = result["run"]["namespace"]
    assert result["run"]["sent"] >= 40
    assert result["run"]["answered"] >= 0.8 * result["run"]["sent"]
    assert served, f"the system served no simulated items: {result['run']}"

    expected = {(r["request_id"], item, pos) for r in served for pos, item in enumerate(r["items"])}
    served_ids = {r["request_id"] for r in served}

    def complete(messages):
        got = {(e.get("request_id"), e["item_id"], e.get("position"))
               for e in sim_events(messages, namespace) if e["event_type"] == "impression"}
        return expected <= got
    events = [e for e in sim_events(read_topic(kafka, EVENTS, timeout=20, until=complete),
                                    namespace) if e.get("request_id") in served_ids]

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


def test_a_run_on_a_shared_worker_serves_only_its_own_world(kafka, worker):
    """What `make demo` leaves running: real data trending on the same surface, and an
    earlier simulator run with the same seed."""
    from streams.producer import EventProducer
    with EventProducer(kafka) as producer:
        for n in range(600):  # 30 foreign items, 20 likes each: they top trending
            producer.send(new_event(f"fan{n % 60}", f"movie-{n % 30}", "like",
                                    author=f"director-{n % 30}"))
    config = WorldConfig(n_users=30, n_authors=10, items_per_author=6, seed=11)
    first = run(kafka, config, requests_per_s=10, duration_s=3, k=5, progress=False,
                warmup_sessions=60, settle_s=2.0, tag="first")
    served: list = []
    second = run(kafka, config, requests_per_s=10, duration_s=5, k=5, progress=False,
                 warmup_sessions=60, settle_s=2.0, tag="second", log=served, bucket_s=1.0)

    for result in (first, second):
        r = result["run"]
        assert r["foreign_items"] == 0, r
        assert r["answered"] >= 0.8 * r["sent"] and r["empty_replies"] <= 0.1 * r["answered"], r
    assert first["run"]["namespace"] == "sim-first-" and second["run"]["namespace"] == "sim-second-"
    items = [i for s in served for i in s["items"]]
    assert items and all(i.startswith("sim-second-i") for i in items)
    assert all(s["user_id"].startswith("sim-second-u") for s in served)
    # The summary covers the whole run: one window per second from 0, every request counted.
    series = second["over_time"]
    assert [row["t"] for row in series] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert sum(row["sent"] for row in series) == second["run"]["sent"]
    assert series[0]["requests"] > 0 and series[-1]["requests"] > 0
    assert second["model_versions"] and second["model_versions"][0]["ranker"] == "blend-v1"

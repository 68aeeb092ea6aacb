"""Wire schemas: events, requests/replies, dead letters and the topic catalogue."""
from __future__ import annotations

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from schemas.deadletter import dead_letter, original_bytes
from schemas.events import (EVENT_TYPES, MAX_FUTURE_SKEW_S, SCHEMA_VERSION, EngagementEvent,
                            SchemaError, parse_event, parse_events)
from schemas.requests import (MAX_EXCLUDE, MAX_K, RankedItem, RecommendationReply,
                              decode_reply, decode_request, parse_request)
from schemas.topics import (ALERTS, AUTHOR_ITEMS, CONFIG, EVENTS_DLQ, MODEL_REGISTRY, MODEL_WEIGHTS,
                            STABILITY, STATS,
                            PREGEN, TRAINING_EXAMPLES,
                            TRENDING_SNAPSHOTS, catalogue, changelog_name,
                            partition_for)

NOW = 1_700_000_000.0


def event(**overrides) -> dict:
    base = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "event_type": "like",
            "surface": "explore", "ts": NOW}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def request(**overrides) -> dict:
    base = {"request_id": "r1", "user_id": "u1", "surface": "explore", "k": 10,
            "deadline": NOW + 1.0}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


# --------------------------------------------------------------------------- events

def test_valid_event_parses_with_defaults():
    ev = parse_event(event(author_id="a1", position=3, region="eu"))
    assert ev == EngagementEvent("e1", "u1", "i1", "like", "explore", NOW, author_id="a1",
                                 position=3, region="eu")
    assert ev.schema_version == SCHEMA_VERSION


@pytest.mark.parametrize("field", ["event_id", "user_id", "item_id"])
def test_missing_id_names_the_field(field):
    with pytest.raises(SchemaError, match=rf"missing required field '{field}'"):
        parse_event(event(**{field: None}))


@pytest.mark.parametrize("field", ["event_id", "user_id", "item_id", "author_id", "request_id"])
def test_bool_id_is_refused(field):
    with pytest.raises(SchemaError, match=rf"'{field}' must be a string or integer id, got bool"):
        parse_event(event(**{field: True}))


@pytest.mark.parametrize("field", ["user_id", "item_id"])
def test_negative_int_id_is_refused(field):
    with pytest.raises(SchemaError, match=rf"'{field}' must be non-negative, got -5"):
        parse_event(event(**{field: -5}))


def test_empty_overlong_and_float_ids_are_refused():
    with pytest.raises(SchemaError, match=r"'item_id' must be 1\.\.128 characters, got 0"):
        parse_event(event(item_id=""))
    with pytest.raises(SchemaError, match=r"'item_id' must be 1\.\.128 characters, got 129"):
        parse_event(event(item_id="x" * 129))
    with pytest.raises(SchemaError, match=r"'user_id' must be a string or integer id, got float"):
        parse_event(event(user_id=7.0))


def test_int_ids_are_normalised_to_str():
    ev = parse_event(event(event_id=1, user_id=0, item_id=99, author_id=12, request_id=5))
    assert (ev.event_id, ev.user_id, ev.item_id, ev.author_id, ev.request_id) == \
        ("1", "0", "99", "12", "5")
    assert all(isinstance(x, str) for x in (ev.event_id, ev.user_id, ev.item_id))


@pytest.mark.parametrize("surface", ["Explore", "", "1feed", "has space", "a" * 65, 5, None])
def test_bad_surface_is_refused(surface):
    with pytest.raises(SchemaError, match=r"'surface' must match"):
        parse_event(event(surface=surface) if surface is not None else
                    {k: v for k, v in event().items() if k != "surface"})


@pytest.mark.parametrize("surface", ["explore", "home_feed", "s2", "a" * 64])
def test_good_surfaces_are_accepted(surface):
    assert parse_event(event(surface=surface)).surface == surface


@pytest.mark.parametrize("event_type", ["nope", "LIKE", "", 1])
def test_unknown_event_type_lists_the_valid_ones(event_type):
    with pytest.raises(SchemaError) as info:
        parse_event(event(event_type=event_type))
    msg = str(info.value)
    assert msg.startswith("'event_type' must be one of")
    assert all(t in msg for t in EVENT_TYPES)
    assert repr(event_type) in msg


def test_missing_event_type_is_refused():
    record = event()
    del record["event_type"]
    with pytest.raises(SchemaError, match=r"'event_type' must be one of .*got None"):
        parse_event(record)


@pytest.mark.parametrize("ts", ["1700000000", True, float("nan"), float("inf"), None])
def test_non_numeric_ts_is_refused(ts):
    record = event()
    record["ts"] = ts
    with pytest.raises(SchemaError, match=r"'ts' must be a finite number"):
        parse_event(record)


def test_ms_timestamp_is_refused_when_now_is_known():
    with pytest.raises(SchemaError, match=r"milliseconds"):
        parse_event(event(ts=NOW * 1000), now=NOW)


def test_ms_timestamp_is_refused_without_now():
    with pytest.raises(SchemaError, match=r"millisecond"):
        parse_event(event(ts=NOW * 1000))


def test_pre_2001_timestamp_is_refused():
    with pytest.raises(SchemaError, match=r"'ts' must be epoch seconds after 2001-01-01"):
        parse_event(event(ts=978307199.0))
    assert parse_event(event(ts=978307200.0)).ts == 978307200.0


def test_future_ts_is_refused_beyond_the_allowed_clock_skew():
    # One event stamped far ahead would lift its partition's watermark and close every
    # open impression there as a negative, so it goes to the dead-letter topic instead.
    edge = NOW + MAX_FUTURE_SKEW_S
    assert parse_event(event(ts=edge), now=NOW).ts == edge
    with pytest.raises(SchemaError, match=rf"'ts' is {MAX_FUTURE_SKEW_S + 1:.0f} s in the future; "
                                          rf"at most {MAX_FUTURE_SKEW_S:.0f} s"):
        parse_event(event(ts=edge + 1.0), now=NOW)
    with pytest.raises(SchemaError, match=r"'ts' is 3600 s in the future"):
        parse_event(event(ts=NOW + 3600.0), now=NOW)
    # Without a clock, a plausible future timestamp is not judged.
    assert parse_event(event(ts=NOW + 10 * 86400.0)).ts == NOW + 10 * 86400.0


def test_dwell_needs_dwell_ms():
    with pytest.raises(SchemaError, match=r"a 'dwell' event needs 'dwell_ms'"):
        parse_event(event(event_type="dwell"))
    assert parse_event(event(event_type="dwell", dwell_ms=0)).dwell_ms == 0
    assert parse_event(event(event_type="dwell", dwell_ms=4500)).dwell_ms == 4500


@pytest.mark.parametrize("field,value", [("dwell_ms", -1), ("dwell_ms", True),
                                         ("dwell_ms", 1.5), ("position", -1), ("position", "3")])
def test_bad_optional_ints_are_refused(field, value):
    with pytest.raises(SchemaError, match=rf"'{field}' must be an integer >= 0"):
        parse_event(event(**{field: value}))


@pytest.mark.parametrize("region", ["", "x" * 17, 5])
def test_bad_region_is_refused(region):
    with pytest.raises(SchemaError, match=r"'region' must be a short string"):
        parse_event(event(region=region))


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_schema_version_is_refused(version):
    record = event()
    record["schema_version"] = version
    with pytest.raises(SchemaError, match=rf"unsupported schema_version {version!r}"):
        parse_event(record)


def test_bool_schema_version_is_refused():
    with pytest.raises(SchemaError, match="schema_version"):
        parse_event(event(schema_version=True))


def test_explicit_current_schema_version_is_accepted():
    assert parse_event(event(schema_version=SCHEMA_VERSION)).schema_version == SCHEMA_VERSION


def test_non_object_event_is_refused():
    with pytest.raises(SchemaError, match=r"an event must be a JSON object, got list"):
        parse_event([event()])


def test_event_json_round_trip_drops_nones():
    ev = parse_event(event(author_id="a"))
    d = orjson.loads(ev.to_json())
    assert "dwell_ms" not in d and "region" not in d
    assert parse_event(d) == ev


# --------------------------------------------------------------------------- batches

def test_single_object_message_is_a_batch_of_one():
    [(index, ev)] = parse_events(orjson.dumps(event()), now=NOW)
    assert index == 0 and isinstance(ev, EngagementEvent) and ev.item_id == "i1"


def test_one_bad_element_does_not_cost_the_valid_ones():
    raw = orjson.dumps([event(item_id="a"), event(user_id=True), "junk", event(item_id="b"),
                        event(ts=NOW + 2 * 86400.0)])
    out = parse_events(raw, now=NOW)
    assert [i for i, _ in out] == [0, 1, 2, 3, 4]
    assert [x.item_id for _, x in out if isinstance(x, EngagementEvent)] == ["a", "b"]
    errors = {i: str(x) for i, x in out if isinstance(x, SchemaError)}
    assert set(errors) == {1, 2, 4}
    assert "got bool" in errors[1]
    assert "JSON object, got str" in errors[2]
    assert "in the future" in errors[4]


@pytest.mark.parametrize("raw,match", [
    (b"\xff\xfe\x00", "not valid JSON"),
    (b"{oops", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[]", "empty JSON array"),
    (None, r"empty message \(null value\)"),
])
def test_unreadable_messages_raise(raw, match):
    with pytest.raises(SchemaError, match=match):
        parse_events(raw, now=NOW)


def test_json_null_yields_no_valid_event():
    out = parse_events(b"null", now=NOW)
    assert out and all(isinstance(x, SchemaError) for _, x in out)


# --------------------------------------------------------------------------- requests

def test_valid_request_parses():
    req = parse_request(request(user_id=3, exclude=["a", 7], reply_partition=2,
                                context={"page": 1}, sent_at=NOW))
    assert (req.user_id, req.k, req.exclude, req.reply_partition, req.context, req.sent_at) == \
        ("3", 10, ("a", "7"), 2, {"page": 1}, NOW)


def test_request_defaults():
    record = request()
    del record["k"]
    req = parse_request(record)
    assert req.k == 10 and req.exclude == () and req.reply_partition is None \
        and req.context == {} and req.sent_at is None


@pytest.mark.parametrize("k", [0, -1, MAX_K + 1, True, 2.0, "5"])
def test_k_out_of_bounds_is_refused(k):
    with pytest.raises(SchemaError, match=rf"'k' must be an integer in 1\.\.{MAX_K}"):
        parse_request(request(k=k))


@pytest.mark.parametrize("k", [1, MAX_K])
def test_k_bounds_are_inclusive(k):
    assert parse_request(request(k=k)).k == k


@pytest.mark.parametrize("exclude", ["i1", {"i1": 1}, ["x"] * (MAX_EXCLUDE + 1)])
def test_exclude_must_be_a_bounded_list(exclude):
    with pytest.raises(SchemaError, match=r"'exclude' must be a list"):
        parse_request(request(exclude=exclude))


@pytest.mark.parametrize("bad,match", [(True, "got bool"), (-1, "non-negative"),
                                       (1.5, "got float"), ("", "characters")])
def test_exclude_elements_are_ids(bad, match):
    with pytest.raises(SchemaError, match=match):
        parse_request(request(exclude=["ok", bad]))


@pytest.mark.parametrize("rp", [-1, True, "0", 1.0])
def test_bad_reply_partition_is_refused(rp):
    with pytest.raises(SchemaError, match=r"'reply_partition' must be a partition number"):
        parse_request(request(reply_partition=rp))


def test_reply_partition_zero_is_kept():
    assert parse_request(request(reply_partition=0)).reply_partition == 0


@pytest.mark.parametrize("deadline", [None, "soon", True, float("nan")])
def test_deadline_is_a_required_finite_number(deadline):
    record = request()
    record["deadline"] = deadline
    with pytest.raises(SchemaError, match=r"'deadline' must be a finite number"):
        parse_request(record)


def test_request_missing_ids_and_bad_surface():
    with pytest.raises(SchemaError, match=r"missing required field 'request_id'"):
        parse_request(request(request_id=None))
    with pytest.raises(SchemaError, match=r"'surface' must match"):
        parse_request(request(surface="Bad Surface"))
    with pytest.raises(SchemaError, match=r"a request must be a JSON object"):
        parse_request([request()])
    with pytest.raises(SchemaError, match=r"'context' must be a JSON object"):
        parse_request(request(context=["x"]))


def test_request_json_round_trip():
    req = parse_request(request(exclude=["a", "b"], reply_partition=1, context={"x": 1}))
    assert decode_request(req.to_json()) == req
    with pytest.raises(SchemaError, match="not valid JSON"):
        decode_request(b"{nope")


# --------------------------------------------------------------------------- replies

def test_reply_round_trip():
    reply = RecommendationReply(
        request_id="r1", user_id="u1", surface="explore",
        items=[RankedItem("i1", 0.9, ("history", "trending"), "a1"),
               RankedItem("i2", 0.5, ("trending",))],
        model_versions={"ranker": "blend-v1"}, fallback=True, server_latency_ms=1.25,
        fallback_reason="deadline", stage_counts={"retrieved": 3, "returned": 2})
    back = decode_reply(reply.to_json())
    assert back == reply
    assert back.items[0].sources == ("history", "trending")
    assert back.items[1].author_id is None


def test_reply_round_trip_without_optional_fields():
    reply = RecommendationReply("r", "u", "explore", [], {}, False, 0.0)
    d = orjson.loads(reply.to_json())
    assert "fallback_reason" not in d and "error" not in d
    assert decode_reply(reply.to_json()) == reply


# --------------------------------------------------------------------------- dead letters

def test_dead_letter_keeps_original_bytes_through_json():
    raw = b"\xff\x00not utf-8 {"
    dl = dead_letter(raw, "not valid JSON", "events", 3, 42, index=1, key=b"u1")
    back = orjson.loads(orjson.dumps(dl))
    assert original_bytes(back) == raw
    assert (back["reason"], back["source_topic"], back["source_partition"],
            back["source_offset"], back["index"], back["key"]) == \
        ("not valid JSON", "events", 3, 42, 1, "u1")


def test_dead_letter_of_null_value():
    dl = dead_letter(None, "empty message", "events", 0, 0)
    assert original_bytes(dl) == b"" and dl["key"] is None and dl["index"] is None


# --------------------------------------------------------------------------- topics

@pytest.mark.parametrize("partitions", [1, 4, 12])
def test_keyed_topics_and_changelogs_share_the_partition_count(partitions):
    specs = catalogue(partitions=partitions, app_id="myapp")
    singles = {EVENTS_DLQ, TRENDING_SNAPSHOTS, AUTHOR_ITEMS, PREGEN, CONFIG, TRAINING_EXAMPLES,
               MODEL_WEIGHTS, MODEL_REGISTRY, STABILITY, ALERTS, STATS}
    keyed = [t for t in specs if t.name not in singles]
    assert {t.partitions for t in keyed} == {partitions}
    assert {t.partitions for t in specs if t.name in singles} == {1}
    names = {t.name for t in specs}
    assert {changelog_name("myapp", "user_history"),
            changelog_name("myapp", "item_stats")} <= names
    assert changelog_name("myapp", "user_history") == "myapp-user_history-changelog"


def test_topic_names_are_unique():
    names = [t.name for t in catalogue()]
    assert len(names) == len(set(names)) == 21


def test_compacted_topics_have_no_retention():
    specs = catalogue()
    compacted = [t for t in specs if t.compact]
    assert {t.name for t in compacted} >= {"trending.snapshots", "item.profiles", "author.items", "pregen.sources", "config.funnel"}
    for t in compacted:
        assert t.retention_ms is None
        # Only a topic that keeps its recent history whole (cluster.stats) says more.
        kept_whole = ({"min.compaction.lag.ms": str(t.compaction_lag_ms),
                       "segment.ms": str(max(60_000, t.compaction_lag_ms // 10))}
                      if t.compaction_lag_ms else {})
        assert t.config() == {"cleanup.policy": "compact", **kept_whole}
    for t in specs:
        if not t.compact:
            assert t.config()["cleanup.policy"] == "delete"
            assert int(t.config()["retention.ms"]) == t.retention_ms > 0


KEYS = ["0", "1", "42", "u-123", "user:ü", "x" * 100]


@pytest.mark.parametrize("partitions", [1, 3, 4, 16])
def test_partition_for_matches_aiokafka_default_partitioner(partitions):
    parts = list(range(partitions))
    for key in KEYS:
        p = partition_for(key, partitions)
        assert p == partition_for(key, partitions)
        assert p == DefaultPartitioner()(key.encode(), parts, parts)
        assert 0 <= p < partitions


def test_partition_for_spreads_keys():
    assert len({partition_for(str(i), 4) for i in range(100)}) == 4


@pytest.mark.parametrize("key,expected", [
    ("", 681), ("a", 524), ("ab", 434), ("abc", 107), ("123456789", 566)])
def test_partition_for_matches_java_murmur2(key, expected):
    # Reference values of the Java client's murmur2 partitioner over 1000 partitions.
    assert partition_for(key, 1000) == expected

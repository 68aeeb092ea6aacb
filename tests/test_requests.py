"""Request limits, stale requests and the client's reply bookkeeping (no broker)."""
from __future__ import annotations

import inspect
import time

import orjson
import pytest

from models.funnel import StaticItemView, recommend
from models.history import UserHistory
from schemas.events import SchemaError
from schemas.requests import (MAX_CONTEXT_BYTES, MAX_CONTEXT_KEYS, MAX_EXCLUDE, MAX_K,
                              RecommendationRequest, parse_request)
from streams.client import PendingReplies, RecommendationTimeout


def request(**fields) -> dict:
    return {"request_id": "r1", "user_id": "u1", "surface": "explore", "k": 10,
            "deadline": time.time() + 2.0, **fields}


def test_the_simulators_probe_fits_the_k_limit():
    from streams.simulate import run
    assert inspect.signature(run).parameters["probe_k"].default <= MAX_K


@pytest.mark.parametrize("fields,match", [
    ({"k": MAX_K + 1}, rf"'k' must be an integer in 1\.\.{MAX_K}, got {MAX_K + 1}"),
    ({"exclude": [str(i) for i in range(MAX_EXCLUDE + 1)]},
     rf"'exclude' must be a list of at most {MAX_EXCLUDE} item ids"),
    ({"context": {f"k{i}": i for i in range(MAX_CONTEXT_KEYS + 1)}},
     rf"'context' must have at most {MAX_CONTEXT_KEYS} keys, got {MAX_CONTEXT_KEYS + 1}"),
    ({"context": {"blob": "x" * MAX_CONTEXT_BYTES}},
     rf"'context' must encode to at most {MAX_CONTEXT_BYTES} bytes, got {MAX_CONTEXT_BYTES + 11}"),
    ({"context": {"nested": [[0] * 2000]}}, r"'context' must encode to at most"),
])
def test_requests_over_a_limit_are_refused_with_the_limit_named(fields, match):
    with pytest.raises(SchemaError, match=match):
        parse_request(request(**fields))


def test_requests_at_every_limit_parse():
    context = {f"k{i}": "v" for i in range(MAX_CONTEXT_KEYS)}
    assert len(orjson.dumps(context)) <= MAX_CONTEXT_BYTES
    req = parse_request(request(k=MAX_K, exclude=[str(i) for i in range(MAX_EXCLUDE)],
                                context=context))
    assert (req.k, len(req.exclude), len(req.context)) == (MAX_K, MAX_EXCLUDE, MAX_CONTEXT_KEYS)


def test_the_worst_request_within_the_limits_is_answered_quickly():
    # The costly case for the fallback and the rerank: every other trending item
    # excluded, and what is left all by one author, so no slot keeps authors apart.
    # At the old limits (k=500, 10,000 excluded) this took 14.8 s here.
    n = 4 * MAX_K + 2 * MAX_EXCLUDE
    trending = [(f"i{j}", float(n - j), f"a{j % 2}") for j in range(n)]
    view = StaticItemView(trending={"explore": trending})
    excluded = [f"i{j}" for j in range(0, 2 * MAX_EXCLUDE, 2)]
    now = time.time()
    for deadline in (now + 10.0, now):  # the full funnel, then the fallback alone
        req = RecommendationRequest("r", "u", "explore", MAX_K, deadline, exclude=tuple(excluded))
        t0 = time.perf_counter()
        reply = recommend(req, UserHistory(), view, clock=lambda: now)
        elapsed = time.perf_counter() - t0
        assert len(reply.items) == MAX_K and not set(excluded) & {i.item_id for i in reply.items}
        assert elapsed < 2.0, f"{elapsed:.2f} s for one request at the limits"


def test_expired_requests_are_recognised_at_their_deadline():
    from streams.serving import expired
    req = parse_request(request(deadline=1000.0))
    assert not expired(req, 999.99) and expired(req, 1000.0) and expired(req, 5000.0)


def test_each_request_ends_once_by_its_deadline_and_extra_replies_are_counted():
    pending = PendingReplies(decode=orjson.loads)
    answered = pending.add("a", deadline=5.0, timeout=1.0)
    slow = pending.add("b", deadline=5.0, timeout=1.0)
    pending.expire(now=4.9)
    assert not answered.done() and not slow.done()
    pending.reply("a", b'{"request_id": "a"}')
    pending.expire(now=5.0)
    assert answered.result() == {"request_id": "a"}
    with pytest.raises(RecommendationTimeout, match="no reply to request b within 1000 ms"):
        slow.result(0)
    # A redelivered request answered again, and an answer after the deadline.
    pending.reply("a", b'{"request_id": "a"}')
    pending.reply("b", b'{"request_id": "b"}')
    pending.reply("someone-else", b'{}')
    assert dict(pending.counts) == {"sent": 2, "answered": 1, "expired": 1,
                                    "duplicate_replies": 1, "late_replies": 1,
                                    "other_replies": 1}


def test_a_malformed_reply_fails_only_its_own_request():
    pending = PendingReplies(decode=orjson.loads)
    bad, good = pending.add("bad", 5.0, 1.0), pending.add("good", 5.0, 1.0)
    pending.reply("bad", b"not json")
    pending.reply("good", b"{}")
    assert isinstance(bad.exception(0), orjson.JSONDecodeError) and good.result(0) == {}


def test_finished_requests_are_remembered_within_a_bound():
    pending = PendingReplies(remember=10, decode=bytes.decode)
    for i in range(100):
        pending.add(str(i), 1.0, 1.0)
        pending.reply(str(i), b"x")
    pending.reply("99", b"x")
    pending.reply("0", b"x")  # forgotten: cannot be told from another client's reply
    assert (pending.counts["duplicate_replies"], pending.counts["other_replies"]) == (1, 1)
    assert len(pending._finished) == 10

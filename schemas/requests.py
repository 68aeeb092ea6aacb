"""Recommendation requests and replies on the request/reply topics.

A client writes a :class:`RecommendationRequest` to ``rec.requests`` keyed by
user id (so it is served where that user's state lives) and waits for the
:class:`RecommendationReply` with the same ``request_id`` on ``rec.replies``.

>>> req = parse_request({"request_id": "r1", "user_id": 3, "surface": "explore",
...                      "k": 5, "deadline": 2e9})
>>> req.k, req.user_id, req.exclude
(5, '3', ())
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import orjson

from schemas.events import SchemaError, as_id, as_number, as_surface, decode_json

#: Request size limits.  The fallback looks ``4*k + len(exclude)`` trending items deep
#: and the rerank is O(k * candidates) when one author dominates what is left: at
#: k=500 with 10,000 excluded ids one request took 14.8 s here; at these limits
#: (the simulator's 200-item probe fits) the worst case is a few hundred ms.
MAX_K = 200
MAX_EXCLUDE = 1_000
#: ``context`` is free-form (``namespace``, ``region``, ...), so bound it as a whole.
MAX_CONTEXT_KEYS = 16
MAX_CONTEXT_BYTES = 2_048


@dataclass(frozen=True, slots=True)
class RecommendationRequest:
    request_id: str
    user_id: str
    surface: str
    k: int
    #: Absolute epoch seconds by which the client needs the reply.
    deadline: float
    exclude: tuple[str, ...] = ()
    context: dict = field(default_factory=dict)
    #: Partition of ``rec.replies`` the client reads; ``None`` = by request id.
    reply_partition: Optional[int] = None
    sent_at: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return {k: v for k, v in d.items() if v is not None}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


@dataclass(frozen=True, slots=True)
class RankedItem:
    item_id: str
    score: float
    #: Every retrieval source that proposed this item, best first.
    sources: tuple[str, ...]
    author_id: Optional[str] = None
    #: source name -> why that source proposed the item.
    why: Optional[dict] = None
    #: source name -> that source's normalised score (0..1) for the item.
    source_scores: Optional[dict] = None


@dataclass(slots=True)
class RecommendationReply:
    request_id: str
    user_id: str
    surface: str
    items: list[RankedItem]
    model_versions: dict[str, str]
    fallback: bool
    server_latency_ms: float
    fallback_reason: Optional[str] = None
    #: Candidates left after each funnel stage, e.g. {"retrieved": 812, ...}.
    stage_counts: dict[str, int] = field(default_factory=dict)
    error: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["items"] = [{k: v for k, v in asdict(it).items() if v is not None} for it in self.items]
        return {k: v for k, v in d.items() if v is not None}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


def parse_request(record: Any) -> RecommendationRequest:
    """Validate one decoded JSON value as a :class:`RecommendationRequest`."""
    if not isinstance(record, dict):
        raise SchemaError(f"a request must be a JSON object, got {type(record).__name__}")
    k = record.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise SchemaError(f"'k' must be an integer in 1..{MAX_K}, got {k!r}")
    exclude = record.get("exclude") or []
    if not isinstance(exclude, list) or len(exclude) > MAX_EXCLUDE:
        raise SchemaError(f"'exclude' must be a list of at most {MAX_EXCLUDE} item ids")
    exclude_ids = tuple(as_id({"exclude": x}, "exclude") for x in exclude)
    context = as_context(record)
    reply_partition = record.get("reply_partition")
    if reply_partition is not None and (
            isinstance(reply_partition, bool) or not isinstance(reply_partition, int)
            or reply_partition < 0):
        raise SchemaError(f"'reply_partition' must be a partition number, got {reply_partition!r}")
    sent_at = record.get("sent_at")
    return RecommendationRequest(
        request_id=as_id(record, "request_id"),
        user_id=as_id(record, "user_id"),
        surface=as_surface(record),
        k=k,
        deadline=as_number(record, "deadline"),
        exclude=exclude_ids,
        context=context,
        reply_partition=reply_partition,
        sent_at=as_number(record, "sent_at") if sent_at is not None else None,
    )


def as_context(record: dict) -> dict:
    """The request's ``context``: a JSON object of at most :data:`MAX_CONTEXT_KEYS`
    entries and :data:`MAX_CONTEXT_BYTES` encoded.

    >>> as_context({"context": {"region": "eu"}})
    {'region': 'eu'}
    >>> as_context({"context": {"blob": "x" * 5000}})
    Traceback (most recent call last):
    ...
    schemas.events.SchemaError: 'context' must encode to at most 2048 bytes, got 5011
    """
    context = record.get("context") or {}
    if not isinstance(context, dict):
        raise SchemaError("'context' must be a JSON object")
    if len(context) > MAX_CONTEXT_KEYS:
        raise SchemaError(f"'context' must have at most {MAX_CONTEXT_KEYS} keys, "
                          f"got {len(context)}")
    size = len(orjson.dumps(context))
    if size > MAX_CONTEXT_BYTES:
        raise SchemaError(f"'context' must encode to at most {MAX_CONTEXT_BYTES} bytes, "
                          f"got {size}")
    return context


def decode_request(raw: bytes) -> RecommendationRequest:
    return parse_request(decode_json(raw))


def decode_reply(raw: bytes) -> RecommendationReply:
    d = orjson.loads(raw)
    d["items"] = [RankedItem(item_id=i["item_id"], score=i["score"],
                             sources=tuple(i.get("sources", ())), author_id=i.get("author_id"),
                             why=i.get("why"), source_scores=i.get("source_scores"))
                  for i in d.get("items", [])]
    return RecommendationReply(**d)

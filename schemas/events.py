"""Engagement events: the record every producer writes to the ``events`` topic.

An event is one thing a user did to one item on one surface.  Producers send
JSON (one object, or a JSON array of objects to amortise Kafka's per-message
cost); :func:`parse_events` turns the raw bytes into validated
:class:`EngagementEvent` values or raises :class:`SchemaError` saying exactly
what is wrong.

>>> ev = parse_event({"event_id": "e1", "user_id": 7, "item_id": "i9",
...                   "event_type": "like", "surface": "explore", "ts": 1.7e9})
>>> ev.user_id, ev.event_type, ev.schema_version
('7', 'like', 1)
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Optional

import orjson

SCHEMA_VERSION = 1

EVENT_TYPES = (
    "impression", "click", "like", "save", "share", "comment",
    "follow", "see_less", "report", "dwell",
)
#: Engagements that say "more like this"; seeds for history-based retrieval.  In the
#: order of EVENT_TYPES, for code that lays them out as columns.
POSITIVE_HEADS = ("click", "like", "save", "share", "comment", "follow")
POSITIVE_TYPES = frozenset(POSITIVE_HEADS)
#: Engagements that say "less like this"; never served again to that user.
NEGATIVE_TYPES = frozenset({"see_less", "report"})

_SURFACE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_MAX_ID_LEN = 128
# Earliest accepted timestamp: replays of old datasets are shifted to "now" by
# the replay tool, so anything before 2001 is a unit mistake (ms vs s).
_MIN_TS = 978307200.0
#: How far ahead of the worker's clock an event may be stamped (producer clock skew).
#: Further ahead is a broken clock: such an event would lift its partition's label
#: watermark and close every open impression there as a negative, and would never
#: decay in trending, so it is refused (it goes to the dead-letter topic).
MAX_FUTURE_SKEW_S = 300.0
# Latest plausible epoch-seconds value (year 2100): anything above is milliseconds.
_MAX_TS = 4102444800.0


class SchemaError(ValueError):
    """A record that does not follow its schema; the message says why."""


@dataclass(frozen=True, slots=True)
class EngagementEvent:
    event_id: str
    user_id: str
    item_id: str
    event_type: str
    surface: str
    ts: float
    author_id: Optional[str] = None
    request_id: Optional[str] = None
    position: Optional[int] = None
    dwell_ms: Optional[int] = None
    region: Optional[str] = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


def as_id(record: dict, field: str, *, required: bool = True) -> Optional[str]:
    """Read an identifier: a non-empty string or a non-negative integer, as str."""
    value = record.get(field)
    if value is None:
        if required:
            raise SchemaError(f"missing required field {field!r}")
        return None
    if isinstance(value, bool):
        raise SchemaError(f"{field!r} must be a string or integer id, got bool")
    if isinstance(value, int):
        if value < 0:
            raise SchemaError(f"{field!r} must be non-negative, got {value}")
        return str(value)
    if isinstance(value, str):
        if not value or len(value) > _MAX_ID_LEN:
            raise SchemaError(f"{field!r} must be 1..{_MAX_ID_LEN} characters, got {len(value)}")
        return value
    raise SchemaError(f"{field!r} must be a string or integer id, got {type(value).__name__}")


def as_surface(record: dict) -> str:
    surface = record.get("surface")
    if not isinstance(surface, str) or not _SURFACE_RE.match(surface):
        raise SchemaError(
            f"'surface' must match {_SURFACE_RE.pattern} (e.g. 'explore'), got {surface!r}")
    return surface


def as_number(record: dict, field: str) -> float:
    value = record.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SchemaError(f"{field!r} must be a finite number, got {value!r}")
    return float(value)


def _optional_int(record: dict, field: str, minimum: int) -> Optional[int]:
    value = record.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SchemaError(f"{field!r} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_event(record: Any, *, now: Optional[float] = None) -> EngagementEvent:
    """Validate one decoded JSON value as an :class:`EngagementEvent`."""
    if not isinstance(record, dict):
        raise SchemaError(f"an event must be a JSON object, got {type(record).__name__}")
    version = record.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        raise SchemaError(f"unsupported schema_version {version!r}; this worker reads {SCHEMA_VERSION}")
    event_type = record.get("event_type")
    if event_type not in EVENT_TYPES:
        raise SchemaError(f"'event_type' must be one of {', '.join(EVENT_TYPES)}; got {event_type!r}")
    ts = as_number(record, "ts")
    if ts < _MIN_TS:
        raise SchemaError(f"'ts' must be epoch seconds after 2001-01-01, got {ts}")
    if ts > _MAX_TS:
        raise SchemaError(f"'ts' must be epoch seconds, got {ts} (milliseconds?)")
    if now is not None and ts > now + MAX_FUTURE_SKEW_S:
        raise SchemaError(f"'ts' is {ts - now:.0f} s in the future; at most "
                          f"{MAX_FUTURE_SKEW_S:.0f} s of clock skew is accepted")
    dwell_ms = _optional_int(record, "dwell_ms", 0)
    if event_type == "dwell" and dwell_ms is None:
        raise SchemaError("a 'dwell' event needs 'dwell_ms' (integer milliseconds >= 0)")
    region = record.get("region")
    if region is not None and (not isinstance(region, str) or not 0 < len(region) <= 16):
        raise SchemaError(f"'region' must be a short string, got {region!r}")
    return EngagementEvent(
        event_id=as_id(record, "event_id"),
        user_id=as_id(record, "user_id"),
        item_id=as_id(record, "item_id"),
        event_type=event_type,
        surface=as_surface(record),
        ts=ts,
        author_id=as_id(record, "author_id", required=False),
        request_id=as_id(record, "request_id", required=False),
        position=_optional_int(record, "position", 0),
        dwell_ms=dwell_ms,
        region=region,
    )


def decode_json(raw: bytes) -> Any:
    """Decode JSON bytes, turning decoder errors into :class:`SchemaError`."""
    if raw is None:
        raise SchemaError("empty message (null value)")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"not valid JSON: {exc}") from None


def parse_events(raw: bytes, *, now: Optional[float] = None) -> list[tuple[int, Any]]:
    """Parse one Kafka message holding an event or a JSON array of events.

    Returns ``(index, EngagementEvent | SchemaError)`` pairs so that one bad
    element of a batch does not cost the valid ones.  Raises
    :class:`SchemaError` when the message as a whole is unreadable.

    >>> [type(x).__name__ for _, x in parse_events(b'[{"event_type": "nope"}]')]
    ['SchemaError']
    """
    data = decode_json(raw)
    records = data if isinstance(data, list) else [data]
    if not records:
        raise SchemaError("empty JSON array")
    out: list[tuple[int, Any]] = []
    for i, record in enumerate(records):
        try:
            out.append((i, parse_event(record, now=now)))
        except SchemaError as exc:
            out.append((i, exc))
    return out

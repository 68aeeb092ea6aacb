"""Dead letters: what the worker could not use, kept with the reason.

Nothing is silently dropped: an undecodable or invalid message is written to
``events.dlq`` with where it came from (topic, partition, offset, and the index
of the element in an array message) and why it was refused.  A record is
bounded: it keeps at most :data:`EXCERPT_BYTES` of what it refers to (the
element, when one element of an array was refused; else the message), base64
since it may not be UTF-8.  When that is all of it, ``complete`` is true and
the record alone is enough to re-drive it; otherwise the source offset is, as
long as the source topic retains it.  ``id`` names the refused thing, so a
record written twice (a batch redelivered after a crash) is recognisably the
same one.

>>> dl = dead_letter(b"{oops", "not valid JSON", "events", 0, 42)
>>> original_bytes(orjson.loads(orjson.dumps(dl))), dl["id"]
(b'{oops', 'events/0/42')
>>> big = dead_letter(b"x" * 10**6, "too big", "events", 0, 43)
>>> len(orjson.dumps(big)) < 8192, big["complete"], original_bytes(big)
(True, False, None)
"""
from __future__ import annotations

import base64
import time
from typing import Optional

import orjson

#: Bytes of the refused message or element a record keeps.
EXCERPT_BYTES = 4096
#: Characters of a reason or key a record keeps (a reason may quote the input).
TEXT_CHARS = 500


def record_id(topic: str, partition: int, offset: int, index: Optional[int] = None) -> str:
    return f"{topic}/{partition}/{offset}" + (f"#{index}" if index is not None else "")


def dead_letter(raw: Optional[bytes], reason: str, topic: str, partition: int, offset: int,
                *, index: Optional[int] = None, key: Optional[bytes] = None,
                element: Optional[bytes] = None) -> dict:
    """The dead-letter record for a refused message, or for element ``index`` of it
    (``element``: that element's JSON, when it could be cut out of the message)."""
    subject = element if element is not None else (raw or b"")
    return {
        "id": record_id(topic, partition, offset, index),
        "reason": reason[:TEXT_CHARS],
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "index": index,
        "key": key.decode("utf-8", "replace")[:TEXT_CHARS] if key else None,
        "message_bytes": len(raw or b""),
        "excerpt_of": "element" if element is not None else "message",
        "excerpt_b64": base64.b64encode(subject[:EXCERPT_BYTES]).decode("ascii"),
        "complete": len(subject) <= EXCERPT_BYTES,
        "refused_at": time.time(),
    }


def original_bytes(record: dict) -> Optional[bytes]:
    """What the record refers to, if it holds all of it (records written before
    excerpts, with ``original_b64``, always do); None when only the offset can tell."""
    if "original_b64" in record:
        return base64.b64decode(record["original_b64"])
    return base64.b64decode(record["excerpt_b64"]) if record.get("complete") else None


def element_of(raw: bytes, index: int, _cache: dict = {}) -> Optional[bytes]:
    """Element ``index`` of the JSON array in ``raw`` as JSON, or None.

    The last message parsed is kept: an array with thousands of bad elements is
    parsed once, not once per element.

    >>> element_of(b'[{"a": 1}, 2]', 0), element_of(b'{"a": 1}', 0)
    (b'{"a":1}', None)
    """
    if _cache.get("raw") is not raw:
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        _cache.clear()
        _cache.update(raw=raw, parsed=parsed)
    parsed = _cache["parsed"]
    if not isinstance(parsed, list) or not 0 <= index < len(parsed):
        return None
    return orjson.dumps(parsed[index])


def latest_records(records) -> list[dict]:
    """One record per refused thing (the last written), in the order first written.

    >>> [r["reason"] for r in latest_records([{"id": "a", "reason": "x"}, {"id": "b", "reason": "y"},
    ...                                       {"id": "a", "reason": "z"}])]
    ['z', 'y']
    """
    by_id: dict[str, dict] = {}
    for record in records:
        rid = record.get("id") or record_id(record["source_topic"], record["source_partition"],
                                            record["source_offset"], record.get("index"))
        by_id[rid] = record
    return list(by_id.values())

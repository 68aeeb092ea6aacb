"""Dead letters: what the worker could not use, kept with the reason.

Nothing is silently dropped: an undecodable or invalid message is written to
``events.dlq`` with its original bytes (base64, since they may not be UTF-8),
where it came from and why it was refused.

>>> dl = dead_letter(b"{oops", "not valid JSON", "events", 0, 42)
>>> original_bytes(orjson.loads(orjson.dumps(dl)))
b'{oops'
"""
from __future__ import annotations

import base64
import time
from typing import Optional

import orjson  # noqa: F401  (used by the doctest)


def dead_letter(raw: Optional[bytes], reason: str, topic: str, partition: int, offset: int,
                *, index: Optional[int] = None, key: Optional[bytes] = None) -> dict:
    """The dead-letter record for a refused message (or one element of a batch)."""
    return {
        "reason": reason,
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "index": index,
        "key": key.decode("utf-8", "replace") if key else None,
        "original_b64": base64.b64encode(raw or b"").decode("ascii"),
        "refused_at": time.time(),
    }


def original_bytes(record: dict) -> bytes:
    return base64.b64decode(record["original_b64"])

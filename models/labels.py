"""The label join: impressions meet the engagements that followed them.

Per user (the join runs on the user's partition), impressions wait in
:class:`PendingLabels` for engagements on the same item (and the same request,
when the engagement names one) inside an attribution window.  When the window
closes the impression becomes a labelled example, every head 0 or 1; an
impression nobody engaged with becomes a negative.

The window closes on event time (the partition's watermark, so replays at any
speed label alike) or, for a quiet stream, once the impression has waited
``wall_window_s`` of wall-clock time.

>>> p = PendingLabels()
>>> p.impression("i1", "r1", ts=100.0, arrived=0.0, features={"surface": "explore"})
>>> p.engagement("i1", "r1", "like", ts=130.0)
True
>>> [(e["item_id"], e["labels"]["like"], e["labels"]["click"]) for e in p.due(watermark=2000.0, now=1.0)]
[('i1', 1, 0)]
"""
from __future__ import annotations

from typing import Optional

HEADS = ("click", "like", "save", "share", "comment", "follow", "see_less", "long_dwell")
LONG_DWELL_MS = 10_000
ATTRIBUTION_WINDOW_S = 1800.0
WALL_WINDOW_S = 120.0
#: Engagements may carry a timestamp slightly before their impression's (clock skew).
SKEW_S = 5.0
#: Open impressions kept per user; past this the oldest closes early (bounded state).
MAX_PENDING = 200


def heads_for(event_type: str, dwell_ms: Optional[int] = None) -> tuple[str, ...]:
    """Which heads an engagement sets.

    >>> heads_for("dwell", 12_000), heads_for("report"), heads_for("like")
    (('long_dwell',), ('see_less',), ('like',))
    """
    if event_type == "dwell":
        return ("long_dwell",) if (dwell_ms or 0) >= LONG_DWELL_MS else ()
    if event_type == "report":
        return ("see_less",)  # a report is the strongest "less of this"
    return (event_type,) if event_type in HEADS else ()


class PendingLabels:
    """One user's open impressions, stored as a plain dict in a Faust table."""

    def __init__(self, pending: Optional[dict] = None, window_s: float = ATTRIBUTION_WINDOW_S):
        self.pending: dict[str, dict] = dict(pending or {})
        self.window_s = window_s
        # item -> keys of its open impressions, so an engagement finds them at once.
        self._by_item: dict[str, list[str]] = {}
        for key, rec in self.pending.items():
            self._by_item.setdefault(rec["item_id"], []).append(key)

    def impression(self, item: str, request_id: Optional[str], *, ts: float, arrived: float,
                   features: dict) -> None:
        key = f"{request_id or '-'}|{item}"
        if key in self.pending:
            return  # a repeated impression of the same item in the same request
        self.pending[key] = {"item_id": item, "request_id": request_id, "ts": ts,
                             "arrived": arrived, "labels": {}, **features}
        self._by_item.setdefault(item, []).append(key)
        if len(self.pending) > MAX_PENDING:
            # Bounded state: the oldest impression is closed early by the caller's next due().
            oldest = min(self.pending, key=lambda k: self.pending[k]["ts"])
            self.pending[oldest]["force"] = True

    def engagement(self, item: str, request_id: Optional[str], event_type: str, *, ts: float,
                   dwell_ms: Optional[int] = None) -> bool:
        """Attach an engagement to its impression; False if there is none to attach to."""
        heads = heads_for(event_type, dwell_ms)
        if not heads:
            return False
        best = None
        for key in self._by_item.get(item, ()):
            rec = self.pending.get(key)
            if rec is None or (request_id and rec["request_id"] != request_id):
                continue
            if rec["ts"] - SKEW_S <= ts <= rec["ts"] + self.window_s:
                if best is None or rec["ts"] > self.pending[best]["ts"]:
                    best = key
        if best is None:
            return False
        for head in heads:
            self.pending[best]["labels"][head] = 1
        return True

    def due(self, *, watermark: float, now: float, window_s: float = ATTRIBUTION_WINDOW_S,
            wall_window_s: float = WALL_WINDOW_S) -> list[dict]:
        """Remove and return examples whose window has closed."""
        out = []
        for key in list(self.pending):
            rec = self.pending[key]
            if (rec.get("force") or watermark >= rec["ts"] + window_s
                    or now >= rec["arrived"] + wall_window_s):
                rec = self.pending.pop(key)
                self._by_item[rec["item_id"]].remove(key)
                rec.pop("force", None)
                rec.pop("arrived", None)
                rec["labels"] = {h: int(rec["labels"].get(h, 0)) for h in HEADS}
                out.append(rec)
        return out

    def to_dict(self) -> dict:
        return self.pending

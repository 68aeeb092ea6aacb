"""The label join: impressions meet the engagements that followed them.

Per user (the join runs on the user's partition), impressions wait in
:class:`PendingLabels` for engagements on the same item (and the same request,
when the engagement names one) inside an attribution window of ``window_s``
seconds of event time.  When the window closes the impression becomes a
labelled example, every head 0 or 1; an impression nobody engaged with becomes
a negative.

Windows close on event time only: an impression closes once its partition's
:class:`EventClock` passes ``ts + window_s``, however long that takes in wall
time, so a save that comes minutes after its impression still counts and
replays at any speed label alike.  A partition with no events cannot move its
event time; once it has been quiet for ``idle_s`` of wall time its clock runs on
with the wall clock, so windows there close too (``window_s`` + ``idle_s`` after
the partition's last event, when events carry the current time).

Engagements that do not meet an open impression:

- one that arrives before its impression (another producer, another batch)
  waits for it as an *orphan* and is attached when the impression arrives, under
  the same rules; orphans wait one attribution window of event time, at most
  :data:`MAX_ORPHANS` per user, then count as unmatched;
- one for an impression that has closed is *late* (it arrived after the close,
  or came after the window): the example has gone to training and keeps its
  labels, so the engagement only counts (``late_engagements`` in
  :mod:`streams.metrics`).  Closed impressions are remembered until one more
  window has passed (at most :data:`MAX_CLOSED` per user) to tell; after that,
  such an engagement waits as an orphan like any other.

>>> clock, p = EventClock(idle_s=120.0), PendingLabels(window_s=1800.0)
>>> p.engagement("i2", "r1", "save", ts=101.0)  # before its impression: waits
'waiting'
>>> p.impression("i1", "r1", ts=100.0, features={"surface": "explore"})
0
>>> p.impression("i2", "r1", ts=100.0, features={"surface": "explore"})
1
>>> p.engagement("i1", "r1", "like", ts=400.0)  # five minutes later: still in the window
'joined'
>>> clock.advance(1000.0, now=1000.0)
>>> p.due(watermark=clock.at(now=1000.0))  # event time 1000 < 100 + 1800: still open
[]
>>> clock.advance(1950.0, now=1950.0)
>>> closed = p.due(watermark=clock.at(now=1950.0))
>>> [(e["item_id"], e["labels"]["like"], e["labels"]["save"]) for e in closed]
[('i1', 1, 0), ('i2', 0, 1)]
>>> p.engagement("i1", "r1", "comment", ts=1700.0)  # its impression has closed
'late'
"""
from __future__ import annotations

from typing import Optional

from schemas.events import MAX_FUTURE_SKEW_S

HEADS = ("click", "like", "save", "share", "comment", "follow", "see_less", "long_dwell")
LONG_DWELL_MS = 10_000
ATTRIBUTION_WINDOW_S = 1800.0
#: Wall time a partition must be quiet before its label clock follows the wall clock.
WALL_WINDOW_S = 120.0
#: Engagements may carry a timestamp slightly before their impression's (clock skew).
SKEW_S = 5.0
#: Open impressions kept per user; past this the oldest closes early (bounded state).
MAX_PENDING = 200
#: Engagements waiting for their impression, per user; past this the oldest is dropped.
MAX_ORPHANS = 50
#: Closed impressions remembered per user, to count late engagements.
MAX_CLOSED = 100


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


def attributable(impression: tuple, engagement: tuple, window_s: float) -> bool:
    """Whether an engagement ``(item, request_id, ts)`` belongs to an impression
    ``(item, request_id, ts)``: same item, same request when the engagement names
    one, and at most ``window_s`` after the impression (or :data:`SKEW_S` before).

    >>> attributable(("i1", "r1", 100.0), ("i1", None, 160.0), 60.0)
    True
    >>> attributable(("i1", "r1", 100.0), ("i1", "r2", 110.0), 60.0)
    False
    """
    item, request_id, ts = impression
    e_item, e_request_id, e_ts = engagement
    return (e_item == item and (not e_request_id or e_request_id == request_id)
            and ts - SKEW_S <= e_ts <= ts + window_s)


class EventClock:
    """One partition's event time, as far as the label join may trust it.

    The watermark is the newest event time seen, but never more than
    ``max_skew_s`` ahead of the wall clock when it was seen (so one event from a
    broken clock cannot close every open window; ingest refuses such events
    too).  It never falls.  While events keep coming, :meth:`at` is the
    watermark: windows close on event time only.  Once no event has moved the
    watermark for ``idle_s`` of wall time, :meth:`at` runs on with the wall
    clock from there (``watermark + now - advanced_at - idle_s``), assuming the
    quiet partition's time passes as the wall clock's; the next event brings it
    back to event time.

    >>> c = EventClock(idle_s=120.0)
    >>> c.advance(1000.0, now=1000.0)
    >>> c.at(now=1100.0), c.at(now=1300.0)  # busy, then quiet for 300 s
    (1000.0, 1180.0)
    >>> c.advance(86_400.0 + 1300.0, now=1300.0)  # a day ahead: held to now + skew
    >>> c.at(now=1300.0)
    1600.0
    """

    def __init__(self, idle_s: float = WALL_WINDOW_S, max_skew_s: float = MAX_FUTURE_SKEW_S):
        self.idle_s = idle_s
        self.max_skew_s = max_skew_s
        self.watermark: Optional[float] = None
        self.advanced_at = 0.0

    def advance(self, ts: float, now: float) -> None:
        ts = min(ts, now + self.max_skew_s)
        if self.watermark is None or ts > self.watermark:
            self.watermark, self.advanced_at = ts, now

    def at(self, now: float) -> float:
        """The event time windows close by, at wall time ``now``."""
        if self.watermark is None:
            return float("-inf")
        return self.watermark + max(0.0, now - self.advanced_at - self.idle_s)


class PendingLabels:
    """One user's label state, stored as a plain dict in a Faust table: open
    impressions, engagements waiting for their impression (orphans) and
    recently closed impressions.  ``unmatched`` counts the orphans this object
    gave up on (expired or pushed out)."""

    def __init__(self, state: Optional[dict] = None, window_s: float = ATTRIBUTION_WINDOW_S):
        state = dict(state or {})
        if state and "open" not in state:
            state = {"open": state}  # stored before orphans and closed impressions were kept
        self.pending: dict[str, dict] = dict(state.get("open", {}))
        #: {"item_id", "request_id", "ts", "heads"} of engagements with no impression yet.
        self.orphans: list[dict] = list(state.get("orphans", ()))
        #: [item, request_id, ts] of closed impressions, oldest first.
        self.closed: list[list] = list(state.get("closed", ()))
        self.window_s = window_s
        self.unmatched = 0
        # item -> keys of its open impressions, so an engagement finds them at once.
        self._by_item: dict[str, list[str]] = {}
        for key, rec in self.pending.items():
            self._by_item.setdefault(rec["item_id"], []).append(key)

    @property
    def empty(self) -> bool:
        return not (self.pending or self.orphans or self.closed)

    def impression(self, item: str, request_id: Optional[str], *, ts: float,
                   features: dict) -> int:
        """Open an impression's window; returns how many waiting engagements it took."""
        key = f"{request_id or '-'}|{item}"
        if key in self.pending:
            return 0  # a repeated impression of the same item in the same request
        rec = {"item_id": item, "request_id": request_id, "ts": ts, "labels": {}, **features}
        self.pending[key] = rec
        self._by_item.setdefault(item, []).append(key)
        taken = [o for o in self.orphans if attributable(
            (item, request_id, ts), (o["item_id"], o["request_id"], o["ts"]), self.window_s)]
        for orphan in taken:
            self.orphans.remove(orphan)
            for head in orphan["heads"]:
                rec["labels"][head] = 1
        if len(self.pending) > MAX_PENDING:
            # Bounded state: the oldest impression is closed early by the caller's next due().
            oldest = min(self.pending, key=lambda k: self.pending[k]["ts"])
            self.pending[oldest]["force"] = True
        return len(taken)

    def engagement(self, item: str, request_id: Optional[str], event_type: str, *, ts: float,
                   dwell_ms: Optional[int] = None) -> str:
        """Attach an engagement to its open impression: ``"joined"``.

        Otherwise ``"late"`` when its impression has closed (no label changes),
        ``"waiting"`` when it is kept as an orphan for an impression yet to come,
        ``"ignored"`` when it sets no head (a short dwell).
        """
        heads = heads_for(event_type, dwell_ms)
        if not heads:
            return "ignored"
        seen = (item, request_id, ts)
        best = None
        for key in self._by_item.get(item, ()):
            rec = self.pending[key]
            if attributable((item, rec["request_id"], rec["ts"]), seen, self.window_s):
                if best is None or rec["ts"] > self.pending[best]["ts"]:
                    best = key
        if best is not None:
            for head in heads:
                self.pending[best]["labels"][head] = 1
            return "joined"
        if any(attributable(tuple(closed), seen, float("inf")) for closed in self.closed):
            return "late"
        self.orphans.append({"item_id": item, "request_id": request_id, "ts": ts,
                             "heads": list(heads)})
        if len(self.orphans) > MAX_ORPHANS:
            self.orphans.pop(0)
            self.unmatched += 1
        return "waiting"

    def due(self, *, watermark: float) -> list[dict]:
        """Remove and return examples whose window has closed by ``watermark`` (event
        time); forget orphans and closed impressions whose own window has passed."""
        out = []
        for key in list(self.pending):
            rec = self.pending[key]
            if rec.get("force") or watermark >= rec["ts"] + self.window_s:
                rec = self.pending.pop(key)
                self._by_item[rec["item_id"]].remove(key)
                rec.pop("force", None)
                rec.pop("arrived", None)  # kept by earlier versions
                rec["labels"] = {h: int(rec["labels"].get(h, 0)) for h in HEADS}
                self.closed.append([rec["item_id"], rec["request_id"], rec["ts"]])
                out.append(rec)
        # Late engagements are told apart for one window after the close.
        self.closed = [c for c in self.closed if watermark < c[2] + 2 * self.window_s]
        del self.closed[:-MAX_CLOSED]
        waiting = [o for o in self.orphans if watermark < o["ts"] + self.window_s]
        self.unmatched += len(self.orphans) - len(waiting)
        self.orphans = waiting
        return out

    def latest_ts(self) -> Optional[float]:
        """The newest event time this state holds (a lower bound of its partition's watermark)."""
        times = ([r["ts"] for r in self.pending.values()] + [o["ts"] for o in self.orphans]
                 + [c[2] for c in self.closed])
        return max(times) if times else None

    def to_dict(self) -> dict:
        return {"open": self.pending, "orphans": self.orphans, "closed": self.closed}

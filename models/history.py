"""A user's recent interaction history, kept per user on the user's partition.

Pure data + rules, stored as a plain dict in a Faust table.  The serving
funnel reads it to find seeds (recent positives) and to exclude what the user
has already seen or rejected.

>>> h = UserHistory()
>>> h.apply("i1", "like", 100.0, "a1")
>>> h.apply("i2", "report", 101.0, "a2")
>>> h.positive_seeds(now=102.0), sorted(h.excluded())
(['i1'], ['i1', 'i2'])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from schemas.events import NEGATIVE_TYPES, POSITIVE_TYPES

MAX_POSITIVES = 50
MAX_SEEN = 500
MAX_NEGATIVES = 200
#: Event ids remembered per user to drop redelivered or replayed duplicates.
MAX_EVENT_IDS = 2000
#: Authors whose engagement counts are kept per user (least recently shown dropped first).
MAX_AUTHORS = 300
#: Columns of an author's counts: impressions, clicks, deeper positives, negatives.
AUTHOR_STATS = ("imp", "click", "pos", "neg")
#: A user's per-author counts halve every this many seconds of the user's event time
#: (taste moves; ``author_half_life_s`` of :meth:`UserHistory.apply` overrides it).
AUTHOR_HALF_LIFE_S = 7 * 86400.0
#: Seeds older than this no longer speak for the user's current taste.
SEED_WINDOW_S = 7 * 86400.0


@dataclass
class UserHistory:
    #: [item, ts, author] of recent positive engagements, oldest first.
    positives: list = field(default_factory=list)
    #: Items the user has been shown or engaged with, oldest first.
    seen: list = field(default_factory=list)
    #: Items the user said see_less or report on.
    negatives: list = field(default_factory=list)
    follows: dict = field(default_factory=dict)
    events: int = 0
    #: Recent event ids, oldest first (see :meth:`is_duplicate`).
    event_ids: list = field(default_factory=list)
    #: Author -> [impressions, clicks, deeper positives, negatives] of this user on that
    #: author's items, most recently updated last: the user's own rate per author is
    #: the ranker's sharpest signal of taste, and it includes what the user ignored.
    authors: dict = field(default_factory=dict)
    #: Event time the author counts were last decayed to.
    authors_at: float = 0.0

    def is_duplicate(self, event_id: str) -> bool:
        """True if ``event_id`` was applied already; otherwise remember it.

        Kafka delivers at least once and replays repeat themselves; counting an
        event twice would skew every counter built on it.
        """
        if event_id in self.event_ids:
            return True
        self.event_ids.append(event_id)
        del self.event_ids[:-MAX_EVENT_IDS]
        return False

    def apply(self, item: str, event_type: str, ts: float, author: Optional[str] = None,
              author_half_life_s: float = AUTHOR_HALF_LIFE_S) -> None:
        self.events += 1
        _append_bounded(self.seen, item, MAX_SEEN)
        if event_type in POSITIVE_TYPES:
            self.positives = [p for p in self.positives if p[0] != item]
            self.positives.append([item, ts, author])
            del self.positives[:-MAX_POSITIVES]
        elif event_type in NEGATIVE_TYPES:
            _append_bounded(self.negatives, item, MAX_NEGATIVES)
            self.positives = [p for p in self.positives if p[0] != item]
        if event_type == "follow" and author is not None:
            self.follows[author] = ts
        if author is not None:
            self._decay_authors(ts, author_half_life_s)
            self._count_author(author, event_type)

    def _decay_authors(self, ts: float, half_life_s: float) -> None:
        """Scale every author's counts down for the event time passed since the last
        decay, in steps of at least a sixteenth of a half-life (cheap: one pass over the
        user's authors per step, not per event).

        >>> h = UserHistory()
        >>> h.apply("i1", "click", 100.0, "a", author_half_life_s=60.0)
        >>> h.apply("i2", "impression", 160.0, "b", author_half_life_s=60.0)
        >>> h.author_stats("a"), h.author_stats("b")
        ([0.0, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0])
        """
        elapsed = ts - self.authors_at
        if not self.authors or self.authors_at <= 0:  # nothing to decay, or no time yet
            self.authors_at = max(self.authors_at, ts)
            return
        if half_life_s <= 0 or elapsed < half_life_s / 16.0:
            return
        factor = 0.5 ** (elapsed / half_life_s)
        for counts in self.authors.values():
            counts[:] = [round(c * factor, 4) for c in counts]
        self.authors_at = ts

    def _count_author(self, author: str, event_type: str) -> None:
        column = ("imp" if event_type == "impression" else "click" if event_type == "click"
                  else "pos" if event_type in POSITIVE_TYPES
                  else "neg" if event_type in NEGATIVE_TYPES else None)
        if column is None:
            return
        counts = self.authors.pop(author, None) or [0.0, 0.0, 0.0, 0.0]
        counts[AUTHOR_STATS.index(column)] += 1
        self.authors[author] = counts  # re-inserted: most recently updated last
        while len(self.authors) > MAX_AUTHORS:
            self.authors.pop(next(iter(self.authors)))

    def author_stats(self, author: Optional[str]) -> list[float]:
        """[impressions, clicks, deeper positives, negatives] of this user on ``author``,
        decayed (see :meth:`_decay_authors`).

        >>> h = UserHistory()
        >>> for kind in ("impression", "click", "like", "impression"):
        ...     h.apply("i1" if kind != "impression" or not h.events else "i2", kind, 1.0, "a")
        >>> h.author_stats("a"), h.author_stats("b"), h.totals()
        ([2.0, 1.0, 1.0, 0.0], [0, 0, 0, 0], [2.0, 1.0, 1.0, 0.0])
        """
        return list(self.authors.get(author, (0, 0, 0, 0))) if author is not None else [0, 0, 0, 0]

    def totals(self) -> list[float]:
        """This user's counts summed over the authors kept."""
        return [sum(c[j] for c in self.authors.values()) for j in range(len(AUTHOR_STATS))]

    def positive_seeds(self, now: float, limit: int = 10) -> list[str]:
        """Most recent positive items inside the seed window, newest first."""
        fresh = [p[0] for p in reversed(self.positives) if now - p[1] <= SEED_WINDOW_S]
        return fresh[:limit]

    def recent_positive_items(self, limit: int) -> list[str]:
        return [p[0] for p in self.positives[-limit:]]

    def author_counts(self) -> dict[str, int]:
        """How many of the user's recent positives each author made (author affinity)."""
        counts: dict[str, int] = {}
        for _, _, author in self.positives:
            if author is not None:
                counts[author] = counts.get(author, 0) + 1
        return counts

    def excluded(self) -> set[str]:
        return set(self.seen) | set(self.negatives)

    def to_dict(self) -> dict:
        return {"pos": self.positives, "seen": self.seen, "neg": self.negatives,
                "follows": self.follows, "n": self.events, "ids": self.event_ids,
                "authors": self.authors, "authors_at": self.authors_at}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "UserHistory":
        if not d:
            return cls()
        return cls(positives=list(d.get("pos", [])), seen=list(d.get("seen", [])),
                   negatives=list(d.get("neg", [])), follows=dict(d.get("follows", {})),
                   events=int(d.get("n", 0)), event_ids=list(d.get("ids", [])),
                   authors=dict(d.get("authors", {})),
                   authors_at=float(d.get("authors_at", 0.0)))


def _append_bounded(items: list, item: str, bound: int) -> None:
    if item in items:
        items.remove(item)
    items.append(item)
    del items[:-bound]

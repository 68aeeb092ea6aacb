"""Replay MovieLens-100k as a time-ordered stream of engagement events.

The dataset is read from ``../shared/datasets/movielens-100k`` (never copied
into the project).  A rating becomes the engagements it stands for
(:func:`models.movielens.rating_engagements`: 4-5 stars a ``click`` then a
``like``, 3 stars a ``click``, 1-2 stars a ``see_less``), optionally after an
``impression``.  MovieLens has no authors, so a movie's first genre stands in
for its author (``genre:Drama``).  Rows are ordered by ``(timestamp, user,
item)`` because the file is unordered and timestamps tie.

Event time is the original time compressed by ``time_scale`` and shifted so
the replay happens "now": with ``time_scale=5000`` the dataset's seven months
become about an hour of event time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from models.movielens import IgnoredImpressions, rated_by_user, rating_engagements
from schemas.events import EngagementEvent

DEFAULT_DATASET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "movielens-100k"
SURFACE = "explore"


@dataclass(frozen=True)
class Rating:
    user: int
    item: int
    rating: int
    ts: int


def find_dataset(path: Optional[str] = None) -> Path:
    p = Path(path) if path else DEFAULT_DATASET
    if not (p / "u.data").is_file():
        raise FileNotFoundError(
            f"MovieLens-100k not found at {p} (expected u.data); pass --dataset PATH "
            f"pointing at shared/datasets/movielens-100k")
    return p


def load_ratings(path: Path) -> list[Rating]:
    rows = []
    with open(path / "u.data", encoding="ascii") as f:
        for line in f:
            u, i, r, t = line.split("\t")
            rows.append(Rating(int(u), int(i), int(r), int(t)))
    rows.sort(key=lambda r: (r.ts, r.user, r.item))
    return rows


def load_authors(path: Path) -> dict[int, str]:
    """Movie id -> stand-in author (its first genre)."""
    genres = []
    with open(path / "u.genre", encoding="latin-1") as f:
        for line in f:
            if line.strip():
                name, idx = line.strip().rsplit("|", 1)
                genres.append((int(idx), name))
    names = [n for _, n in sorted(genres)]
    authors = {}
    with open(path / "u.item", encoding="latin-1") as f:
        for line in f:
            parts = line.rstrip("\n").split("|")
            flags = parts[5:24]
            first = next((names[j] for j, flag in enumerate(flags) if flag == "1"), "unknown")
            authors[int(parts[0])] = f"genre:{first}"
    return authors


def to_events(ratings: list[Rating], authors: dict[int, str], *, end_at: float,
              time_scale: float, impressions: bool = False, ignored: int = 0,
              seed: int = 0) -> Iterator[EngagementEvent]:
    """Events whose times keep the dataset's gaps divided by ``time_scale``, ending at ``end_at``.

    A rating's events share its time.  With ``impressions``, each rating is
    preceded by an ``impression`` of the same item, so the label join has
    impressions to attach engagements to.  MovieLens logged only rated items,
    so every such impression is engaged; ``ignored`` adds that many impressions
    of movies the user never rated, drawn by likes so far
    (:class:`models.movielens.IgnoredImpressions`, seeded by ``seed``): the
    label join turns them into the negatives a real feed's log is full of.

    >>> [(e.event_id, e.event_type) for e in to_events([Rating(1, 2, 5, 0)], {}, end_at=9.0,
    ...                                                time_scale=1.0)]
    [('ml100k-1-2', 'click'), ('ml100k-1-2-like', 'like')]
    >>> three = [Rating(1, 2, 5, 0), Rating(2, 3, 4, 1), Rating(2, 2, 4, 2)]
    >>> [(e.user_id, e.item_id, e.event_type) for e in to_events(
    ...     three, {}, end_at=9.0, time_scale=1.0, impressions=True, ignored=1)
    ...  if e.event_type == "impression"]        # user 2 rates 2 later: never ignored
    [('1', '2', 'impression'), ('2', '3', 'impression'), ('2', '2', 'impression')]
    >>> four = three + [Rating(3, 4, 2, 3)]       # user 3 never rated 2 or 3
    >>> [e.item_id for e in to_events(four, {}, end_at=9.0, time_scale=1.0, impressions=True,
    ...                               ignored=1) if e.event_id.endswith("-ignored")]
    ['2']
    """
    if not ratings:
        return
    last = ratings[-1].ts
    passed_over = IgnoredImpressions(rated_by_user((r.user, r.item) for r in ratings), seed=seed)
    for r in ratings:
        ts = end_at - (last - r.ts) / time_scale
        if impressions:
            yield EngagementEvent(
                event_id=f"ml100k-{r.user}-{r.item}-imp", user_id=str(r.user),
                item_id=str(r.item), event_type="impression", surface=SURFACE, ts=ts,
                author_id=authors.get(r.item))
            for movie in passed_over.draw(r.user, ignored):
                yield EngagementEvent(
                    event_id=f"ml100k-{r.user}-{movie}-ignored", user_id=str(r.user),
                    item_id=str(movie), event_type="impression", surface=SURFACE, ts=ts,
                    author_id=authors.get(movie))
        if "like" in rating_engagements(r.rating):
            passed_over.liked(r.item)
        for n, event_type in enumerate(rating_engagements(r.rating)):
            # Ids differ within a rating: the dedupe drops a repeated id.
            yield EngagementEvent(
                event_id=f"ml100k-{r.user}-{r.item}" + (f"-{event_type}" if n else ""),
                user_id=str(r.user), item_id=str(r.item), event_type=event_type,
                surface=SURFACE, ts=ts, author_id=authors.get(r.item))


def replay(producer, events: list[EngagementEvent], *, speed: float = 0.0,
           progress: bool = True) -> dict:
    """Send ``events`` in order.  ``speed`` > 0 paces them by event time times ``speed``
    (1 = real time of the compressed stream); 0 sends as fast as possible."""
    from tqdm import tqdm
    start = time.time()
    first_ts = events[0].ts if events else 0.0
    bar = tqdm(total=len(events), unit="ev", disable=not progress, desc="replay")
    for n, ev in enumerate(events):
        if speed > 0:
            due = start + (ev.ts - first_ts) / speed
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
        producer.send(ev)
        if n % 1000 == 999:
            bar.update(1000)
    bar.update(len(events) % 1000)
    producer.flush()
    bar.close()
    elapsed = time.time() - start
    return {"events": len(events), "seconds": round(elapsed, 2),
            "events_per_s": round(len(events) / elapsed, 1) if elapsed else None}

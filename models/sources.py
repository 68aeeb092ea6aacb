"""Retrieval sources: each proposes scored candidates for one request and says why.

A source is a pure function ``(ctx, fetch) -> list[Hit]`` over the user's
history and the shared item view; :data:`SOURCES` names them for
configuration.  Items the user must not see are left out here already, so a
source's ``fetch`` budget is spent on items that can be served.

>>> from models.funnel import StaticItemView
>>> view = StaticItemView(trending={"explore": [("t1", 3.0, "a"), ("seen", 9.0, "b")]})
>>> ctx = RetrievalContext("explore", UserHistory(), view, now=0.0, excluded={"seen"})
>>> trending_source(ctx, 10)
[Hit(item_id='t1', score=3.0, author='a', why='trending on explore')]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import numpy as np

from models.history import UserHistory
from models.quality import is_objectionable, poor_seed_reason


class Hit(NamedTuple):
    item_id: str
    score: float
    author: Optional[str]
    why: str = ""


@dataclass
class RetrievalContext:
    surface: str
    history: UserHistory
    view: object  # models.funnel.ItemView
    now: float
    excluded: set = field(default_factory=set)
    region: Optional[str] = None
    seeds: int = 10
    user_id: str = ""


def _padded(fetch: int, ctx: "RetrievalContext") -> int:
    """How many to ask an index for so that ``fetch`` survive the exclusions.

    Capped at twice ``fetch``: a heavy user's long seen-list must not turn every
    lookup into a scan of the catalogue.
    """
    return fetch + min(len(ctx.excluded), fetch)


def _top(scores: dict, authors: dict, why: dict, fetch: int) -> list[Hit]:
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:fetch]
    return [Hit(i, s, authors.get(i), why.get(i, "")) for i, s in ranked]


def trending_source(ctx: RetrievalContext, fetch: int) -> list[Hit]:
    """Most engaged-with recently on this surface (time-decayed, event-weighted);
    in the request's region first when it names one, then the whole surface."""
    hits: list[Hit] = []
    taken = set(ctx.excluded)
    keys = ([(f"{ctx.surface}@{ctx.region}", f"trending on {ctx.surface} in {ctx.region}")]
            if ctx.region else []) + [(ctx.surface, f"trending on {ctx.surface}")]
    for key, why in keys:
        found = ctx.view.trending(key, _padded(fetch, ctx), ctx.now)
        # With a region, both lists are scaled to their best item and the regional
        # one lifted above the surface's; without one, scores stay as they are.
        top = (max((s for _, s, _ in found), default=0.0) or 1.0) if ctx.region else 1.0
        lift = 1.0 if ctx.region and key != ctx.surface else 0.0
        for item, score, author in found:
            if item not in taken and len(hits) < fetch:
                hits.append(Hit(item, score / top + lift, author, why))
                taken.add(item)
    return hits


def good_seeds(ctx: RetrievalContext) -> list[tuple[str, float]]:
    """Recent positive engagements that may seed "more like this", with a recency weight.

    Seeds older than the history's window are gone already; items that many
    users reported or said see_less to are dropped here.
    """
    seeds = []
    for rank, item in enumerate(ctx.history.positive_seeds(ctx.now, ctx.seeds * 2)):
        if poor_seed_reason(ctx.view.quality(item)) is None:
            seeds.append((item, 1.0 / (1.0 + len(seeds))))
        if len(seeds) == ctx.seeds:
            break
    return seeds


def coengagement_source(ctx: RetrievalContext, fetch: int) -> list[Hit]:
    """Items other users engaged with close to the user's recent positives."""
    scores: dict[str, float] = {}
    authors: dict = {}
    best: dict[str, tuple[float, str]] = {}
    for seed, weight in good_seeds(ctx):
        for item, w, author in ctx.view.neighbours(seed):
            if item in ctx.excluded:
                continue
            contribution = weight * w
            scores[item] = scores.get(item, 0.0) + contribution
            authors[item] = author
            if contribution > best.get(item, (0.0, ""))[0]:
                best[item] = (contribution, seed)
    why = {i: f"engaged together with {seed}" for i, (_, seed) in best.items()}
    return _top(scores, authors, why, fetch)


def author_source(ctx: RetrievalContext, fetch: int) -> list[Hit]:
    """Recent items from authors the user follows or recently engaged with."""
    author_weight: dict[str, float] = {}
    reason: dict[str, str] = {}
    for rank, (item, _ts, author) in enumerate(reversed(ctx.history.positives[-20:])):
        if author is not None and author not in author_weight:
            author_weight[author] = 1.0 / (1.0 + rank)
            reason[author] = f"by {author}, whose {item} you engaged with"
    for author in ctx.history.follows:
        author_weight[author] = author_weight.get(author, 0.0) + 1.0
        reason[author] = f"by {author}, whom you follow"
    scores: dict[str, float] = {}
    authors: dict = {}
    why: dict = {}
    for author, weight in author_weight.items():
        items = ctx.view.author_items(author)
        top = max((s for _, s, _ in items), default=0.0)
        for item, s, _ in items:
            if item in ctx.excluded or top <= 0:
                continue
            score = weight * s / top
            if score > scores.get(item, 0.0):
                scores[item], authors[item], why[item] = score, author, reason[author]
    return _top(scores, authors, why, fetch)


def history_source(ctx: RetrievalContext, fetch: int) -> list[Hit]:
    """Interaction history: items similar (ANN) to each good recent seed, merged per seed."""
    seeds = good_seeds(ctx)
    if not seeds:
        return []
    per_seed = max(10, fetch // len(seeds))
    scores: dict[str, float] = {}
    authors: dict = {}
    why: dict = {}
    for seed, weight in seeds:
        for item, sim in ctx.view.similar(seed, _padded(per_seed, ctx)):
            if item in ctx.excluded or item == seed:
                continue
            score = weight * sim
            if score > scores.get(item, float("-inf")):
                scores[item], why[item] = score, f"similar to {seed}, which you engaged with"
                authors[item] = ctx.view.author_of(item)
    return _top(scores, authors, why, fetch)


def user_vector(ctx: RetrievalContext) -> Optional[np.ndarray]:
    """The mean embedding of the user's good recent seeds (a taste profile).

    The same seed rules as the other history sources: nothing older than the
    window, nothing many users reported.
    """
    vectors = [v for v in (ctx.view.embedding(i) for i, _ in good_seeds(ctx)) if v is not None]
    if not vectors:
        return None
    mean = np.mean(vectors, axis=0)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 0 else None


def embedding_source(ctx: RetrievalContext, fetch: int) -> list[Hit]:
    """Nearest items to the user's taste profile in the item embedding space."""
    vector = user_vector(ctx)
    if vector is None:
        return []
    found = ctx.view.nearest(vector, _padded(fetch, ctx))
    return [Hit(i, s, ctx.view.author_of(i), "close to your taste profile")
            for i, s in found if i not in ctx.excluded][:fetch]


def pregen_popular_source(ctx: RetrievalContext, fetch: int) -> list[Hit]:
    """Long-term popular items from the last pre-generated batch (per region, else surface)."""
    keys = ([f"{ctx.surface}/{ctx.region}"] if ctx.region else []) + [ctx.surface]
    for key in keys:
        found = ctx.view.pregen("popular", key)
        if found:
            return [Hit(i, s, a, f"popular on {key} in recent days")
                    for i, s, a in found if i not in ctx.excluded][:fetch]
    return []


SOURCES: dict[str, Callable[[RetrievalContext, int], list[Hit]]] = {
    "trending": trending_source,
    "coengagement": coengagement_source,
    "author": author_source,
    "history": history_source,
    "embedding": embedding_source,
    "pregen_popular": pregen_popular_source,
}


def integrity_filter(hits, view) -> list:
    """Drop objectionable items (flagged, or reported by many)."""
    return [h for h in hits if not is_objectionable(view.quality(h.item_id))]

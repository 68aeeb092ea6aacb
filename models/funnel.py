"""The serving funnel: retrieve -> blend -> rank -> rerank, within a deadline.

Pure functions over an :class:`ItemView` (shared item-side state) and a
:class:`~models.history.UserHistory`; the Faust serving agent is thin glue
around :func:`recommend`.  Today's ranking stage orders by blended retrieval
score; learned stages plug in at :func:`rank`.

>>> view = StaticItemView(trending={"explore": [("t1", 5.0, "a"), ("t2", 4.0, "a")]},
...                       neighbours={"s": [("n1", 2.0, "b")]})
>>> h = UserHistory(); h.apply("s", "like", 1000.0)
>>> req = RecommendationRequest("r", "u", "explore", k=3, deadline=2000.0)
>>> [(i.item_id, i.sources) for i in recommend(req, h, view, clock=lambda: 1000.0).items]
[('n1', ('history',)), ('t1', ('trending',)), ('t2', ('trending',))]
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

from models.history import UserHistory
from schemas.requests import RankedItem, RecommendationReply, RecommendationRequest

Scored = tuple[str, float, Optional[str]]  # (item, score, author)
MODEL_VERSIONS = {"ranker": "blend-v1"}


class ItemView(Protocol):
    """Item-side state every worker can read (see :mod:`stores.shared_view`)."""

    def trending(self, surface: str, n: int, now: float) -> list[Scored]: ...

    def neighbours(self, item: str) -> list[Scored]: ...


class StaticItemView:
    """An in-memory :class:`ItemView`, for tests and offline evaluation."""

    def __init__(self, trending=None, neighbours=None):
        self.trending_lists = trending or {}
        self.neighbour_lists = neighbours or {}

    def trending(self, surface, n, now):
        return list(self.trending_lists.get(surface, []))[:n]

    def neighbours(self, item):
        return list(self.neighbour_lists.get(item, []))


@dataclass(frozen=True)
class SourceSpec:
    weight: float
    fetch: int


@dataclass(frozen=True)
class FunnelConfig:
    sources: dict = field(default_factory=lambda: {
        "history": SourceSpec(weight=1.0, fetch=500),
        "trending": SourceSpec(weight=0.6, fetch=500),
    })
    seeds: int = 10
    #: Below this much time left, skip the funnel and serve the fallback.
    min_budget_s: float = 0.005
    #: Stop retrieving when this little time is left, keeping room to reply.
    reserve_s: float = 0.002
    #: Longest run of consecutive items by one author in a reply.
    max_author_run: int = 1


DEFAULT_CONFIG = FunnelConfig()


def history_source(history: UserHistory, view: ItemView, now: float, seeds: int,
                   fetch: int) -> list[Scored]:
    """Items co-engaged with the user's recent positives; newer seeds weigh more."""
    scores: dict[str, float] = {}
    authors: dict[str, Optional[str]] = {}
    for rank, seed in enumerate(history.positive_seeds(now, seeds)):
        seed_weight = 1.0 / (1.0 + rank)
        for item, w, author in view.neighbours(seed):
            scores[item] = scores.get(item, 0.0) + seed_weight * w
            authors[item] = author
    top = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:fetch]
    return [(item, s, authors[item]) for item, s in top]


@dataclass
class Candidate:
    item_id: str
    score: float
    author_id: Optional[str]
    #: source name -> that source's normalised score for this item.
    sources: dict


def blend(results: dict[str, list[Scored]], weights: dict[str, float]) -> list[Candidate]:
    """Merge sources: each source's scores are scaled to its best item, weighted and
    summed; every source that proposed an item stays in its attribution.

    >>> [(c.item_id, round(c.score, 2), sorted(c.sources)) for c in
    ...  blend({"a": [("x", 4.0, None), ("y", 2.0, None)], "b": [("y", 1.0, None)]},
    ...        {"a": 1.0, "b": 1.0})]
    [('y', 1.5, ['a', 'b']), ('x', 1.0, ['a'])]
    """
    merged: dict[str, Candidate] = {}
    for name, scored in results.items():
        if not scored:
            continue
        top = max(s for _, s, _ in scored)
        scale = 1.0 / top if top > 0 else 0.0
        for item, s, author in scored:
            norm = s * scale
            cand = merged.get(item)
            if cand is None:
                cand = merged[item] = Candidate(item, 0.0, author, {})
            cand.score += weights.get(name, 0.0) * norm
            cand.sources[name] = norm
            if cand.author_id is None:
                cand.author_id = author
    return sorted(merged.values(), key=lambda c: (-c.score, c.item_id))


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """First and second stage. Today: blended retrieval score (already sorted)."""
    return candidates


def rerank(ranked: list[Candidate], k: int, max_author_run: int = 1) -> list[Candidate]:
    """No repeats, and no more than ``max_author_run`` items of one author in a row:
    an item that would extend a run waits for the next slot it fits.

    >>> cs = [Candidate(i, 1.0, a, {}) for i, a in [("1", "A"), ("2", "A"), ("3", "B")]]
    >>> [c.item_id for c in rerank(cs, 3)]
    ['1', '3', '2']
    """
    out: list[Candidate] = []
    used: set[str] = set()
    pending = [c for c in ranked]
    while pending and len(out) < k:
        pick = None
        for idx, cand in enumerate(pending):
            if cand.item_id in used:
                continue
            run = _author_run(out, cand.author_id)
            if run < max_author_run:
                pick = idx
                break
        if pick is None:
            # Only one author left: diversity cannot be kept, relevance still can.
            pick = next((i for i, c in enumerate(pending) if c.item_id not in used), None)
            if pick is None:
                break
        cand = pending.pop(pick)
        used.add(cand.item_id)
        out.append(cand)
    return out


def _author_run(out: list[Candidate], author: Optional[str]) -> int:
    if author is None:
        return 0
    run = 0
    for c in reversed(out):
        if c.author_id != author:
            break
        run += 1
    return run


def fallback_items(req: RecommendationRequest, history: UserHistory, view: ItemView,
                   now: float, config: FunnelConfig) -> list[Candidate]:
    """The cheap answer: trending on the surface, minus what the user saw."""
    excluded = history.excluded() | set(req.exclude)
    trend = [(i, s, a) for i, s, a in view.trending(req.surface, req.k * 4 + len(excluded), now)
             if i not in excluded]
    return rerank(blend({"trending": trend}, {"trending": 1.0}), req.k, config.max_author_run)


def recommend(req: RecommendationRequest, history: UserHistory, view: ItemView, *,
              clock: Callable[[], float] = time.time,
              config: FunnelConfig = DEFAULT_CONFIG) -> RecommendationReply:
    """Answer one request; serve the fallback when the deadline leaves no room."""
    start = clock()
    counts: dict[str, int] = {}

    def reply(items: list[Candidate], fallback_reason: Optional[str] = None) -> RecommendationReply:
        ranked = [RankedItem(c.item_id, round(c.score, 6),
                             tuple(sorted(c.sources, key=lambda s: -c.sources[s])), c.author_id)
                  for c in items]
        counts["returned"] = len(ranked)
        return RecommendationReply(
            request_id=req.request_id, user_id=req.user_id, surface=req.surface, items=ranked,
            model_versions=dict(MODEL_VERSIONS), fallback=fallback_reason is not None,
            fallback_reason=fallback_reason, stage_counts=dict(counts),
            server_latency_ms=round((clock() - start) * 1000.0, 3))

    if req.deadline - start < config.min_budget_s:
        return reply(fallback_items(req, history, config=config, view=view, now=start),
                     "deadline too close to run the funnel")
    excluded = history.excluded() | set(req.exclude)
    results: dict[str, list[Scored]] = {}
    retrieved: set[str] = set()
    for name, spec in config.sources.items():
        if clock() > req.deadline - config.reserve_s:
            return reply(fallback_items(req, history, view, start, config),
                         f"deadline reached during retrieval (before {name!r})")
        if name == "history":
            found = history_source(history, view, start, config.seeds, spec.fetch + len(excluded))
        elif name == "trending":
            found = view.trending(req.surface, spec.fetch + len(excluded), start)
        else:
            continue
        retrieved.update(c[0] for c in found)
        # Filter before blending so seen items neither come back nor set the scale.
        results[name] = [c for c in found if c[0] not in excluded][:spec.fetch]
    counts["retrieved"] = len(retrieved)
    candidates = blend(results, {n: s.weight for n, s in config.sources.items()})
    counts["after_filters"] = len(candidates)
    ranked = rank(candidates)
    counts["ranked"] = len(ranked)
    return reply(rerank(ranked, req.k, config.max_author_run))

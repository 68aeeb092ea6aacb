"""The serving funnel: retrieve -> blend -> filter -> rank -> rerank, within a deadline.

Pure functions over an :class:`ItemView` (shared item-side state) and a
:class:`~models.history.UserHistory`; the Faust serving agent is thin glue
around :func:`recommend`.  When a model is live, its learned stages rank at
:func:`rank` (:class:`~models.scoring.ModelScorer`); without one (cold start)
the blended retrieval score orders the candidates.

>>> view = StaticItemView(trending={"explore": [("t1", 5.0, "a"), ("t2", 4.0, "a")]},
...                       neighbours={"s": [("n1", 2.0, "b")]})
>>> h = UserHistory(); h.apply("s", "like", 1000.0)
>>> req = RecommendationRequest("r", "u", "explore", k=3, deadline=2000.0)
>>> [(i.item_id, i.sources) for i in recommend(req, h, view, clock=lambda: 1000.0).items]
[('n1', ('coengagement',)), ('t1', ('trending',)), ('t2', ('trending',))]
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import numpy as np

from models.history import UserHistory
from models.quality import is_objectionable
from models.sources import SOURCES, Hit, RetrievalContext
from schemas.requests import RankedItem, RecommendationReply, RecommendationRequest

Scored = tuple[str, float, Optional[str]]  # (item, score, author)
BLEND_VERSION = {"ranker": "blend-v1"}


class ItemView(Protocol):
    """Item-side state every worker can read (see :mod:`stores.shared_view`)."""

    def trending(self, surface: str, n: int, now: float) -> list[Scored]: ...
    def neighbours(self, item: str) -> list[Scored]: ...
    def author_items(self, author: str) -> list[Scored]: ...
    def author_of(self, item: str) -> Optional[str]: ...
    def quality(self, item: str) -> Optional[dict]: ...
    def first_seen(self, item: str) -> Optional[float]: ...
    def embedding(self, item: str) -> Optional[np.ndarray]: ...
    def similar(self, item: str, k: int) -> list[tuple[str, float]]: ...
    def nearest(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]: ...
    def pregen(self, name: str, key: str) -> list[Scored]: ...


class StaticItemView:
    """An in-memory :class:`ItemView`, for tests and offline evaluation.

    ``similar`` and ``nearest`` search ``embeddings`` exhaustively (cosine).
    """

    def __init__(self, trending=None, neighbours=None, author_items=None, quality=None,
                 embeddings=None, pregen=None, authors=None):
        self.trending_lists = trending or {}
        self.neighbour_lists = neighbours or {}
        self.author_lists = author_items or {}
        self.qualities = quality or {}
        self.embeddings = embeddings or {}
        self.pregen_lists = pregen or {}
        self.authors = authors or {}

    def trending(self, surface, n, now):
        return list(self.trending_lists.get(surface, []))[:n]

    def neighbours(self, item):
        return list(self.neighbour_lists.get(item, []))

    def author_items(self, author):
        return list(self.author_lists.get(author, []))

    def author_of(self, item):
        return self.authors.get(item)

    def quality(self, item):
        return self.qualities.get(item)

    def first_seen(self, item):
        return None

    def embedding(self, item):
        return self.embeddings.get(item)

    def nearest(self, vector, k, skip=()):
        if not self.embeddings:
            return []
        ids = list(self.embeddings)
        matrix = np.stack([self.embeddings[i] for i in ids])
        norms = np.linalg.norm(matrix, axis=1) * (np.linalg.norm(vector) or 1.0)
        sims = matrix @ vector / np.where(norms > 0, norms, 1.0)
        order = np.argsort(-sims)
        return [(ids[j], float(sims[j])) for j in order if ids[j] not in skip][:k]

    def similar(self, item, k):
        vector = self.embeddings.get(item)
        return [] if vector is None else self.nearest(vector, k, skip={item})

    def pregen(self, name, key):
        return list(self.pregen_lists.get(name, {}).get(key, []))


@dataclass(frozen=True)
class SourceSpec:
    weight: float
    fetch: int


def _default_sources() -> dict:
    return {
        "coengagement": SourceSpec(weight=1.0, fetch=300),
        "history": SourceSpec(weight=1.0, fetch=300),
        "author": SourceSpec(weight=0.5, fetch=200),
        "embedding": SourceSpec(weight=0.7, fetch=300),
        "trending": SourceSpec(weight=0.6, fetch=300),
        "pregen_popular": SourceSpec(weight=0.3, fetch=200),
    }


@dataclass(frozen=True)
class FunnelConfig:
    """Which sources run for a surface, how many items each fetches, and its weight."""
    sources: dict = field(default_factory=_default_sources)
    seeds: int = 10
    #: Below this much time left, skip the funnel and serve the fallback.
    min_budget_s: float = 0.005
    #: Stop retrieving when this little time is left, keeping room to reply.
    reserve_s: float = 0.002
    #: Longest run of consecutive items by one author in a reply.
    max_author_run: int = 1
    #: Value model weights (head -> weight) for this surface; None = built-in default.
    value_weights: Optional[dict] = None
    #: Share of requests whose last slot shows an item from just below the top k
    #: (see :func:`explore`), so the models keep learning about what they rank lower.
    explore_share: float = 0.1

    @classmethod
    def from_dict(cls, d: dict) -> "FunnelConfig":
        """Build from JSON-like config, refusing unknown sources or bad numbers.

        >>> FunnelConfig.from_dict({"sources": {"trending": {"weight": 1, "fetch": 50}}}).sources
        {'trending': SourceSpec(weight=1.0, fetch=50)}
        """
        unknown = set(d) - {"sources", "seeds", "max_author_run", "min_budget_s", "reserve_s",
                            "value_weights", "explore_share"}
        if unknown:
            raise ValueError(f"unknown funnel settings: {sorted(unknown)}")
        sources = {}
        for name, spec in (d.get("sources") or {}).items():
            if name not in SOURCES:
                raise ValueError(f"unknown source {name!r}; known: {sorted(SOURCES)}")
            weight, fetch = float(spec.get("weight", 1.0)), int(spec.get("fetch", 100))
            if weight < 0 or not 0 < fetch <= 10_000:
                raise ValueError(f"source {name!r}: weight must be >= 0 and fetch in 1..10000")
            sources[name] = SourceSpec(weight, fetch)
        if not sources:
            raise ValueError("a funnel needs at least one source")
        value_weights = None
        if d.get("value_weights") is not None:
            from models.value import ValueWeights
            value_weights = ValueWeights.from_dict(d["value_weights"]).weights
        return cls(sources=sources, seeds=int(d.get("seeds", 10)), value_weights=value_weights,
                   max_author_run=int(d.get("max_author_run", 1)),
                   explore_share=_share(d.get("explore_share", 0.1)),
                   min_budget_s=float(d.get("min_budget_s", 0.005)),
                   reserve_s=float(d.get("reserve_s", 0.002)))


def _share(value) -> float:
    share = float(value)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"explore_share must be in [0, 1], got {value!r}")
    return share


DEFAULT_CONFIG = FunnelConfig()
#: ``stage_counts`` keys of the candidates each retrieval source proposed.
SOURCE_COUNT_PREFIX = "source:"


@dataclass(slots=True)
class Candidate:
    item_id: str
    score: float
    author_id: Optional[str]
    #: source name -> that source's normalised score for this item.
    sources: dict
    #: source name -> why that source proposed the item.
    why: dict = field(default_factory=dict)


def blend(results: dict[str, list], weights: dict[str, float]) -> list[Candidate]:
    """Merge sources: each source's scores are scaled to its best item, weighted and
    summed; every source that proposed an item stays in its attribution.

    >>> [(c.item_id, round(c.score, 2), sorted(c.sources)) for c in
    ...  blend({"a": [("x", 4.0, None), ("y", 2.0, None)], "b": [("y", 1.0, None)]},
    ...        {"a": 1.0, "b": 1.0})]
    [('y', 1.5, ['a', 'b']), ('x', 1.0, ['a'])]
    """
    # One Candidate per item, updated in place: this runs over every retrieved hit
    # of every request, so the loop body stays small.
    merged: dict[str, Candidate] = {}
    for name, scored in results.items():
        if not scored:
            continue
        top = max(hit[1] for hit in scored)
        scale = 1.0 / top if top > 0 else 0.0
        weight = weights.get(name, 0.0)
        for hit in scored:
            item = hit[0]
            norm = hit[1] * scale
            c = merged.get(item)
            if c is None:
                c = merged[item] = Candidate(item, weight * norm, hit[2], {name: norm}, {})
            else:
                c.score += weight * norm
                c.sources[name] = norm
                if c.author_id is None:
                    c.author_id = hit[2]
            if len(hit) > 3 and hit[3]:
                c.why[name] = hit[3]
    return sorted(merged.values(), key=lambda c: (-c.score, c.item_id))


def rank(candidates: list[Candidate], ctx=None, request_id: str = "", scorer=None,
         value_weights: Optional[dict] = None) -> tuple[list[Candidate], list, dict]:
    """First and second stage: the learned scorer when a model is live, otherwise the
    blended retrieval score (the cold-start path).  Returns (ranked, predictions, counts)."""
    if scorer is None:
        return candidates, [], {}
    from models.value import weights_for
    return scorer.rank(ctx, request_id, candidates, value_weights or weights_for(ctx.surface))


def rerank(ranked: list[Candidate], k: int, max_author_run: int = 1) -> list[Candidate]:
    """No repeats, and no more than ``max_author_run`` items of one author in a row:
    an item that would extend a run waits for the next slot it fits.

    >>> cs = [Candidate(i, 1.0, a, {}) for i, a in [("1", "A"), ("2", "A"), ("3", "B")]]
    >>> [c.item_id for c in rerank(cs, 3)]
    ['1', '3', '2']
    """
    out: list[Candidate] = []
    used: set[str] = set()
    pending = list(ranked)
    while pending and len(out) < k:
        pick = None
        for idx, cand in enumerate(pending):
            if cand.item_id in used:
                continue
            if _author_run(out, cand.author_id) < max_author_run:
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


def explore(ranked: list[Candidate], k: int, share: float, seed: str,
            depth: int = 4) -> list[Candidate]:
    """With probability ``share``, move one item from ranks ``k .. depth*k`` into
    place ``k - 1`` (the last slot): a model learns only from what it shows, so
    without this the items it under-rates never get the labels that would
    correct it.  Seeded by ``seed`` (the request id): replays decide alike.

    >>> cs = [Candidate(str(i), 1.0, None, {}) for i in range(40)]
    >>> [c.item_id for c in explore(cs, 3, 1.0, "r1")[:3]], explore(cs, 3, 0.0, "r1") == cs
    (['0', '1', '7'], True)
    """
    if share <= 0 or len(ranked) <= k or k < 1:
        return ranked
    rng = random.Random(seed)
    if rng.random() >= share:
        return ranked
    pick = rng.randrange(k, min(len(ranked), depth * k))
    chosen = ranked[pick]
    chosen.why = {**chosen.why, "explore": "shown to learn how much you like it"}
    return ranked[:k - 1] + [chosen] + ranked[k - 1:pick] + ranked[pick + 1:]


def _author_run(out: list[Candidate], author: Optional[str]) -> int:
    if author is None:
        return 0
    run = 0
    for c in reversed(out):
        if c.author_id != author:
            break
        run += 1
    return run


def request_namespace(req: RecommendationRequest) -> str:
    """The item-id prefix a request is confined to (``context["namespace"]``), "" for all.

    A simulated world on a shared worker sets it, so that other worlds' items
    and real data cannot fill its lists.

    >>> request_namespace(RecommendationRequest("r", "u", "explore", 5, 0.0,
    ...                                         context={"namespace": "sim-x-"}))
    'sim-x-'
    """
    namespace = req.context.get("namespace")
    return namespace if isinstance(namespace, str) else ""


def fallback_items(req: RecommendationRequest, history: UserHistory, view: ItemView,
                   now: float, config: FunnelConfig) -> list[Candidate]:
    """The cheap answer: trending on the surface, minus what the user saw."""
    excluded = history.excluded() | set(req.exclude)
    namespace = request_namespace(req)
    # A namespaced request shares trending with other worlds' items: look deeper.
    depth = (req.k * 4 + len(excluded)) * (10 if namespace else 1)
    trend = [(i, s, a) for i, s, a in view.trending(req.surface, depth, now)
             if i not in excluded and i.startswith(namespace)
             and not is_objectionable(view.quality(i))]
    return rerank(blend({"trending": trend}, {"trending": 1.0}), req.k, config.max_author_run)


def recommend(req: RecommendationRequest, history: UserHistory, view: ItemView, *,
              clock: Callable[[], float] = time.time,
              config: FunnelConfig = DEFAULT_CONFIG, scorer=None,
              predictions: Optional[list] = None) -> RecommendationReply:
    """Answer one request; serve the fallback when the deadline leaves no room.

    With a ``scorer`` (a live model) the learned stages rank; their head
    probabilities are appended to ``predictions`` for logging.
    """
    start = clock()
    counts: dict[str, int] = {}
    versions = dict(BLEND_VERSION)

    def reply(items: list[Candidate], fallback_reason: Optional[str] = None) -> RecommendationReply:
        ranked = [RankedItem(c.item_id, round(c.score, 6),
                             tuple(sorted(c.sources, key=lambda s: -c.sources[s])), c.author_id,
                             dict(c.why) or None,
                             {s: round(v, 4) for s, v in c.sources.items()})
                  for c in items]
        counts["returned"] = len(ranked)
        return RecommendationReply(
            request_id=req.request_id, user_id=req.user_id, surface=req.surface, items=ranked,
            model_versions=versions, fallback=fallback_reason is not None,
            fallback_reason=fallback_reason, stage_counts=dict(counts),
            server_latency_ms=round((clock() - start) * 1000.0, 3))

    if req.deadline - start < config.min_budget_s:
        return reply(fallback_items(req, history, view, start, config),
                     "deadline too close to run the funnel")
    region = req.context.get("region") if isinstance(req.context.get("region"), str) else None
    ctx = RetrievalContext(req.surface, history, view, start,
                           excluded=history.excluded() | set(req.exclude), region=region,
                           seeds=config.seeds, user_id=req.user_id)
    results: dict[str, list[Hit]] = {}
    retrieved: set[str] = set()
    for name, spec in config.sources.items():
        if clock() > req.deadline - config.reserve_s:
            return reply(fallback_items(req, history, view, start, config),
                         f"deadline reached during retrieval (before {name!r})")
        results[name] = SOURCES[name](ctx, spec.fetch)
        # Per source, what it proposed (before blending merges items several proposed).
        counts[f"{SOURCE_COUNT_PREFIX}{name}"] = len(results[name])
        retrieved.update(h.item_id for h in results[name])
    counts["retrieved"] = len(retrieved)
    candidates = blend(results, {n: s.weight for n, s in config.sources.items()})
    namespace = request_namespace(req)
    candidates = [c for c in candidates if c.item_id.startswith(namespace)
                  and not is_objectionable(view.quality(c.item_id))]
    counts["after_filters"] = len(candidates)
    if scorer is not None:
        if clock() > req.deadline - config.reserve_s:
            return reply(fallback_items(req, history, view, start, config),
                         "deadline reached before ranking")
        versions = {"ranker": f"{scorer.model}:{scorer.version}"}
    ranked, logged, stage_counts = rank(candidates, ctx, req.request_id, scorer,
                                        config.value_weights)
    counts.update(stage_counts)
    counts["ranked"] = len(ranked)
    ranked = explore(ranked, req.k, config.explore_share, req.request_id)
    served = rerank(ranked, req.k, config.max_author_run)
    if predictions is not None:
        predictions.extend(logged)
        if scorer is not None:
            predictions.extend(scorer.served_predictions(ctx, req.request_id, served))
    return reply(served)

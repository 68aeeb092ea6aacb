"""Offline retrieval quality on MovieLens-100k, evaluated in time order.

    ~/.cache/streamrec/venv/bin/python bench/retrieval.py --quick   # 1000 evaluation points
    ~/.cache/streamrec/venv/bin/python bench/retrieval.py           # 5000 evaluation points

Method:

* Events are the ratings as :func:`streams.replay.to_events` makes them
  (:mod:`models.movielens`: 4-5 stars a click then a like), with the real
  time gaps kept (``time_scale=1``), so decay windows mean real days.  A
  positive is a ``like`` (4-5 stars).
* Split in time: the first 80% of ratings (``--split``) are history.  The
  pre-generated products (popular per surface, item embeddings) are computed
  from history only, once, with :mod:`models.pregen`, as the off-peak batch
  job would have been just before the split.
* All events are then walked in time order while the streaming state the live
  system keeps is maintained in-process with the fold the ingest and
  item-stats agents run (:mod:`models.item_state`): per-user
  :class:`UserHistory`, decayed trending boards per surface (and region),
  co-engagement neighbours (pairs with the user's last 10 positives, decayed
  by event time, top 50 kept), item quality counts and author boards (a
  movie's first genre is its author).  History events only warm this state
  up, as a running system would have been.  As in the live pipeline, item
  deltas are folded in batches (``--batch`` events, and always just before an
  evaluation, so every earlier event counts).
* Before each liked rating in the remaining 20% (or a seeded uniform sample
  of them, ``--max-points``), before its click, the real source functions of
  :mod:`models.sources` run against an ``ItemView`` over that state, each
  alone with ``fetch=200``, and blended with
  :data:`models.funnel.DEFAULT_CONFIG`'s fetches and weights (objectionable
  items filtered as in ``recommend``).  A point is a hit at K if the liked
  item is among the first K candidates; items the user has seen are excluded
  everywhere.  The baseline ranks items by all-time like counts
  so far, minus the user's seen items.
* Vector search is exhaustive numpy cosine by default (1.5k items); ``--ann
  hnsw`` uses :class:`stores.ann.AnnIndex` as the serving view builds it.

Prints one JSON object on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import log, run  # noqa: E402
from models.funnel import DEFAULT_CONFIG, blend  # noqa: E402
from models.history import AUTHOR_HALF_LIFE_S, UserHistory  # noqa: E402
from models.item_state import add_item_deltas, apply_delta, profile, total_score  # noqa: E402
from models.pregen import DAY_S, item_embeddings, popular  # noqa: E402
from models.quality import is_objectionable  # noqa: E402
from models.sources import SOURCES, RetrievalContext  # noqa: E402
from models.trending import TrendingBoard  # noqa: E402
# streams.replay is plain file parsing; it does not start the Faust app.
from streams.replay import (SURFACE, find_dataset, load_authors, load_ratings,  # noqa: E402
                            to_events)

KS = (50, 200)
SOURCE_FETCH = 200
#: Sources whose answer for a smaller fetch is the start of their answer for a
#: larger one, so one call serves both the source alone and the blend.  Not the
#: ones that pad an index lookup by the fetch (models.sources._padded): a larger
#: fetch looks further past the user's seen items.
PREFIX_SOURCES = frozenset({"coengagement", "author", "pregen_popular"})
#: Mirror of streams.item_stats.AUTHOR_ITEMS_SIZE, which cannot be imported
#: here without starting the Faust app.
AUTHOR_ITEMS_SIZE = 50


# --------------------------------------------------------------------------- vector search

class ExactIndex:
    """Exhaustive cosine search with the query API of :class:`stores.ann.AnnIndex`."""

    def __init__(self, ids: list[str], matrix: np.ndarray):
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        self.ids = list(ids)
        self.matrix = matrix / np.where(norms > 0, norms, 1.0)
        self.rows = {item: j for j, item in enumerate(self.ids)}

    def __contains__(self, item) -> bool:
        return item in self.rows

    def vector(self, item: str) -> Optional[np.ndarray]:
        j = self.rows.get(item)
        return None if j is None else self.matrix[j]

    def query(self, vector: np.ndarray, k: int, skip: int = -1) -> list[tuple[str, float]]:
        sims = self.matrix @ (vector / (np.linalg.norm(vector) or 1.0))
        if skip >= 0:
            sims[skip] = -np.inf
        k = min(k, len(self.ids) - (skip >= 0))
        if k <= 0:
            return []
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top], kind="stable")]
        return [(self.ids[j], float(sims[j])) for j in top]

    def query_item(self, item: str, k: int) -> list[tuple[str, float]]:
        j = self.rows[item]
        return self.query(self.matrix[j], k, skip=j)


def build_index(vectors: dict[str, np.ndarray], kind: str):
    """The search index over the batch's embeddings: hnswlib as served, or exact."""
    ids = sorted(vectors)
    if not ids:
        return None, "none (no embeddings)"
    matrix = np.stack([vectors[i] for i in ids]).astype(np.float32)
    if kind == "hnsw":
        try:
            from stores.ann import AnnIndex
            index = AnnIndex(matrix.shape[1], space="cosine", max_elements=len(ids))
            index.upsert(ids, matrix)
            return index, ("hnswlib via stores.ann.AnnIndex (cosine, M=16, ef=64), "
                           "built like stores.shared_view.PregenBatch")
        except Exception as exc:  # a half-edited stores/ann.py should not sink the run
            log(f"AnnIndex unavailable ({exc!r}); falling back to exact search")
    return ExactIndex(ids, matrix), "exact cosine search (numpy, exhaustive)"


# --------------------------------------------------------------------------- live state

class LiveState:
    """What ingest + item_stats keep, folded in-process with their own functions
    (:func:`models.item_state.add_item_deltas` and :func:`~models.item_state.apply_delta`).

    As in the live pipeline, user histories change event by event while item
    deltas gather into a batch that is folded into item state at once (the
    co-engagement top-50 cut happens per batch).  :meth:`flush` folds the
    batch; the walk flushes every ``batch`` events and before every
    evaluation, so evaluations see every earlier event.
    """

    def __init__(self, half_life_s: float, batch: int = 500,
                 author_half_life_s: float = AUTHOR_HALF_LIFE_S):
        self.half_life = half_life_s
        #: Half-life of each user's per-author counts (the worker's user_author_half_life_s).
        self.author_half_life = author_half_life_s
        self.batch = batch
        self.histories: dict[str, UserHistory] = {}
        #: item -> the item_stats table's record (see models.item_state.apply_delta).
        self.stats: dict[str, dict] = {}
        #: trending key (surface, or surface@region) -> board, as item_stats keeps per partition.
        self.boards: dict[str, TrendingBoard] = {}
        self.author_boards: dict[str, TrendingBoard] = {}
        self.likes: Counter = Counter()
        self.pending: dict[str, dict] = {}
        self.pending_events = 0
        #: Bumped by every flush, so readers know when cached answers went stale.
        self.version = 0

    def history(self, user: str) -> UserHistory:
        return self.histories.get(user) or UserHistory()

    def apply(self, ev) -> None:
        h = self.histories.setdefault(ev.user_id, UserHistory())
        if h.is_duplicate(ev.event_id):
            return
        # From the history before this event, as ingest does.
        add_item_deltas(self.pending, h, ev, self.half_life)
        h.apply(ev.item_id, ev.event_type, ev.ts, ev.author_id,
                author_half_life_s=self.author_half_life)
        if ev.event_type == "like":
            self.likes[ev.item_id] += 1
        self.pending_events += 1
        if self.pending_events >= self.batch:
            self.flush()

    def flush(self) -> None:
        """Fold the pending deltas as the item_stats agent folds one batch."""
        for item, delta in self.pending.items():
            stats, _ = apply_delta(self.stats.get(item), delta, self.half_life)
            self.stats[item] = stats
            for key in delta["trend"]:
                board = self.boards.setdefault(key, TrendingBoard(self.half_life))
                board.set(item, stats["trend"][key], stats["author"])
            if stats["author"] is not None and stats["trend"]:
                board = self.author_boards.setdefault(
                    stats["author"], TrendingBoard(self.half_life, capacity=AUTHOR_ITEMS_SIZE))
                board.set(item, total_score(stats["trend"], self.half_life), stats["author"])
        self.pending = {}
        self.pending_events = 0
        self.version += 1


class ReplayView:
    """:class:`models.funnel.ItemView` over :class:`LiveState` and one pre-generated batch."""

    def __init__(self, state: LiveState, pregen_lists: dict, index):
        self.state = state
        self.pregen_lists = pregen_lists
        self.index = index
        #: Event time of the request; author boards are read as of it (a fresh snapshot).
        self.now = 0.0
        self._trending_key = None
        self._trending: list = []

    def trending(self, surface, n, now):
        # Ranking the whole board costs milliseconds and several sources ask
        # within one request: rank once per (surface, time), as the shared
        # view's short cache does.
        key = (surface, now, self.state.version)
        if self._trending_key != key:
            board = self.state.boards.get(surface)
            ranked = board.top(len(board.scores), now) if board is not None else []
            self._trending = [(i, s, board.authors.get(i)) for i, s in ranked]
            self._trending_key = key
        return self._trending[:n]

    def neighbours(self, item):
        stats = self.state.stats.get(item)
        return [] if stats is None else [tuple(n) for n in profile(stats)["nbrs"]]

    def author_items(self, author):
        board = self.state.author_boards.get(author)
        return [] if board is None else [(i, s, author) for i, s in
                                         board.top(AUTHOR_ITEMS_SIZE, self.now)]

    def author_of(self, item):
        return self.state.stats.get(item, {}).get("author")

    def quality(self, item):
        return self.state.stats.get(item, {}).get("q")

    def first_seen(self, item):
        return self.state.stats.get(item, {}).get("first")

    def embedding(self, item):
        return self.index.vector(item) if self.index is not None and item in self.index else None

    def similar(self, item, k):
        if self.index is None or item not in self.index:
            return []
        return self.index.query_item(item, k)

    def nearest(self, vector, k):
        return [] if self.index is None else self.index.query(vector, k)

    def pregen(self, name, key):
        return list(self.pregen_lists.get(name, {}).get(key, []))


# --------------------------------------------------------------------------- evaluation

class Tally:
    """Hits at each K, and how often a source had anything to say."""

    def __init__(self):
        self.points = 0
        self.hits = {k: 0 for k in KS}
        self.covered = 0
        self.candidates = 0

    def add(self, ranked: list[str], target: str) -> None:
        self.points += 1
        self.covered += bool(ranked)
        self.candidates += len(ranked)
        try:
            rank = ranked.index(target)
        except ValueError:
            return
        for k in KS:
            self.hits[k] += rank < k

    def result(self) -> dict:
        n = self.points or 1
        out = {f"recall@{k}": round(self.hits[k] / n, 4) for k in KS}
        out.update(coverage=round(self.covered / n, 4),
                   mean_candidates=round(self.candidates / n, 1))
        return out


def evaluate_point(ev, state: LiveState, view: ReplayView, tallies: dict) -> None:
    """Run every source, the blend and the baseline just before ``ev`` (a like) is applied."""
    history = state.history(ev.user_id)
    view.now = ev.ts
    excluded = history.excluded()
    ctx = RetrievalContext(ev.surface, history, view, ev.ts, excluded=excluded,
                           seeds=DEFAULT_CONFIG.seeds)
    target = ev.item_id
    results = {}
    for name, source in SOURCES.items():
        spec = DEFAULT_CONFIG.sources.get(name)
        fetch = spec.fetch if spec is not None else SOURCE_FETCH
        if name in PREFIX_SOURCES and fetch >= SOURCE_FETCH:
            hits = source(ctx, fetch)
            alone = hits[:SOURCE_FETCH]
        else:
            alone = source(ctx, SOURCE_FETCH)
            hits = alone if fetch == SOURCE_FETCH else source(ctx, fetch)
        tallies[name].add([h.item_id for h in alone], target)
        if spec is not None:
            results[name] = hits
    weights = {n: s.weight for n, s in DEFAULT_CONFIG.sources.items()}
    blended = [c.item_id for c in blend(results, weights)
               if not is_objectionable(view.quality(c.item_id))]
    tallies["blend"].add(blended[:max(KS)], target)
    popular_now = [i for i, _ in state.likes.most_common(max(KS) + len(excluded))
                   if i not in excluded][:max(KS)]
    tallies["popularity_baseline"].add(popular_now, target)


def rating_groups(events: list) -> list[list]:
    """Consecutive events of one user and item: each rating's engagements
    (:func:`streams.replay.to_events` yields them together, a click before a like)."""
    groups: list[list] = []
    for ev in events:
        if groups and (groups[-1][0].user_id, groups[-1][0].item_id) == (ev.user_id, ev.item_id):
            groups[-1].append(ev)
        else:
            groups.append([ev])
    return groups


def load_split(dataset: Optional[str], split: float) -> tuple:
    """MovieLens as events in real time, as ratings' event groups in time order:
    ``(path, all events, history ratings, later ratings)``, split after the first
    ``split`` share of ratings."""
    path = find_dataset(dataset)
    ratings = load_ratings(path)
    events = list(to_events(ratings, load_authors(path), end_at=float(ratings[-1].ts),
                            time_scale=1.0))
    groups = rating_groups(events)
    cut = int(len(groups) * split)
    history, test = groups[:cut], groups[cut:]
    log(f"{len(groups)} ratings as {len(events)} events; history {len(history)} ratings, "
        f"test {len(test)} ratings ({(test[-1][0].ts - test[0][0].ts) / DAY_S:.1f} days)")
    return path, events, history, test


def prepare(args: argparse.Namespace, history: list[list], split_ts: float) -> tuple:
    """The pre-generated batch, computed at the split from history only, and an empty
    streaming state with an ``ItemView`` over both; ``(state, view, info)``.  Walk the
    history through the state (:func:`walk`) to warm it up."""
    history_events = [ev for group in history for ev in group]
    t_pregen = time.monotonic()
    pregen_lists = {"popular": popular(history_events, now=split_ts,
                                       window_days=args.popular_window_days,
                                       half_life_days=args.popular_half_life_days)}
    vectors = item_embeddings(history_events, dim=args.dim)
    index, ann = build_index(vectors, args.ann)
    pregen_s = time.monotonic() - t_pregen
    log(f"pregen: {len(pregen_lists['popular'].get(SURFACE, []))} popular, "
        f"{len(vectors)} item vectors, {pregen_s:.1f}s; search: {ann}")
    state = LiveState(args.half_life_days * DAY_S, batch=args.batch)
    info = {"history_events": len(history_events), "ann": ann, "pregen_s": round(pregen_s, 1),
            "pregen": {"popular_window_days": args.popular_window_days,
                       "popular_half_life_days": args.popular_half_life_days,
                       "embedding_dim": args.dim, "items_with_vectors": len(vectors),
                       "computed_at": "split (once, history events only)"}}
    return state, ReplayView(state, pregen_lists, index), info


def sample_likes(test: list[list], max_points: int, seed: int) -> tuple[set, int]:
    """Indices of the later ratings to evaluate (a seeded sample of those with a like),
    and how many have one."""
    likes = [n for n, group in enumerate(test) if any(ev.event_type == "like" for ev in group)]
    chosen = (random.Random(seed).sample(likes, max_points)
              if max_points and len(likes) > max_points else likes)
    return set(chosen), len(likes)


def walk(ratings: list[list], state: "LiveState", chosen: set = frozenset(), evaluate=None,
         progress: bool = False, before_apply=None, desc: str = "walk") -> float:
    """Apply ratings in time order; before each chosen one (before its click, so the
    liked item is still unseen), fold pending deltas and call ``evaluate(like)``;
    ``before_apply(group)`` then sees every rating just before its events are applied.
    Returns the seconds spent evaluating."""
    eval_s = 0.0
    for n, group in enumerate(tqdm(ratings, desc=desc, unit="rating", file=sys.stderr,
                                   mininterval=2.0, disable=not progress)):
        if n in chosen:
            t_eval = time.monotonic()
            state.flush()
            evaluate(next(ev for ev in group if ev.event_type == "like"))
            eval_s += time.monotonic() - t_eval
        if before_apply is not None:
            before_apply(group)
        for ev in group:
            state.apply(ev)
    return eval_s


def replay_summary(args: argparse.Namespace, path: Path, events: list, history: list,
                   test: list, info: dict, n_likes: int, points: int, cold: int) -> dict:
    """What a replay bench ran on: the data, the split, the sample and the state."""
    return {
        "dataset": str(path.name),
        "events": len(events),
        "history_ratings": len(history),
        "history_events": info["history_events"],
        "test_ratings": len(test),
        "test_period_days": round((test[-1][0].ts - test[0][0].ts) / DAY_S, 1),
        "test_likes": n_likes,
        "points": points,
        "sampled": points < n_likes,
        "seed": args.seed,
        "cold_points": cold,
        "cold_points_note": "no positive inside the 7-day seed window before the like",
        "trending_half_life_days": args.half_life_days,
        "item_state_batch": args.batch,
        "pregen": info["pregen"],
        "ann": info["ann"],
    }


def main(args: argparse.Namespace) -> dict:
    t0, cpu0 = time.monotonic(), time.process_time()
    path, events, history, test = load_split(args.dataset, args.split)
    state, view, info = prepare(args, history, test[0][0].ts)
    t_warm = time.monotonic()
    walk(history, state)
    warm_s = time.monotonic() - t_warm

    chosen, n_likes = sample_likes(test, 1000 if args.quick else args.max_points, args.seed)
    tallies = {name: Tally() for name in [*SOURCES, "blend", "popularity_baseline"]}
    cold = 0

    def evaluate(like) -> None:
        nonlocal cold
        cold += not state.history(like.user_id).positive_seeds(like.ts, 1)
        evaluate_point(like, state, view, tallies)

    t_walk = time.monotonic()
    eval_s = walk(test, state, chosen, evaluate, progress=not args.no_progress)
    walk_s = time.monotonic() - t_walk

    points = len(chosen)
    return {
        "bench": "retrieval",
        "method": ("MovieLens-100k as events with real time gaps (time_scale=1), each rating "
                   "as models.movielens maps it (4-5 stars: click then like); positive = like. "
                   "First {:.0%} of ratings by time = history: pre-generated popular "
                   "(per surface) and item embeddings (models.pregen) computed from it once, "
                   "at the split. Streaming state (UserHistory, trending boards, co-engagement "
                   "neighbours, quality counts, author boards = first genre) folded in-process "
                   "over all events in time order with models.item_state, the fold ingest + "
                   "item_stats run (item deltas folded per batch of {} events and before each "
                   "evaluation). Before each sampled liked rating in the rest (before its "
                   "click), the models.sources functions run on an ItemView over that state: "
                   "each alone with fetch={}, and blended with DEFAULT_CONFIG fetches/weights "
                   "(objectionable filtered); hit@K = liked item among the first K candidates, "
                   "seen items excluded. Baseline: all-time like counts so far, minus seen items."
                   ).format(args.split, args.batch, SOURCE_FETCH),
        **replay_summary(args, path, events, history, test, info, n_likes, points, cold),
        "recall": {name: t.result() for name, t in tallies.items()},
        "cpu_s": round(time.process_time() - cpu0, 1),
        "wall_s": {"total": round(time.monotonic() - t0, 1), "pregen": info["pregen_s"],
                   "warm_up": round(warm_s, 1), "walk": round(walk_s, 1),
                   "evaluation": round(eval_s, 1),
                   "per_point_ms": round(1000.0 * eval_s / max(points, 1), 2)},
    }


def add_replay_args(ap: argparse.ArgumentParser) -> None:
    """Options of the time-ordered MovieLens replay (shared with bench/final_list.py)."""
    ap.add_argument("--dataset", help="MovieLens-100k folder (default ../shared/datasets/...)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--split", type=float, default=0.8, help="share of ratings that are history")
    ap.add_argument("--half-life-days", type=float, default=1.0,
                    help="trending and author-board half-life (users rate in bursts)")
    ap.add_argument("--popular-window-days", type=float, default=7.0)
    ap.add_argument("--popular-half-life-days", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=500,
                    help="events per item-state fold, like the item_stats agent's batches")
    ap.add_argument("--dim", type=int, default=32, help="item embedding dimension")
    ap.add_argument("--ann", choices=("exact", "hnsw"), default="exact",
                    help="vector search: exhaustive numpy (default; 1.5k items) or "
                         "hnswlib via stores.ann as served")
    ap.add_argument("--no-progress", action="store_true")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="retrieval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1000 evaluation points")
    ap.add_argument("--max-points", type=int, default=5000,
                    help="evaluate a seeded uniform sample of this many test likes (0 = all)")
    add_replay_args(ap)
    return ap


if __name__ == "__main__":
    sys.exit(run(main, parser()))

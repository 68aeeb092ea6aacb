"""Final-list quality on MovieLens-100k: the whole funnel's top-k, replayed in time order.

    flock /tmp/streamrec-bench.lock ~/.cache/streamrec/venv/bin/python bench/final_list.py \
        --plot final_list.png                                     # 5000 points
    ~/.cache/streamrec/venv/bin/python bench/final_list.py --quick  # 500 points

bench/retrieval.py asks whether the liked movie is among the candidates; this
asks whether it is in the list the user gets back.  Method:

* The replay, state and sampling are bench/retrieval.py's: each rating as the
  live replay sends it (:mod:`models.movielens`), real time gaps; the first
  80% of ratings build the streaming state (with production's fold,
  :mod:`models.item_state`) and the pre-generated batch.  Before each sampled
  later liked rating (before its click, so the movie is still unseen) every
  arm returns ``k`` items, the user's seen items excluded:

  - ``popularity``: all-time like counts so far;
  - ``blend``: :func:`models.funnel.recommend` without a scorer (blend-only
    ranking, the cold-start path);
  - ``learned``: :func:`models.funnel.recommend` with a
    :class:`models.scoring.ModelScorer` (two-tower first stage, MTML ranker and
    value model) over a :class:`models.training.Trainer`.

  Both funnel arms run the default config (exploration included) on an
  ``ItemView`` over the state at that moment.
* The trainer is bootstrapped (``--epochs`` shuffled passes) on one example
  per history rating, built before the rating is applied, with the features
  the label join records at an impression: the user's recent positives and
  author counts, per-author and total rates, the item's quality counts and
  age from the item state.  Labels are the rating's (click, like, see_less;
  the other heads masked).  No retrieval ran for these ratings, so source
  scores are empty (as the label join records them for the replay); the
  position is 0, where serving ranks every candidate (``--position none``
  records none, as the replay's impressions have none).  MovieLens logs no
  shown-but-ignored impressions, so the replay adds them
  (:class:`models.movielens.IgnoredImpressions`: movies the user never rated,
  drawn by likes so far) and so does this bench: ``--negatives N`` per rating,
  labelled 0, default the replay's ``IGNORED_PER_RATING`` (0: engaged
  examples only, as the label join saw before the replay had them).  They
  train the model only; the state walks the ratings alone.  Unless ``--frozen``,
  the trainer keeps learning as the replay advances: one step on each
  ``--batch-size`` later ratings once they are all in the past, and the
  next requests are ranked by a scorer over the updated weights.
* HitRate@k: the liked movie is in the list; NDCG@k: 1 / log2(2 + its
  place), 0 when absent (one relevant item per point).

Prints one JSON object on stdout; progress goes to stderr; ``--plot PATH``
saves a bar chart of both metrics per arm.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import log, run  # noqa: E402
from bench.retrieval import (add_replay_args, load_split, prepare, replay_summary,  # noqa: E402
                             sample_likes, walk)
from models.features import Example, labels_from_events  # noqa: E402
from models.funnel import recommend  # noqa: E402
from models.movielens import (IGNORED_PER_RATING, RATED_HEADS,  # noqa: E402
                              IgnoredImpressions, rated_by_user)
from models.mtml import RankerConfig  # noqa: E402
from models.scoring import ModelScorer  # noqa: E402
from models.training import Trainer  # noqa: E402
from models.two_tower import TowerConfig  # noqa: E402
from schemas.requests import RecommendationRequest  # noqa: E402

ARMS = ("popularity", "blend", "learned")


def ndcg(place: Optional[int], k: int) -> float:
    """NDCG@k of a list with one relevant item at ``place`` (0-based; None = absent).

    >>> ndcg(0, 10), round(ndcg(2, 10), 4), ndcg(10, 10), ndcg(None, 10)
    (1.0, 0.5, 0.0, 0.0)
    """
    return 1.0 / math.log2(place + 2) if place is not None and place < k else 0.0


class ListTally:
    """HitRate@k and NDCG@k of returned lists against one liked item each, and how
    popular the returned items were (their likes so far)."""

    def __init__(self, k: int):
        self.k = k
        self.points = self.hits = self.returned = 0
        self.ndcg = 0.0
        self.seconds = 0.0
        self.item_likes: list[int] = []

    def add(self, items: list[str], target: str, seconds: float = 0.0,
            likes: Optional[dict] = None) -> None:
        place = items.index(target) if target in items[:self.k] else None
        self.points += 1
        self.hits += place is not None
        self.ndcg += ndcg(place, self.k)
        self.returned += len(items)
        self.seconds += seconds
        if likes is not None:
            self.item_likes.extend(likes.get(i, 0) for i in items)

    def result(self) -> dict:
        n = self.points or 1
        out = {f"hit_rate@{self.k}": round(self.hits / n, 4),
               f"ndcg@{self.k}": round(self.ndcg / n, 4),
               "mean_returned": round(self.returned / n, 2),
               "ms_per_list": round(1000.0 * self.seconds / n, 2)}
        if self.item_likes:
            out["median_likes_of_returned"] = float(np.median(self.item_likes))
        return out


def impression_example(state, view, ev, item: str, labels: dict,
                       position: Optional[int], *, request_id: Optional[str] = None,
                       source_scores: Optional[dict] = None) -> Example:
    """An impression of ``item`` to ``ev``'s user at ``ev``'s time, as the label join
    records it: features from the state as it is (before ``ev`` applies).  Without a
    ``request_id`` the user's hour stands in for the request; ``source_scores`` are the
    retrieval scores the item was served with (none for a replayed rating)."""
    history = state.history(ev.user_id)
    author = ev.author_id if item == ev.item_id else view.author_of(item)
    first = view.first_seen(item)
    return Example(
        user_id=ev.user_id, item_id=item, author_id=author, surface=ev.surface,
        ts=ev.ts, position=position, labels=labels,
        user_recent=history.recent_positive_items(20), user_authors=history.author_counts(),
        item_counts=dict(view.quality(item) or {}),
        item_age_s=max(0.0, ev.ts - first) if first else 0.0,
        user_author=history.author_stats(author), user_totals=history.totals(),
        source_scores=source_scores or {},
        # A user's ratings within one hour stand in for one request (as bench/quality.py).
        request_id=request_id if request_id is not None else f"{ev.user_id}:{int(ev.ts // 3600)}")


def rating_examples(state, view, group: list, position: Optional[int], negatives: int,
                    passed_over: IgnoredImpressions) -> list[Example]:
    """The rating's impression, labelled by its engagements (MovieLens heads only), and
    ``negatives`` impressions of movies the user never rated, drawn as the replay draws
    them (:class:`models.movielens.IgnoredImpressions`), labelled 0: shown and ignored."""
    ev = group[0]
    labels = labels_from_events([e.event_type for e in group], None)
    out = [impression_example(state, view, ev, ev.item_id, {h: labels[h] for h in RATED_HEADS},
                              position)]
    for item in passed_over.draw(ev.user_id, negatives):
        out.append(impression_example(state, view, ev, item, {h: 0 for h in RATED_HEADS},
                                      position))
    if any(e.event_type == "like" for e in group):
        passed_over.liked(ev.item_id)
    return out


def popular_list(state, excluded: set, k: int) -> list[str]:
    """The ``k`` most liked items so far that the user has not seen."""
    return [i for i, _ in state.likes.most_common(k + len(excluded)) if i not in excluded][:k]


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = result["k"]
    metrics = (f"hit_rate@{k}", f"ndcg@{k}")
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / len(ARMS)
    for j, arm in enumerate(ARMS):
        values = [result["arms"][arm][m] for m in metrics]
        bars = ax.bar(np.arange(len(metrics)) + (j - (len(ARMS) - 1) / 2) * width, values,
                      width, label=arm)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(np.arange(len(metrics)), [m.replace("_", " ") for m in metrics])
    ax.set_ylabel("mean over sampled likes")
    training = result["learned"]["training"]
    ax.set_title(f"Final top-{k} on MovieLens-100k, {result['points']} later likes "
                 f"(learned: {training['mode']}, {training['negatives_per_rating']} "
                 f"negatives per rating)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> dict:
    t0, cpu0 = time.monotonic(), time.process_time()
    torch.set_num_threads(args.threads)
    path, events, history, test = load_split(args.dataset, args.split)
    state, view, info = prepare(args, history, test[0][0].ts)
    position = None if args.position == "none" else int(args.position)
    progress = not args.no_progress

    examples: list[Example] = []
    passed_over = IgnoredImpressions(
        rated_by_user((g[0].user_id, g[0].item_id) for g in history + test), seed=args.seed)

    def examples_of(group: list) -> list[Example]:
        return rating_examples(state, view, group, position, args.negatives, passed_over)

    t_warm = time.monotonic()
    walk(history, state, progress=progress, desc="history",
         before_apply=lambda group: examples.extend(examples_of(group)))
    warm_s = time.monotonic() - t_warm

    trainer = Trainer(TowerConfig(), RankerConfig(), lr=args.lr, sparse_lr=args.sparse_lr,
                      seed=args.seed)
    t_boot = time.monotonic()
    losses = trainer.pretrain(examples, epochs=args.epochs, batch_size=args.batch_size,
                              progress=progress, seed=args.seed)
    boot_s = time.monotonic() - t_boot
    log(f"bootstrapped on {len(examples)} examples of history ratings, {args.epochs} epochs, {boot_s:.1f}s; "
        f"mean losses {[round(x, 3) for x in losses]}")

    scorer = ModelScorer(trainer, "ranker", "bench-bootstrap")
    pending: list[Example] = []
    online = {"steps": 0, "examples": 0, "seconds": 0.0}

    def learn(group: list) -> None:
        """Test-then-train: a rating's example is built before its events apply and
        learned from only once a batch of them is in the past."""
        nonlocal scorer
        if args.frozen:
            return
        pending.extend(examples_of(group))
        if len(pending) >= args.batch_size:
            t = time.monotonic()
            trainer.fit(pending)
            online["seconds"] += time.monotonic() - t
            online["steps"] += 1
            online["examples"] += len(pending)
            pending.clear()
            # A new version: the scorer caches tower vectors per version.
            scorer = ModelScorer(trainer, "ranker", f"bench-online-{online['steps']}")

    chosen, n_likes = sample_likes(test, 500 if args.quick else args.max_points, args.seed)
    tallies = {arm: ListTally(args.k) for arm in ARMS}
    fallbacks = {"blend": 0, "learned": 0}
    stages: dict[str, int] = {}
    cold = 0

    def evaluate(like) -> None:
        nonlocal cold
        history_now = state.history(like.user_id)
        cold += not history_now.positive_seeds(like.ts, 1)
        view.now = like.ts
        t = time.monotonic()
        tallies["popularity"].add(popular_list(state, history_now.excluded(), args.k),
                                  like.item_id, time.monotonic() - t, state.likes)
        req = RecommendationRequest(f"final-{like.event_id}", like.user_id, like.surface,
                                    args.k, deadline=like.ts + 60.0)
        for arm, arm_scorer in (("blend", None), ("learned", scorer)):
            t = time.monotonic()
            reply = recommend(req, history_now, view, clock=lambda: like.ts, scorer=arm_scorer)
            tallies[arm].add([i.item_id for i in reply.items], like.item_id,
                             time.monotonic() - t, state.likes)
            fallbacks[arm] += reply.fallback
            if arm == "learned":
                for stage, n in reply.stage_counts.items():
                    stages[stage] = stages.get(stage, 0) + n

    t_walk = time.monotonic()
    eval_s = walk(test, state, chosen, evaluate, progress=progress, before_apply=learn)
    walk_s = time.monotonic() - t_walk

    points = len(chosen)
    arms = {arm: t.result() for arm, t in tallies.items()}
    hit, nd = f"hit_rate@{args.k}", f"ndcg@{args.k}"
    mode = "frozen after bootstrap" if args.frozen else "online"
    result = {
        "bench": "final_list",
        "method": ("MovieLens-100k replayed in time order as bench/retrieval.py replays it; "
                   "first {:.0%} of ratings build state and bootstrap the trainer; before each "
                   "sampled later liked rating (before its click) each arm returns k={} items, "
                   "seen items excluded. popularity = all-time likes so far; blend = "
                   "models.funnel.recommend(scorer=None); learned = recommend with "
                   "models.scoring.ModelScorer over a models.training.Trainer. Hit = the liked "
                   "movie is in the list; NDCG = 1/log2(2 + place)."
                   ).format(args.split, args.k),
        "k": args.k,
        **replay_summary(args, path, events, history, test, info, n_likes, points, cold),
        "arms": arms,
        "learned_vs_popularity": {m: round(arms["learned"][m] / arms["popularity"][m], 3)
                                  if arms["popularity"][m] else None for m in (hit, nd)},
        "learned_vs_blend": {m: round(arms["learned"][m] / arms["blend"][m], 3)
                             if arms["blend"][m] else None for m in (hit, nd)},
        "fallback_replies": fallbacks,
        "learned": {
            "mean_stage_counts": {s: round(n / max(points, 1), 1) for s, n in stages.items()},
            "training": {
                "mode": mode,
                "bootstrap_examples": len(examples), "bootstrap_ratings": len(history),
                "epochs": args.epochs,
                "bootstrap_epoch_losses": [round(x, 4) for x in losses],
                "bootstrap_s": round(boot_s, 1),
                "online_steps": online["steps"], "online_examples": online["examples"],
                "online_s": round(online["seconds"], 1),
                "batch_size": args.batch_size, "lr": args.lr, "sparse_lr": args.sparse_lr,
                "example_position": position, "source_scores": "empty (no retrieval ran)",
                "negatives_per_rating": args.negatives,
                "labels": list(RATED_HEADS)}},
        "cpu_s": round(time.process_time() - cpu0, 1),
        "wall_s": {"total": round(time.monotonic() - t0, 1), "pregen": info["pregen_s"],
                   "warm_up": round(warm_s, 1), "bootstrap": round(boot_s, 1),
                   "walk": round(walk_s, 1), "evaluation": round(eval_s, 1),
                   "per_point_ms": round(1000.0 * eval_s / max(points, 1), 2)},
    }
    if args.plot:
        plot(result, args.plot)
        result["plot"] = args.plot
        log(f"plot saved to {args.plot}")
    return result


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="final_list", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="500 evaluation points")
    ap.add_argument("--max-points", type=int, default=5000,
                    help="evaluate a seeded uniform sample of this many test likes (0 = all)")
    ap.add_argument("--k", type=int, default=10, help="list length")
    ap.add_argument("--epochs", type=int, default=3, help="bootstrap passes over the history")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sparse-lr", type=float, default=1e-2, help="embedding tables' rate")
    ap.add_argument("--frozen", action="store_true",
                    help="keep the bootstrapped model; do not learn during the replay")
    ap.add_argument("--negatives", type=int, default=IGNORED_PER_RATING,
                    help="also train on this many movies per rating that the user never "
                         "rated, drawn by popularity and labelled 0, as the replay sends them "
                         "(MovieLens logs no ignored impressions; 0 = engaged ones only)")
    ap.add_argument("--position", default="0",
                    help="position recorded in training examples: an int, or 'none'")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", metavar="PATH", help="save a bar chart (PNG) here")
    add_replay_args(ap)
    return ap


if __name__ == "__main__":
    sys.exit(run(main, parser()))

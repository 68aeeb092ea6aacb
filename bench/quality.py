"""Prequential (test-then-train) validation of the learned models on MovieLens-100k.

    ~/.cache/streamrec/venv/bin/python bench/quality.py --quick   # first 30k ratings
    ~/.cache/streamrec/venv/bin/python bench/quality.py           # all 100k

Ratings are replayed in time order, ``(timestamp, user, item)``.  Each rating
is one impression of that item to that user, labelled by what the rating
stands for (:mod:`models.movielens`, the mapping the live replay emits):

* 4-5 stars: a click, then a like (``click`` = ``like`` = 1);
* 3 stars: a click and no more (``click`` = 1);
* 1-2 stars: a see_less (``see_less`` = 1), so click = 1 - see_less here;
* save, share, comment, follow, long_dwell: no signal in this dataset, so
  they are absent (masked out of training, not reported).

MovieLens has no shown-but-ignored impressions, so every metric here
measures P(label | rated), not P(label | shown) (see the dataset's SOURCE.md).

Serving-time features of each example are computed from earlier ratings only
(in replay order): the user's last 20 positives (rating >= 3), the user's
positives per "author" (a movie's first genre, as in :mod:`streams.replay`),
the item's counts so far as the item-stats agent keeps them from the replay
(every earlier rating an impression, each of its engagements counted by
:data:`models.item_state.QUALITY_KEYS`, so a good rating adds two positives)
and the item's age since its first rating.  No retrieval ran, so source scores
are empty.

The first 20% bootstraps a model (``Trainer.pretrain``).  For the remaining
80%, in mini-batches in order, three arms score each batch before anything
learns from it: the online model, a frozen copy of the bootstrapped model,
and the base rate of each head so far; then the online model takes one step
on that batch.  Prints ONE JSON object on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import log  # noqa: E402
from models.features import HEADS, MAX_RECENT, CollisionCounter, Example  # noqa: E402
from models.item_state import QUALITY_KEYS  # noqa: E402
from models.metrics import summarize  # noqa: E402
from models.movielens import RATED_HEADS, rating_engagements, rating_labels  # noqa: E402
from models.mtml import RankerConfig  # noqa: E402
from models.training import Trainer  # noqa: E402
from models.two_tower import TowerConfig  # noqa: E402
from streams.replay import find_dataset, load_authors, load_ratings  # noqa: E402

REPORTED = RATED_HEADS
ABSENT = tuple(h for h in HEADS if h not in REPORTED)
ARMS = ("online", "frozen", "base_rate")


def build_examples(ratings, authors: dict) -> list[Example]:
    """One example per rating, its features computed from earlier ratings only."""
    recent: dict[int, deque] = {}
    user_authors: dict[int, Counter] = {}
    counts: dict[int, dict] = {}
    first_ts: dict[int, int] = {}
    out = []
    for r in ratings:
        author = authors.get(r.item)
        item_counts = counts.setdefault(r.item, {"pos": 0, "imp": 0, "see_less": 0, "report": 0})
        user_recent = recent.setdefault(r.user, deque(maxlen=MAX_RECENT))
        by_author = user_authors.setdefault(r.user, Counter())
        out.append(Example(
            user_id=str(r.user), item_id=str(r.item), author_id=author, surface="explore",
            ts=float(r.ts), position=None, labels=rating_labels(r.rating),
            user_recent=[str(i) for i in user_recent], user_authors=dict(by_author),
            item_counts=dict(item_counts),
            item_age_s=float(r.ts - first_ts[r.item]) if r.item in first_ts else 0.0,
            # A user's ratings within one hour stand in for one request.
            request_id=f"{r.user}:{r.ts // 3600}"))
        first_ts.setdefault(r.item, r.ts)
        item_counts["imp"] += 1
        engagements = [QUALITY_KEYS[e] for e in rating_engagements(r.rating)]
        for key in engagements:
            item_counts[key] += 1
        if "pos" in engagements:
            if r.item in user_recent:
                user_recent.remove(r.item)
            user_recent.append(r.item)
            if author is not None:
                by_author[author] += 1
    return out


def collisions(examples: list[Example], config: TowerConfig) -> dict:
    c = CollisionCounter()
    for name, size, attr in (("user", config.hash_size, "user_id"),
                             ("item", config.hash_size, "item_id"),
                             ("author", config.author_size, "author_id")):
        for value in {getattr(ex, attr) or "" for ex in examples}:
            c.observe(name, value, size)
    return c.report()


def in_batch_hits(trainer: Trainer, examples: list[Example], k: int = 10) -> tuple[int, int, float]:
    """Retrieval sanity check of the towers: for each positive (rating >= 3), is its
    own item in the user's top ``k`` among the batch's distinct items?  Returns
    (hits, positives, hits expected from a random order)."""
    users, items = trainer.user_vectors(examples), trainer.item_vectors(examples)
    scores = users @ items.T
    ids = np.array([ex.item_id for ex in examples])
    first = {}
    for j, item in enumerate(ids):
        first.setdefault(item, j)
    distinct = np.array(sorted(first.values()))
    hits = positives = 0
    for row, ex in enumerate(examples):
        if not ex.labels["click"]:
            continue
        positives += 1
        own = scores[row, first[ex.item_id]]
        hits += int((scores[row, distinct] > own).sum() < k)
    return hits, positives, positives * min(1.0, k / len(distinct))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the first 30k ratings")
    ap.add_argument("--dataset", default=None, help="path to movielens-100k")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--pretrain-share", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=3, help="bootstrap passes over the first 20%%")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sparse-lr", type=float, default=1e-2, help="embedding tables' rate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    wall0 = time.perf_counter()

    path = find_dataset(args.dataset)
    ratings = load_ratings(path)
    if args.quick:
        ratings = ratings[:30_000]
    examples = build_examples(ratings, load_authors(path))
    n_pre = int(len(examples) * args.pretrain_share)
    log(f"{len(examples)} examples; bootstrap on {n_pre}, prequential on {len(examples) - n_pre}")

    tower_cfg, ranker_cfg = TowerConfig(), RankerConfig()
    trainer = Trainer(tower_cfg, ranker_cfg, lr=args.lr, sparse_lr=args.sparse_lr, seed=args.seed)
    t0 = time.perf_counter()
    pre_losses = trainer.pretrain(examples[:n_pre], epochs=args.epochs, batch_size=args.batch_size,
                                  progress=not args.no_progress, seed=args.seed)
    pretrain_s = time.perf_counter() - t0
    frozen = trainer.frozen_copy()

    cols = [HEADS.index(h) for h in REPORTED]
    label_sum = np.zeros(len(REPORTED))
    for ex in examples[:n_pre]:
        label_sum += [ex.labels[h] for h in REPORTED]
    seen = n_pre
    preds = {arm: [] for arm in ARMS}
    hits = {"online": np.zeros(3), "frozen": np.zeros(3)}
    labels = []
    fit_s = score_s = 0.0
    fitted = 0
    stream = examples[n_pre:]
    steps = math.ceil(len(stream) / args.batch_size)
    from tqdm import tqdm
    bar = tqdm(total=len(stream), desc="prequential", unit="ex", disable=args.no_progress)
    for step in range(steps):
        batch = stream[step * args.batch_size:(step + 1) * args.batch_size]
        y = np.array([[ex.labels[h] for h in REPORTED] for ex in batch], dtype=np.float64)
        # Test first: nobody has learned from this batch yet.
        t = time.perf_counter()
        preds["online"].append(trainer.predict(batch)[:, cols])
        score_s += time.perf_counter() - t
        preds["frozen"].append(frozen.predict(batch)[:, cols])
        preds["base_rate"].append(np.tile(label_sum / max(seen, 1), (len(batch), 1)))
        hits["online"] += in_batch_hits(trainer, batch)
        hits["frozen"] += in_batch_hits(frozen, batch)
        labels.append(y)
        # Then train.
        t = time.perf_counter()
        trainer.fit(batch)
        fit_s += time.perf_counter() - t
        fitted += len(batch)
        label_sum += y.sum(axis=0)
        seen += len(batch)
        bar.update(len(batch))
    bar.close()

    y = np.concatenate(labels)
    p = {arm: np.concatenate(v) for arm, v in preds.items()}
    heads = {}
    for j, head in enumerate(REPORTED):
        per_arm = {arm: summarize(y[:, j], p[arm][:, j]) for arm in ARMS}
        ne_on, ne_fr = per_arm["online"]["ne"], per_arm["frozen"]["ne"]
        heads[head] = {**per_arm, "online_vs_frozen_ne_reduction":
                       round((ne_fr - ne_on) / ne_fr, 4) if ne_on and ne_fr else None}
    tower = {arm: round(h[0] / h[1], 4) for arm, h in hits.items()}
    tower["random"] = round(hits["online"][2] / hits["online"][1], 4)
    result = {
        "bench": "quality",
        "dataset": "movielens-100k" + (" (first 30k ratings)" if args.quick else ""),
        "protocol": ("prequential: each mini-batch is scored by every arm, then the online "
                     "model takes one step on it; bootstrap = first "
                     f"{args.pretrain_share:.0%} of ratings in time order, {args.epochs} epochs"),
        "caveat": ("MovieLens logs only rated items (no shown-but-ignored impressions): every "
                   "metric measures P(label | rated), not P(label | shown); see SOURCE.md"),
        "labels": {"click": "rating >= 3 (so click = 1 - see_less on this data)",
                   "like": "rating >= 4", "see_less": "rating <= 2",
                   "mapping": "models.movielens.rating_engagements, as the live replay emits",
                   "item_counts": "as item_stats counts the replay: 4-5 stars add 2 positives"},
        "absent_heads": list(ABSENT),
        "arms": {"online": "bootstrapped model that keeps learning, one step per batch",
                 "frozen": "frozen copy of the bootstrapped model",
                 "base_rate": "running mean of each head's labels so far"},
        "examples": {"total": len(examples), "bootstrap": n_pre, "evaluated": int(y.shape[0])},
        "heads": heads,
        "two_tower_in_batch_hit_at_10": {
            **tower, "note": ("share of positives (rating >= 3) whose own item the towers put in "
                              "the user's top 10 among the batch's distinct items; batches are "
                              "time-ordered, so their other items are mostly other ratings of the "
                              "same few users, a hard set of negatives")},
        "throughput": {
            "online_train_examples_per_s": round(fitted / fit_s, 1),
            "bootstrap_train_examples_per_s": round(args.epochs * n_pre / pretrain_s, 1),
            "score_examples_per_s": round(fitted / score_s, 1),
            "bootstrap_s": round(pretrain_s, 1), "online_train_s": round(fit_s, 1),
        },
        "bootstrap_epoch_losses": [round(x, 4) for x in pre_losses],
        "hash_collisions": collisions(examples, tower_cfg),
        "config": {"batch_size": args.batch_size, "lr": args.lr, "sparse_lr": args.sparse_lr,
                   "threads": args.threads,
                   "seed": args.seed, "tower": tower_cfg.__dict__,
                   "ranker": {**ranker_cfg.__dict__, "hidden": list(ranker_cfg.hidden)}},
        "wall_s": round(time.perf_counter() - wall0, 1),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

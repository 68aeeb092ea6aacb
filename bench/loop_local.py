"""The closed loop in one process, without Kafka: for iterating on ranking and learning.

    ~/.cache/streamrec/venv/bin/python bench/loop_local.py                  # 780 s world
    ~/.cache/streamrec/venv/bin/python bench/loop_local.py --duration 300 --shift-at 0

bench/closed_loop.py is the benchmark whose figures count: a real broker and
worker.  This one runs the same world (:mod:`models.world`, seed, rates,
warm-up and organic sessions as :func:`streams.simulate.run`) against the
production pieces called in-process: the item-side fold and history
(bench/retrieval.py's ``LiveState``), :func:`models.funnel.recommend` with a
:class:`models.scoring.ModelScorer`, the label join's features recorded at the
impression, :class:`models.training.Trainer` stepping on every ``--train-batch``
labels once ``--label-delay`` simulated seconds have passed, and the go-live
gate (:mod:`models.gate`) at every ``--publish-every`` seconds, as
streams/trainer.py decides.  Simulated time advances by the request clock, so a
780 s world takes a few minutes whatever the machine's load.

What it leaves out: the item-embedding index (the embedding and history
sources retrieve nothing here) and the pre-generated lists.

Besides the closed-loop figures (share of oracle over time, calibration and
NE against the truth) it reports where value is lost: every ``--probe-every``
requests it ranks the user's pool of ``--probe-k`` and compares the share of
the ranked first k with the best k built from the same pool, and the rank
correlation of the model's value scores with the true values over the pool.

Prints one JSON object on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import log, run  # noqa: E402
from bench.final_list import impression_example  # noqa: E402
from bench.retrieval import LiveState, ReplayView  # noqa: E402
from models.features import Example  # noqa: E402
from models.funnel import FunnelConfig, recommend  # noqa: E402
from models.gate import GateRules, ProgressiveValidation, labels_and_mask  # noqa: E402
from models.labels import HEADS  # noqa: E402
from models.policies import POLICIES  # noqa: E402
from models.scoring import ModelScorer  # noqa: E402
from models.training import Trainer  # noqa: E402
from models.world import (ENGAGEMENT_HEADS, SURFACE, World, WorldConfig,  # noqa: E402
                          expected_values, item_id, parse_item, user_id)
from schemas.requests import RecommendationRequest  # noqa: E402
from streams.simulate import (aggregate, fired_heads, list_stats, over_time,  # noqa: E402
                              prediction_quality, probe_summary, recovery)


def rank_correlation(a, b) -> float:
    """Spearman's rho of two score vectors (ties broken by position).

    >>> rank_correlation([1, 2, 3], [10, 20, 30]), rank_correlation([1, 2, 3], [3, 2, 1])
    (1.0, -1.0)
    """
    ra = np.argsort(np.argsort(np.asarray(a, dtype=np.float64), kind="stable"))
    rb = np.argsort(np.argsort(np.asarray(b, dtype=np.float64), kind="stable"))
    if len(ra) < 2:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


class Loop:
    """The world, the system's state and its learning, stepped request by request."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        config = replace(WorldConfig(), seed=args.seed, shift_at=args.shift_at)
        self.world = World(config)
        self.rng = np.random.default_rng([config.seed, 5])
        self.p_user = self.world.activity / self.world.activity.sum()
        self.state = LiveState(half_life_s=3600.0, batch=10 ** 9,
                               author_half_life_s=args.user_author_half_life)
        self.view = ReplayView(self.state, {}, None)
        self.trainer = (Trainer(lr=args.lr, sparse_lr=args.sparse_lr)
                        if not args.no_training else None)
        self.buffer: deque = deque(maxlen=args.replay_buffer)
        self.scorer = None
        self.made_live = None
        self.window = ProgressiveValidation(None)
        self.rules = GateRules()
        self.funnel = FunnelConfig(explore_share=args.explore_share)
        self.replay_rng = np.random.default_rng(1)
        self.pending_examples: deque = deque()   # (ready at, Example)
        self.ready: list[Example] = []
        self.records, self.outcomes, self.probes, self.correlations = [], [], [], []
        self.predictions, self.truth, self.fired = [], {}, {}
        self.versions: list[dict] = []
        self.counts = {"examples": 0, "steps": 0, "published": 0, "live": 0}

    # -- the system ---------------------------------------------------------

    def _apply(self, events) -> None:
        for ev in events:
            self.state.apply(ev)

    def _examples(self, events, served_scores: dict, t: float) -> None:
        """The label join: features as of the impression (call before the events
        apply), labels from what followed."""
        heads = fired_heads(events)
        for ev in events:
            if ev.event_type != "impression":
                continue
            fired = heads.get((ev.request_id, ev.item_id), [])
            self.pending_examples.append((t + self.args.label_delay, impression_example(
                self.state, self.view, ev, ev.item_id, {h: int(h in fired) for h in HEADS},
                ev.position, request_id=ev.request_id,
                source_scores=served_scores.get(ev.item_id))))

    def _learn(self, t: float) -> None:
        while self.pending_examples and self.pending_examples[0][0] <= t:
            self.ready.append(self.pending_examples.popleft()[1])
        if self.trainer is None or len(self.ready) < self.args.train_batch:
            return
        batch, self.ready = self.ready, []
        labels, mask = labels_and_mask([e.labels for e in batch])
        live = self.scorer.trainer.predict(batch) if self.scorer is not None else None
        self.window.add(labels, mask, self.trainer.predict(batch), live)
        for s in range(0, len(batch), self.args.train_batch):
            self.trainer.fit(batch[s:s + self.args.train_batch])
            self.counts["steps"] += 1
        if self.args.replay:
            self.buffer.extend(batch)
        for _ in range(int(self.args.replay * len(batch) / self.args.train_batch)):
            picks = self.replay_rng.integers(len(self.buffer), size=self.args.train_batch)
            self.trainer.fit([self.buffer[i] for i in picks])
            self.counts["steps"] += 1
        self.counts["examples"] += len(batch)

    def _publish(self, t: float) -> None:
        if self.trainer is None:
            return
        descendant = (self.window.live_version is not None
                      and self.window.live_version == self.made_live)
        decision = self.window.decide(self.rules, descendant=descendant)
        version = f"v{self.counts['published']:04d}"
        self.counts["published"] += 1
        self.versions.append({"t": t, "version": version, "state": decision.state,
                              "reason": decision.reason})
        if decision.go_live:
            self.scorer = ModelScorer(self.trainer.frozen_copy(), "ranker", version)
            self.made_live = version
            self.counts["live"] += 1
        if decision.decided:
            self.window = ProgressiveValidation(self.made_live)

    def _recommend(self, user: int, k: int, request_id: str, t: float):
        req = RecommendationRequest(request_id, user_id(user), SURFACE, k,
                                    deadline=float("inf"))
        self.view.now = self.world.config.epoch + t
        predictions: list = []
        reply = recommend(req, self.state.history(user_id(user)), self.view,
                          clock=lambda: self.world.config.epoch + t, config=self.funnel,
                          scorer=self.scorer, predictions=predictions)
        return reply, predictions

    # -- the loop -----------------------------------------------------------

    def session(self, request_id: str, t: float) -> None:
        """An organic session: random catalogue items (as streams/simulate.py)."""
        user = int(self.rng.choice(len(self.p_user), p=self.p_user))
        cands = self.world.candidates(user, t)
        items = (self.rng.choice(cands, size=min(self.args.k, len(cands)), replace=False).tolist()
                 if len(cands) else [])
        events = self.world.events_for(user, items, request_id, t)
        self._examples(events, {}, t)
        self._apply(events)

    def request(self, n: int, t: float) -> None:
        k, world = self.args.k, self.world
        user = int(self.rng.choice(len(self.p_user), p=self.p_user))
        self.state.flush()
        request_id = f"r{n}"
        reply, predictions = self._recommend(user, k, request_id, t)
        served = [i for i in (parse_item(r.item_id) for r in reply.items) if i is not None]
        cands = world.candidates(user, t)
        stats = {"system": list_stats(world, user, served, t)}
        for name, policy in POLICIES.items():
            stats[name] = list_stats(world, user, policy(world, user, cands, k, t), t)
        self.records.append({"t": t, "stats": stats,
                             "ranker": self.scorer.version if self.scorer else ""})
        self.outcomes.append((t, "answered" if served else "empty"))
        if self.args.probe_every and n % self.args.probe_every == 0:
            self.probe(user, t, cands)
        events = world.events_for(user, served, request_id, t)
        if served:
            probs = world.probability_matrix(user, served, np.arange(len(served)), t)
            for item, row in zip(served, probs):
                self.truth[(request_id, item_id(item))] = dict(zip(ENGAGEMENT_HEADS, row.tolist()))
            self.fired.update(fired_heads(events))
            if predictions:
                self.predictions.append({"request_id": request_id, "t": t, "heads": list(HEADS),
                                         "model": self.scorer.version, "items": predictions})
        self._examples(events, {r.item_id: r.source_scores for r in reply.items}, t)
        self._apply(events)

    def probe(self, user: int, t: float, cands) -> None:
        reply, _ = self._recommend(user, self.args.probe_k, f"probe-{len(self.probes)}", t)
        pool = [i for i in (parse_item(r.item_id) for r in reply.items) if i is not None]
        unseen = np.intersect1d(np.array(pool, dtype=np.int64), cands)
        k, world = self.args.k, self.world
        if len(unseen) < k:
            return
        value = {name: list_stats(world, user, POLICIES[name](world, user, cands, k, t),
                                  t)["value"] for name in ("random", "oracle")}
        self.probes.append({"t": t, "pool": len(pool), **value,
                            "ranked": list_stats(world, user, pool[:k], t)["value"],
                            "pool_best": list_stats(world, user, POLICIES["oracle"](
                                world, user, unseen, k, t), t)["value"]})
        if self.scorer is not None:
            true = expected_values(world.probability_matrix(user, pool, np.zeros(len(pool)), t))
            scores = [r.score for r in reply.items if parse_item(r.item_id) is not None]
            self.correlations.append((t, rank_correlation(scores, true)))

    def run(self) -> dict:
        a = self.args
        for n in range(2 * self.world.config.n_users):
            self.session(f"warm-{n}", 0.0)
        total = int(a.rate * a.duration)
        next_organic, n_organic, next_publish = 0.0, 0, a.publish_every
        started = time.monotonic()
        for n in range(total):
            t = n / a.rate
            self.world.step(t)
            while next_organic <= t:
                self.session(f"organic-{n_organic}", next_organic)
                n_organic += 1
                next_organic += 4.0 / a.rate
            self._learn(t)
            if t >= next_publish:
                self._publish(t)
                next_publish += a.publish_every
            self.request(n, t)
            if a.progress and n % 500 == 0 and n:
                share = aggregate(self.records[-500:])["share_of_oracle"]
                log(f"t={t:5.0f}s share(last 500)={share} live={self.scorer and self.scorer.version} "
                    f"steps={self.counts['steps']} ({time.monotonic() - started:.0f} s)")
        return self.summary()

    def summary(self) -> dict:
        a = self.args
        width = a.interval
        series = over_time(self.records, width, a.duration, self.outcomes)
        before = [r for r in self.records
                  if a.shift_at is not None and a.shift_at - 60 <= r["t"] < a.shift_at]
        late = [r for r in self.records if r["t"] >= a.quality_from]
        corr = [c for t, c in self.correlations if t >= a.quality_from and np.isfinite(c)]
        quality = prediction_quality([m for m in self.predictions if m["t"] >= a.quality_from],
                                     self.truth, self.fired)
        whole = aggregate(self.records)
        return {
            "settings": {k: v for k, v in vars(a).items() if k != "progress"},
            "share_of_oracle": whole["share_of_oracle"],
            "share_from": aggregate(late)["share_of_oracle"] if late else None,
            "share_minute_before_shift": aggregate(before)["share_of_oracle"] if before else None,
            "policies": whole["policies"],
            "never_below_popularity_from_180s": all(
                s["value_per_request"]["system"] >= s["value_per_request"]["popularity"]
                for s in series if s["t"] >= 180 and s["requests"]),
            "adaptation": recovery(series, a.shift_at, width),
            "probes": probe_summary(self.probes, a.quality_from),
            "value_rank_correlation": round(float(np.mean(corr)), 4) if corr else None,
            "prediction_quality_from": {h: {k: v[k] for k in ("calibration", "ne", "positives")}
                                        for h, v in quality.get("heads", {}).items()},
            "counts": self.counts,
            "live_versions": [v for v in self.versions if v["state"] == "live"][:3]
            + [{"live_total": self.counts["live"], "published": self.counts["published"]}],
            "over_time": [[s["t"], s["share_of_oracle"]] for s in series],
        }


def main(args: argparse.Namespace) -> dict:
    if args.seed_torch is not None:
        import torch
        torch.manual_seed(args.seed_torch)
    return Loop(args).run()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seed-torch", type=int, default=0)
    ap.add_argument("--rate", type=float, default=10.0, help="requests per simulated second")
    ap.add_argument("--duration", type=float, default=780.0, help="simulated seconds")
    ap.add_argument("--shift-at", type=float, default=600.0)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--interval", type=float, default=60.0, help="seconds per reported interval")
    ap.add_argument("--label-delay", type=float, default=20.0,
                    help="simulated seconds from an impression to its labelled example")
    ap.add_argument("--train-batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sparse-lr", type=float, default=1e-2)
    ap.add_argument("--replay", type=float, default=0.0,
                    help="extra steps per fresh batch, on batches drawn from recent examples")
    ap.add_argument("--replay-buffer", type=int, default=20000)
    ap.add_argument("--publish-every", type=float, default=15.0)
    ap.add_argument("--user-author-half-life", type=float, default=240.0,
                    help="half-life of users' per-author counts (bench/closed_loop.py's default)")
    ap.add_argument("--explore-share", type=float, default=FunnelConfig().explore_share)
    ap.add_argument("--no-training", action="store_true", help="blend-only ranking")
    ap.add_argument("--probe-every", type=int, default=5)
    ap.add_argument("--probe-k", type=int, default=200)
    ap.add_argument("--quality-from", type=float, default=180.0)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap


if __name__ == "__main__":
    run(main, parser())

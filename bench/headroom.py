"""How much of the oracle's value is within reach, and of whom, in the simulated world.

    ~/.cache/streamrec/venv/bin/python bench/headroom.py                 # seed 0, 10 minutes
    ~/.cache/streamrec/venv/bin/python bench/headroom.py --minutes 6 --dim 8

The closed loop (bench/closed_loop.py) says how close the system gets to the
oracle; this bench says how close anything *could* get with what it knows.
No Kafka: the world alone, at t = the end of ``--minutes`` of traffic.

1. Rankers that are told part of the truth, each choosing 10 of the user's
   unseen live items by one score: the true click probability, the true
   user-item affinity, the user's affinity to the item's author (what a
   perfect per-author model could know), item quality (what pooled
   popularity can know), and random.
2. What the data allows: random 10-item sessions at ``--rate`` per second
   for ``--minutes`` (no feedback loop: every item has the same chance), then
   a logistic matrix factorisation fitted to convergence on the clicks
   (user and item biases, user . (item + author) embeddings, a position
   term), ranking by its score.  It sees each impression many times, which
   an online learner cannot: an upper bound on learning from that much
   traffic, not a model to deploy.

Share of oracle = (policy - random) / (oracle - random) per user, averaged
over users with at least 20 unseen items; values are true expected values
under the explore surface's value weights.  Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.world import ENGAGEMENT_HEADS, World, WorldConfig, _unit  # noqa: E402


def shares(world: World, t: float, scorers: dict, k: int = 10) -> dict:
    """Mean share of oracle per scorer; ``scorers`` map name -> f(user, items) -> scores."""
    weights = np.array([world.weights.get(h, 0.0) for h in ENGAGEMENT_HEADS])
    out: dict = {name: [] for name in scorers}
    for user in range(world.config.n_users):
        items = world.candidates(user, t)
        if len(items) < 2 * k:
            continue
        value = world.probability_matrix(user, items, np.zeros(len(items)), t) @ weights
        best, base = np.sort(value)[::-1][:k].sum(), value.mean() * k
        for name, scorer in scorers.items():
            top = np.argsort(-np.asarray(scorer(user, items), dtype=float), kind="stable")[:k]
            out[name].append((value[top].sum() - base) / (best - base))
    return {name: round(float(np.mean(v)), 3) for name, v in out.items()}


def random_traffic(world: World, minutes: float, rate: float, k: int, rng) -> tuple:
    """(users, items, positions, clicks) of random sessions; marks items seen."""
    users, items, clicks = [], [], []
    p_user = world.activity / world.activity.sum()
    for n in range(int(minutes * 60 * rate)):
        t = n / rate
        world.step(t)
        user = int(rng.choice(len(p_user), p=p_user))
        cands = world.candidates(user, t)
        if len(cands) < k:
            continue
        shown = rng.choice(cands, k, replace=False)
        click = world.probability_matrix(user, shown, np.arange(k), t)[:, 0]
        clicks.extend((rng.random(k) < click).tolist())
        world.seen[user].update(shown.tolist())
        users.extend([user] * k)
        items.extend(shown.tolist())
    positions = np.tile(np.arange(k), len(users) // k)
    return np.array(users), np.array(items), positions, np.array(clicks, dtype=np.float32)


def fit_mf(world: World, users, items, positions, clicks, dim: int, l2: float, epochs: int):
    """Full-batch logistic MF; returns f(user, items) -> scores at the top position."""
    import torch
    torch.manual_seed(0)
    n_users, n_items = world.config.n_users, world.n_items
    author = torch.tensor(world.item_author)
    u, i = torch.tensor(users), torch.tensor(items)
    y, pos = torch.tensor(clicks), torch.log1p(torch.tensor(positions, dtype=torch.float32))
    p = {name: torch.nn.Parameter(torch.randn(*shape) * 0.05) for name, shape in (
        ("user", (n_users, dim)), ("item", (n_items, dim)), ("author", (world.config.n_authors, dim)))}
    p.update({name: torch.nn.Parameter(torch.zeros(n)) for name, n in (
        ("user_bias", n_users), ("item_bias", n_items), ("position", 1), ("bias", 1))})
    opt = torch.optim.Adam(p.values(), lr=0.03)

    def score(uu, ii):
        return (p["bias"] + p["user_bias"][uu] + p["item_bias"][ii]
                + (p["user"][uu] * (p["item"][ii] + p["author"][author[ii]])).sum(-1))
    for _ in range(epochs):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            score(u, i) + p["position"] * pos, y)
        loss = loss + l2 * sum(p[n].pow(2).sum() for n in ("user", "item", "author"))
        opt.zero_grad()
        loss.backward()
        opt.step()

    def scorer(user, cand):
        with torch.no_grad():
            return score(torch.full((len(cand),), user), torch.tensor(cand)).numpy()
    return scorer, float(loss.detach())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=12.5,
                    help="random sessions per second (the loop's requests plus organic sessions)")
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--l2", type=float, default=3e-5)
    ap.add_argument("--epochs", type=int, default=300)
    args = ap.parse_args(argv)
    world = World(WorldConfig(seed=args.seed))
    rng = np.random.default_rng([args.seed, 9])
    traffic = random_traffic(world, args.minutes, args.rate, 10, rng)
    t = world.t
    mf, loss = fit_mf(world, *traffic, dim=args.dim, l2=args.l2, epochs=args.epochs)

    def interest(user):
        return world.interest_at(user, t)
    told = {
        "true_click": lambda u, c: world.probability_matrix(u, c, np.zeros(len(c)), t)[:, 0],
        "true_item_affinity": lambda u, c: world.item_topics[c] @ interest(u),
        "true_author_affinity": lambda u, c: _unit(world.author_topics[world.item_author[c]]) @ interest(u),
        "true_item_quality": lambda u, c: world.item_quality[c],
        "random": lambda u, c: rng.random(len(c)),
        f"mf_on_{args.minutes:g}_min_of_random_traffic": mf,
    }
    result = {"bench": "headroom", "seed": args.seed, "at_simulated_s": t,
              "random_traffic": {"impressions": int(len(traffic[3])),
                                 "clicks": int(traffic[3].sum()),
                                 "click_rate": round(float(traffic[3].mean()), 4),
                                 "per_user_clicks": round(float(traffic[3].sum()) / world.config.n_users, 1)},
              "mf": {"dim": args.dim, "l2": args.l2, "epochs": args.epochs, "final_loss": round(loss, 4)},
              "share_of_oracle": shares(world, t, told)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

"""Bytes per published model version: full float16 snapshots against deltas.

    flock /tmp/streamrec-bench.lock ~/.cache/streamrec/venv/bin/python bench/weights.py

The default model (two-tower and multi-task ranker, 2**16-row tables) trains on
synthetic labelled examples, ``--examples`` between publishes (the trainer's
mini-batches of ``--batch``), for ``--versions`` versions.  Each version is encoded
the way the online trainer publishes it (:class:`stores.model_store.WeightDeltas`: a
full snapshot every ``--full-every``-th, deltas on it between) and, in the same run,
as the full snapshot it was before deltas (:func:`stores.model_store.serving_bytes`).
Every delta is rebuilt the way a worker does (on the model it loaded from the base's
snapshot) and checked to score a batch exactly as the full snapshot does.

No broker: the figures are the bytes a publish writes to ``models.weights`` (chunk
payloads; the manifest and Kafka's framing add well under 1 KB a version).  Prints
one JSON object; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import log, run  # noqa: E402


def examples(rng: random.Random, n: int, users: int, items: int, authors: int):
    """Labelled impressions: users uniform, items skewed towards popular ones (as served
    traffic is), each with the user's recent positives."""
    from models.features import Example
    out = []
    for _ in range(n):
        user = rng.randrange(users)
        item = min(int(rng.paretovariate(1.2)) - 1, items - 1)
        like = rng.random() < 0.1
        out.append(Example(
            f"u{user}", f"i{item}", f"a{item % authors}", "explore", time.time(),
            labels={"click": int(like or rng.random() < 0.1), "like": int(like),
                    "see_less": int(rng.random() < 0.02)},
            user_recent=[f"i{min(int(rng.paretovariate(1.2)) - 1, items - 1)}"
                         for _ in range(5)],
            item_counts={"pos": rng.randrange(50), "imp": rng.randrange(50, 500)},
            source_scores={"trending": rng.random()}, request_id=f"r{user}-{rng.random()}",
            position=rng.randrange(10)))
    return out


def main(args) -> dict:
    import numpy as np
    import torch

    from models import weight_delta
    from models.training import Trainer
    from stores import model_store
    torch.set_num_threads(1)  # as the worker's trainer runs
    rng = random.Random(args.seed)
    trainer = Trainer(seed=args.seed)
    deltas = model_store.WeightDeltas(args.full_every)
    probe = examples(random.Random(args.seed + 1), 200, args.users, args.items, args.authors)
    published, loaded, versions = {}, {}, []
    for n in range(1, args.versions + 1):
        for start in range(0, args.examples, args.batch):
            trainer.fit(examples(rng, min(args.batch, args.examples - start), args.users,
                                 args.items, args.authors))
        version = f"v{n:03d}"
        full = model_store.serving_bytes(trainer)
        t0 = time.perf_counter()
        payload, fields = deltas.encode(version, full, published)
        encode_s = time.perf_counter() - t0
        published[version] = {**model_store.manifest_for(payload, 1), **fields}
        row = {"version": version, "kind": fields["kind"], "full_bytes": len(full),
               "published_bytes": len(payload), "encode_s": round(encode_s, 3)}
        t0 = time.perf_counter()
        if fields["kind"] == "full":
            loaded[version] = model_store.trainer_from_bytes(full)
        else:
            base = model_store.serving_state(loaded[fields["base"]])
            state = model_store.rebuild(base, payload, published[version])
            loaded[version] = model_store.trainer_from_state(state)
            body = model_store._load(payload)
            row.update(weight_delta.sent_bytes(body["delta"]))
            row["rows_sent_per_table"] = {k: len(v["index"])
                                          for k, v in body["delta"]["rows"].items()}
        row["load_s"] = round(time.perf_counter() - t0, 3)
        # Served exactly as the full snapshot would be: the same scores, bit for bit.
        row["scores_equal_full"] = bool(np.array_equal(
            loaded[version].predict(probe), model_store.trainer_from_bytes(full).predict(probe)))
        log(f"{version}: {row['kind']} {row['published_bytes']:,} bytes "
            f"(full {row['full_bytes']:,})")
        versions.append(row)
    fulls = [v for v in versions if v["kind"] == "full"]
    delta_rows = [v for v in versions if v["kind"] == "delta"]
    sent = sum(v["published_bytes"] for v in versions)
    all_full = sum(v["full_bytes"] for v in versions)
    return {
        "bench": "weights", "versions": args.versions, "full_every": args.full_every,
        "examples_per_version": args.examples, "users": args.users, "items": args.items,
        "full_snapshot_bytes": round(sum(v["full_bytes"] for v in versions) / len(versions)),
        "delta_bytes_mean": round(sum(v["published_bytes"] for v in delta_rows)
                                  / len(delta_rows)) if delta_rows else None,
        "delta_bytes_max": max((v["published_bytes"] for v in delta_rows), default=None),
        "bytes_per_publish_full_only": round(all_full / len(versions)),
        "bytes_per_publish_with_deltas": round(sent / len(versions)),
        "ratio": round(sent / all_full, 4),
        "full_snapshots": len(fulls),
        "all_scores_equal_full": all(v["scores_equal_full"] for v in versions),
        "per_version": versions,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="bench/weights.py", description=__doc__.split("\n")[0])
    ap.add_argument("--versions", type=int, default=20)
    ap.add_argument("--full-every", type=int, default=10)
    ap.add_argument("--examples", type=int, default=3000,
                    help="labelled examples trained on between two publishes")
    ap.add_argument("--batch", type=int, default=256, help="the trainer's mini-batch")
    ap.add_argument("--users", type=int, default=20000)
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--authors", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    sys.exit(run(main, ap))

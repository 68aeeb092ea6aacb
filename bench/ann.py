"""ANN index (hnswlib via stores.ann.AnnIndex) against brute-force numpy.

    ~/.cache/streamrec/venv/bin/python bench/ann.py --quick      # 10k random + MovieLens
    ~/.cache/streamrec/venv/bin/python bench/ann.py              # 100k and 1M random + MovieLens

Datasets:

* ``random-N``: N unit-normalised standard-normal vectors (``--dim``, float32),
  queries are ``--queries`` further unit vectors from the same distribution;
* ``movielens-100k-svd``: item vectors from a truncated SVD (dim 32) of the
  user x item matrix of ratings >= 4, queries are the users' SVD vectors.
  Only 1682 items: recall there says little about a large catalogue.

For each: build time (M=16, ef_construction=200, ``--threads`` build threads),
then queries/s and recall@k (k=100) at each ef, against brute force (matrix
product + argpartition, one query at a time) measured in the same run, whose
answers are the exact top-k.  Queries go through ``AnnIndex.query`` one vector
at a time (string ids, lock, result list included), on one thread by default,
and numpy is pinned to one BLAS thread, so both sides use one core.

Prints one JSON object on stdout; progress goes to stderr.
"""
from __future__ import annotations

import os

# One BLAS thread for the brute force, so it runs on one core like the
# single-threaded ANN queries; must be set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import hnswlib  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import log  # noqa: E402
from stores.ann import AnnIndex  # noqa: E402

DEFAULT_MOVIELENS = ROOT.parent / "shared" / "datasets" / "movielens-100k"
CHUNK = 100_000  # items per upsert, so progress shows during a long build


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------

def unit_normal(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def movielens_svd(folder: Path, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(item vectors, user vectors) whose inner products approximate "rated >= 4"."""
    rows = np.loadtxt(folder / "u.data", dtype=np.int64, delimiter="\t")
    users, items, ratings = rows[:, 0] - 1, rows[:, 1] - 1, rows[:, 2]
    liked = np.zeros((users.max() + 1, items.max() + 1), dtype=np.float64)
    keep = ratings >= 4
    liked[users[keep], items[keep]] = 1.0
    u, s, vt = np.linalg.svd(liked, full_matrices=False)
    # Split the singular values evenly so user . item reconstructs the matrix.
    root = np.sqrt(s[:dim])
    item_vectors = (vt[:dim].T * root).astype(np.float32)
    user_vectors = (u[:, :dim] * root).astype(np.float32)
    return item_vectors, user_vectors


# --------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------

def brute_force(items: np.ndarray, queries: np.ndarray, k: int) -> tuple[float, list]:
    """(queries/s, exact top-k index arrays, best first), one query at a time."""
    exact = []
    started = time.perf_counter()
    for q in queries:
        scores = items @ q
        best = np.argpartition(-scores, k - 1)[:k]
        exact.append(best[np.argsort(-scores[best])])
    return len(queries) / (time.perf_counter() - started), exact


def ann_queries(index: AnnIndex, queries: np.ndarray, k: int, threads: int) -> tuple[float, list]:
    started = time.perf_counter()
    if threads == 1:
        results = [index.query(q, k) for q in queries]
    else:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(lambda q: index.query(q, k), queries))
    return len(queries) / (time.perf_counter() - started), results


def recall(results: list, exact: list, k: int) -> float:
    hits = 0
    for got, truth in zip(results, exact):
        hits += len({int(item) for item, _ in got} & set(truth.tolist()))
    return hits / (k * len(exact))


def measure(name: str, items: np.ndarray, queries: np.ndarray, args, note: str = "") -> dict:
    n, dim = items.shape
    k = min(args.k, n)
    log(f"{name}: {n} x {dim}, {len(queries)} queries")
    index = AnnIndex(dim, space="ip", max_elements=n, M=args.M,
                     ef_construction=args.ef_construction)
    ids = [str(i) for i in range(n)]
    started = time.perf_counter()
    for start in range(0, n, CHUNK):
        index.upsert(ids[start:start + CHUNK], items[start:start + CHUNK],
                     num_threads=args.build_threads)
        if n > CHUNK:
            log(f"  built {min(n, start + CHUNK)}/{n} in {time.perf_counter() - started:.1f}s")
    build_s = time.perf_counter() - started
    log(f"  build {build_s:.1f}s; brute force")
    bf_qps, exact = brute_force(items, queries, k)
    log(f"  brute force {bf_qps:.0f} q/s")
    sweep = []
    for ef in args.ef:
        index.set_ef(ef)
        qps, results = ann_queries(index, queries, k, args.query_threads)
        r = recall(results, exact, k)
        log(f"  ef={ef}: {qps:.0f} q/s, recall@{k} {r:.4f}")
        sweep.append({"ef": ef, "queries_per_s": round(qps, 1), f"recall_at_{k}": round(r, 4),
                      "speedup_vs_brute_force": round(qps / bf_qps, 2)})
    out = {"name": name, "items": n, "dim": dim, "queries": len(queries), "k": k,
           "build_s": round(build_s, 2), "build_items_per_s": round(n / build_s, 1),
           "brute_force_queries_per_s": round(bf_qps, 1), "ann": sweep}
    if note:
        out["note"] = note
    return out


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,1000000",
                    help="random catalogue sizes, comma separated")
    ap.add_argument("--dim", type=int, default=64, help="dimension of the random vectors")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--ef", default="100,200,400", help="query-time ef values")
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--threads", default="2,1",
                    help="BUILD[,QUERY]: hnswlib threads for the build, query threads "
                         "(default 2,1: queries on one thread like the one-thread numpy)")
    ap.add_argument("--movielens", type=Path, default=DEFAULT_MOVIELENS,
                    help="MovieLens-100k folder ('' to skip)")
    ap.add_argument("--quick", action="store_true", help="10k random vectors only, plus MovieLens")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.sizes = [10_000] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    args.ef = [int(e) for e in args.ef.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    args.build_threads = threads[0]
    args.query_threads = threads[1] if len(threads) > 1 else 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    datasets = []
    for n in args.sizes:
        items = unit_normal(rng, n, args.dim)
        queries = unit_normal(rng, args.queries, args.dim)
        datasets.append(measure(f"random-{n}", items, queries, args,
                                note="unit-normalised standard normal; queries independent"))
        del items
    if str(args.movielens) and (args.movielens / "u.data").is_file():
        items, users = movielens_svd(args.movielens)
        if args.queries < len(users):
            users = users[rng.choice(len(users), args.queries, replace=False)]
        datasets.append(measure(
            "movielens-100k-svd", items, users, args,
            note=f"only {len(items)} items: small, near-exhaustive search; "
                 "queries are all users' SVD vectors (not normalised, inner product)"))
    else:
        log(f"MovieLens not found at {args.movielens}; skipped")
        datasets.append({"name": "movielens-100k-svd", "skipped": f"no u.data in {args.movielens}"})
    return {
        "bench": "ann",
        "settings": {
            "space": "ip", "M": args.M, "ef_construction": args.ef_construction,
            "k": args.k, "ef": args.ef, "seed": args.seed,
            "build_threads": args.build_threads, "query_threads": args.query_threads,
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
            "fairness": "ANN queries one at a time through AnnIndex.query (string ids, "
                        "lock, Python result list) on query_threads threads; brute force "
                        "one query at a time (matrix-vector product + argpartition + sort "
                        "of the top k) with blas_threads BLAS threads",
        },
        "machine": {"cpus": os.cpu_count(), "numpy": np.__version__,
                    "hnswlib": getattr(hnswlib, "__version__", "0.8.0 (pinned)"),
                    "python": sys.version.split()[0]},
        "datasets": datasets,
    }


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)

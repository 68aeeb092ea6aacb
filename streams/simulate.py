"""Closed-loop simulation: simulated users ask the real system and react to it.

Users of a :class:`models.world.World` send recommendation requests over the
real request/reply topics, see what comes back, and produce impression and
engagement events drawn from the world's TRUE probabilities into ``events``:
the system learns from the consequences of its own recommendations.

For every answered request the same user, at the same moment, is also served
by the reference policies (random, popularity, oracle) without Kafka, and every
list is scored by its true expected value, so the summary says how close the
system gets to the physical limit:

    share of oracle = (system - random) / (oracle - random)

The reference policies keep the system's hard rules (no objectionable item, no
two items of one author in a row, ``k`` items) and fill every request's ``k``
slots, so a short or empty reply costs the system what it did not show.

It also joins the ``predictions`` topic (when a model is live) with the true
probabilities recorded at serving time (calibration, normalized entropy), times
the recovery after the sudden interest shift, and counts objectionable items
and same-author neighbours served.

Each run tags its world (ids ``sim-<tag>-u5``, ``sim-<tag>-i12``) and every
request names that namespace in its context, so the funnel serves only this
run's items: on a worker that also serves MovieLens, or that served an
earlier run, nothing foreign fills the lists.

>>> share_of_oracle(system=3.0, random=1.0, oracle=5.0)
0.5
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import uuid
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import orjson

from models.metrics import calibration, normalized_entropy
from models.policies import POLICIES, served_value
from models.features import LONG_DWELL_MS
from models.world import (ENGAGEMENT_HEADS, POSITIVE_HEADS, SURFACE, World, WorldConfig,
                          item_id, namespace, parse_item, user_id)

#: Names in the summary: the system first, then the reference policies.
NAMES = ("system",) + tuple(POLICIES)
#: After the shift the system has recovered when its share of oracle is back within
#: this fraction of its share before the shift.
RECOVERY_TOLERANCE = 0.1
#: The share "before the shift" is the mean over the windows of this many seconds before
#: it: the system is still learning, so the start of the run says little about its level.
RECOVERY_BASELINE_S = 120.0


def share_of_oracle(system: float, random: float, oracle: float) -> Optional[float]:
    """Where the system sits between random (0) and the oracle (1); None when the
    oracle is no better than random (nothing to share).

    >>> share_of_oracle(1.0, 1.0, 1.0) is None
    True
    """
    gap = oracle - random
    if not gap > 1e-12:
        return None
    return (system - random) / gap


def same_author_pairs(authors: Sequence) -> tuple[int, int]:
    """(consecutive pairs by one author, consecutive pairs) of a served list.

    >>> same_author_pairs([1, 1, 2, 1])
    (1, 3)
    """
    pairs = max(len(authors) - 1, 0)
    return sum(a == b for a, b in zip(authors, authors[1:])), pairs


def list_stats(world: World, user: int, items: Sequence[int], t: float) -> dict:
    """True value, expected positives, impressions and integrity counts of one list."""
    value, engagement = served_value(world, user, items, t)
    same, pairs = same_author_pairs([int(world.item_author[i]) for i in items])
    return {"value": value, "engagement": engagement, "impressions": len(items),
            "objectionable": int(sum(world.item_objectionable[i] for i in items)),
            "same_author": same, "pairs": pairs}


def aggregate(records: Sequence[dict]) -> dict:
    """Per policy: value per request, expected engagement per impression, share of
    objectionable items and of same-author consecutive pairs; plus the share of oracle.

    >>> r = {n: {"value": v, "engagement": 1.0, "impressions": 2, "objectionable": 0,
    ...          "same_author": 0, "pairs": 1} for n, v in zip(NAMES, (2, 1, 1.5, 5))}
    >>> aggregate([{"stats": r}])["share_of_oracle"]
    0.25
    """
    out: dict = {"requests": len(records), "policies": {}}
    for name in NAMES:
        rows = [r["stats"][name] for r in records]
        total = {key: sum(row[key] for row in rows) for key in
                 ("value", "engagement", "impressions", "objectionable", "same_author", "pairs")}
        out["policies"][name] = {
            "value_per_request": _ratio(total["value"], len(rows)),
            "engagement_per_impression": _ratio(total["engagement"], total["impressions"]),
            "objectionable_share": _ratio(total["objectionable"], total["impressions"]),
            "same_author_pair_share": _ratio(total["same_author"], total["pairs"]),
        }
    v = {n: out["policies"][n]["value_per_request"] for n in NAMES}
    out["share_of_oracle"] = (None if None in v.values() else
                              _round(share_of_oracle(v["system"], v["random"], v["oracle"])))
    return out


def probe_summary(probes: Sequence[dict], from_s: float = 0.0) -> dict:
    """Where the funnel loses value, from probe requests sent from ``from_s`` on.

    A probe asks for the user's whole ranked pool (many items, no impressions
    sent).  ``share_ranked`` is the share of oracle of the pool's first k (what
    the ranking chose), ``share_pool_best`` of the best k lists built from the
    pool alone (what retrieval allowed); the oracle chooses from every unseen item.

    >>> p = {"t": 5.0, "pool": 100, "ranked": 3.0, "pool_best": 5.0, "random": 1.0, "oracle": 9.0}
    >>> probe_summary([p])
    {'probes': 1, 'from_s': 0.0, 'pool_mean': 100.0, 'share_ranked': 0.25, 'share_pool_best': 0.5}
    """
    rows = [p for p in probes if p["t"] >= from_s]
    out: dict = {"probes": len(rows), "from_s": from_s}
    if not rows:
        return out
    mean = {key: float(np.mean([p[key] for p in rows]))
            for key in ("pool", "ranked", "pool_best", "random", "oracle")}
    out["pool_mean"] = _round(mean["pool"])
    for name in ("ranked", "pool_best"):
        out[f"share_{name}"] = _round(share_of_oracle(mean[name], mean["random"], mean["oracle"]))
    return out


def over_time(records: Sequence[dict], width: float, end: float,
              outcomes: Sequence[tuple] = ()) -> list[dict]:
    """:func:`aggregate` per window of ``width`` simulated seconds, by the time the
    request was sent, for every window from 0 to ``end``: a window where nothing
    was answered is still there (``requests`` 0), so the series covers the run.

    ``outcomes`` are ``(t, outcome)`` of every request sent (answered, timeout,
    error, empty): each window counts them.

    >>> rows = over_time([], 10.0, 30.0, [(1.0, "timeout"), (25.0, "answered")])
    >>> [(r["t"], r["sent"], r["outcomes"]) for r in rows]
    [(0.0, 1, {'timeout': 1}), (10.0, 0, {}), (20.0, 1, {'answered': 1})]
    """
    n = max(1, math.ceil(end / width - 1e-9))
    buckets: list[list] = [[] for _ in range(n)]
    counted: list[dict] = [{} for _ in range(n)]
    for r in records:
        buckets[min(int(r["t"] // width), n - 1)].append(r)
    for t, outcome in outcomes:
        c = counted[min(int(t // width), n - 1)]
        c[outcome] = c.get(outcome, 0) + 1
    rows = []
    for b in range(n):
        agg = aggregate(buckets[b])
        rows.append({"t": round(b * width, 3), "sent": sum(counted[b].values()),
                     "outcomes": counted[b], "requests": agg["requests"],
                     "share_of_oracle": agg["share_of_oracle"],
                     "value_per_request": {n: p["value_per_request"] for n, p in agg["policies"].items()},
                     "engagement_per_impression": {n: p["engagement_per_impression"]
                                                   for n, p in agg["policies"].items()}})
    return rows


def version_timeline(records: Sequence[dict]) -> list[dict]:
    """Which ranker served, as spans of consecutive requests (by send time) with one
    version, each with its share of oracle.

    >>> r = {n: {"value": v, "engagement": 0.0, "impressions": 1, "objectionable": 0,
    ...          "same_author": 0, "pairs": 0} for n, v in zip(NAMES, (1, 0, 0, 2))}
    >>> [(s["ranker"], s["from_s"], s["to_s"], s["requests"]) for s in version_timeline(
    ...     [{"t": 0.5, "ranker": "blend-v1", "stats": r}, {"t": 1.5, "ranker": "m:v1", "stats": r},
    ...      {"t": 2.5, "ranker": "m:v1", "stats": r}])]
    [('blend-v1', 0.5, 0.5, 1), ('m:v1', 1.5, 2.5, 2)]
    """
    spans: list[list] = []
    for r in sorted(records, key=lambda r: r["t"]):
        if spans and spans[-1][0]["ranker"] == r["ranker"]:
            spans[-1].append(r)
        else:
            spans.append([r])
    return [{"ranker": span[0]["ranker"], "from_s": round(span[0]["t"], 3),
             "to_s": round(span[-1]["t"], 3), "requests": len(span),
             "share_of_oracle": aggregate(span)["share_of_oracle"]} for span in spans]


def recovery(series: Sequence[dict], shift_at: Optional[float], width: float,
             baseline_s: float = RECOVERY_BASELINE_S) -> dict:
    """How long after the shift the share of oracle took to come back to within
    RECOVERY_TOLERANCE of its level before the shift: the mean over the windows
    (from :func:`over_time`) in the last ``baseline_s`` before it.

    >>> s = [{"t": 0, "share_of_oracle": 0.5}, {"t": 10, "share_of_oracle": 0.1},
    ...      {"t": 20, "share_of_oracle": 0.48}]
    >>> recovery(s, 10, 10)["recovered_after_s"]
    20.0
    """
    shares = [(row["t"], row["share_of_oracle"]) for row in series
              if row["share_of_oracle"] is not None]
    if shift_at is None or not shares or not (shares[0][0] < shift_at <= shares[-1][0]):
        return {"spans_shift": False, "shift_at": shift_at}
    before = [s for t, s in shares if t + width <= shift_at and t >= shift_at - baseline_s - 1e-9]
    after = [(t, s) for t, s in shares if t >= shift_at]
    if not before or not after:
        return {"spans_shift": False, "shift_at": shift_at}
    level = float(np.mean(before))
    target = level - RECOVERY_TOLERANCE * abs(level)
    recovered = next((t + width - shift_at for t, s in after if s >= target), None)
    return {"spans_shift": True, "shift_at": shift_at, "baseline_s": baseline_s,
            "share_before": _round(level),
            "share_min_after": _round(min(s for _, s in after)),
            "recovered_after_s": None if recovered is None else round(float(recovered), 3)}


def prediction_quality(predictions: Sequence[dict], truth: dict,
                       fired: Optional[dict] = None) -> dict:
    """Calibration and normalized entropy of the served model's probabilities
    against the TRUE probabilities recorded at serving time, per head.

    ``truth`` maps (request_id, item id) -> {head: true probability} at the
    position shown.  The true probability is a soft label: NE uses it as the
    expected log loss, and ``ne_floor`` is the NE of the truth itself (what a
    perfect model gets).  When a message logs the served items (stage
    ``served``, at their shown position) only those are compared: the truth
    is at the shown position too.  ``fired`` maps the same keys to the heads
    sampled for that impression: each head's ``positives``.

    >>> preds = [{"request_id": "r", "heads": ["click"], "model": "m1",
    ...           "items": [["a", "second", [0.2]], ["b", "second", [0.4]]]}]
    >>> truth = {("r", "a"): {"click": 0.1}, ("r", "b"): {"click": 0.2}}
    >>> q = prediction_quality(preds, truth, {("r", "b"): ["click"]})
    >>> q["heads"]["click"]["calibration"], q["heads"]["click"]["positives"]
    (2.0, 1)
    """
    pairs: dict[str, tuple[list, list]] = {}
    positives: dict[str, int] = {}
    models, requests = set(), set()
    fired = fired or {}
    for msg in predictions:
        heads = msg.get("heads", [])
        entries = msg.get("items", [])
        served = [e for e in entries if e[1] == "served"]
        for entry in served or entries:
            item, _stage, probs = entry[0], entry[1], entry[2]
            key = (msg.get("request_id"), item)
            true = truth.get(key)
            if true is None:
                continue
            for head in fired.get(key, ()):
                positives[head] = positives.get(head, 0) + 1
            models.add(msg.get("model"))
            requests.add(msg.get("request_id"))
            for head, p in zip(heads, probs):
                if head in true:
                    pred, real = pairs.setdefault(head, ([], []))
                    pred.append(p)
                    real.append(true[head])
    if not pairs:
        return {"available": False, "reason": "no predictions for the served items: no model "
                "was live (the funnel ranked by retrieval scores)"}
    heads = {}
    for head, (pred, real) in pairs.items():
        heads[head] = {"n": len(pred), "positives": positives.get(head, 0),
                       "mean_predicted": _round(float(np.mean(pred))),
                       "mean_true": _round(float(np.mean(real))),
                       "calibration": _round(calibration(real, pred)),
                       "ne": _round(normalized_entropy(real, pred)),
                       "ne_floor": _round(normalized_entropy(real, real))}
    return {"available": True, "requests": len(requests), "models": sorted(map(str, models)),
            "heads": heads}


def read_predictions(bootstrap: str, request_ids: set, timeout: float = 15.0) -> list[dict]:
    """Messages of the ``predictions`` topic for ``request_ids``, read from the
    start up to the end offsets seen now; what arrived by ``timeout`` if the read
    takes longer."""
    from schemas.topics import PREDICTIONS
    from stores.topic_reader import read_to_end
    out: list[dict] = []
    if not request_ids:
        return out
    try:
        for m in read_to_end(bootstrap, PREDICTIONS, timeout=timeout):
            try:
                value = orjson.loads(m.value())
            except orjson.JSONDecodeError:
                continue
            if isinstance(value, dict) and value.get("request_id") in request_ids:
                out.append(value)
    except TimeoutError as exc:
        print(f"predictions: {exc}; using the {len(out)} read", file=sys.stderr)
    return out


def _ratio(a: float, b: float) -> Optional[float]:
    return _round(a / b) if b else None


def _round(x) -> Optional[float]:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(float(x), 5)


def _session(world: World, producer, rng, p_user, k: int, request_id: str, t: float) -> int:
    """One organic session: a user engages with random catalogue items."""
    user = int(rng.choice(len(p_user), p=p_user))
    cands = world.candidates(user, t)
    items = rng.choice(cands, size=min(k, len(cands)), replace=False).tolist() if len(cands) else []
    events = world.events_for(user, items, request_id, t, ts=time.time())
    if events:
        producer.send_user_batch(events)
    return len(events)


def fired_heads(events) -> dict:
    """(request id, item id) -> heads that fired for that impression (``long_dwell``
    from a dwell of at least LONG_DWELL_MS).

    >>> from schemas.events import EngagementEvent
    >>> ev = lambda kind, dwell=None: EngagementEvent(event_id=kind, user_id="u", item_id="i",
    ...     event_type=kind, surface="explore", ts=1.0, request_id="r", dwell_ms=dwell)
    >>> fired_heads([ev("impression"), ev("click"), ev("dwell", LONG_DWELL_MS)])
    {('r', 'i'): ['click', 'long_dwell']}
    """
    out: dict = {}
    for e in events:
        head = ("long_dwell" if e.event_type == "dwell" and (e.dwell_ms or 0) >= LONG_DWELL_MS
                else e.event_type)
        if head in ENGAGEMENT_HEADS:
            out.setdefault((e.request_id, e.item_id), []).append(head)
    return out


def run(bootstrap: str, config: WorldConfig, *, requests_per_s: float, duration_s: float,
        progress: bool = True, k: int = 10, surface: str = SURFACE,
        warmup_sessions: Optional[int] = None, organic_per_s: Optional[float] = None,
        settle_s: float = 2.0, timeout: float = 2.0, time_scale: float = 1.0,
        bucket_s: Optional[float] = None, plot: Optional[str] = None,
        log: Optional[list] = None, tag: Optional[str] = None,
        quality_from_s: Optional[float] = None, probe_every: int = 0,
        probe_k: int = 200) -> dict:
    """Run the closed loop for ``duration_s`` wall seconds; returns the summary.

    Simulated time is wall seconds since the loop started times ``time_scale``
    (``config.shift_at`` and ``burst_at`` are in simulated seconds).  Before
    the loop, ``warmup_sessions`` organic sessions (default 2 per user) give the
    system history; during it, ``organic_per_s`` organic sessions (default a
    quarter of the request rate) keep bringing fresh items in.  ``log``, if
    given, receives one dict per answered request (request id, user, items).
    ``tag`` names the run's ids (default ``config.tag``, else a fresh random
    one).  ``quality_from_s``, if given, adds the prediction quality of the
    requests sent from that simulated second on.  ``probe_every`` > 0 sends,
    after every that many requests, a probe of ``probe_k`` items for the same
    user (see :func:`probe_summary`); probes send no events.
    """
    from tqdm import tqdm

    from streams.client import RecommendationClient, RecommendationTimeout
    from streams.producer import EventProducer

    config = replace(config, tag=tag or config.tag or uuid.uuid4().hex[:8])
    world = World(config)
    context = {"namespace": namespace(config.tag)}
    rng = np.random.default_rng([config.seed, 5])
    p_user = world.activity / world.activity.sum()
    nonce = uuid.uuid4().hex[:8]
    warmup_sessions = 2 * config.n_users if warmup_sessions is None else warmup_sessions
    organic_per_s = requests_per_s / 4 if organic_per_s is None else organic_per_s
    counts = {"sent": 0, "answered": 0, "timeouts": 0, "errors": 0, "fallbacks": 0,
              "empty_replies": 0, "short_replies": 0, "foreign_items": 0, "warmup_events": 0,
              "organic_events": 0, "served_events": 0, "sampled_positives": 0}
    records: list[dict] = []
    outcomes: list[tuple] = []
    truth: dict = {}
    fired: dict = {}
    sent_at: dict = {}
    probes: list[dict] = []
    started = time.time()

    with EventProducer(bootstrap) as producer:
        for n in range(warmup_sessions):
            counts["warmup_events"] += _session(world, producer, rng, p_user, k,
                                                f"warm-{nonce}-{n}", 0.0)
        producer.flush()
        time.sleep(settle_s)  # let the worker ingest the history before the first request

        with RecommendationClient(bootstrap) as client:
            bar = tqdm(total=int(requests_per_s * duration_s), disable=not progress, unit="req",
                       desc="simulate")
            pending: deque = deque()
            t0, loop_started_at = time.monotonic(), time.time()
            next_send = next_organic = t0
            n_organic = 0

            def handle(fut, user: int, t_sent: float) -> None:
                t = (time.monotonic() - t0) * time_scale
                world.step(t)
                try:
                    reply = fut.result()
                except RecommendationTimeout:
                    counts["timeouts"] += 1
                    outcomes.append((t_sent, "timeout"))
                    return
                except Exception:
                    counts["errors"] += 1
                    outcomes.append((t_sent, "error"))
                    return
                if reply.error:
                    counts["errors"] += 1
                    outcomes.append((t_sent, "error"))
                    return
                counts["answered"] += 1
                counts["fallbacks"] += bool(reply.fallback)
                served = [parse_item(i.item_id, config.tag) for i in reply.items]
                known = [i for i in served if i is not None and i < world.n_items]
                counts["foreign_items"] += len(served) - len(known)
                counts["empty_replies"] += not known
                counts["short_replies"] += 0 < len(known) < k
                outcomes.append((t_sent, "answered" if known else "empty"))
                # Counterfactuals first: the same user, same moment, same unseen catalogue,
                # every policy filling all k slots (what the system did not show is its loss).
                cands = world.candidates(user, t)
                stats = {"system": list_stats(world, user, known, t)}
                for name, policy in POLICIES.items():
                    stats[name] = list_stats(world, user, policy(world, user, cands, k, t), t)
                events = world.events_for(user, known, reply.request_id, t, ts=time.time(),
                                          surface=surface)
                if known:
                    probs = world.probability_matrix(user, known, np.arange(len(known)), t)
                    for item, row in zip(known, probs):
                        truth[(reply.request_id, item_id(item, config.tag))] = dict(
                            zip(ENGAGEMENT_HEADS, row.tolist()))
                    sent_at[reply.request_id] = t_sent
                    fired.update(fired_heads(events))
                    producer.send_user_batch(events)
                counts["served_events"] += len(events)
                counts["sampled_positives"] += sum(e.event_type in POSITIVE_HEADS for e in events)
                records.append({"t": t_sent, "stats": stats,
                                "ranker": (reply.model_versions or {}).get("ranker", "")})
                if log is not None and known:
                    log.append({"request_id": reply.request_id,
                                "user_id": user_id(user, config.tag),
                                "items": [item_id(i, config.tag) for i in known], "t": t})

            def handle_probe(fut, user: int, t_sent: float) -> None:
                t = (time.monotonic() - t0) * time_scale
                world.step(t)
                try:
                    reply = fut.result()
                except Exception:
                    return
                pool = [i for i in (parse_item(r.item_id, config.tag) for r in reply.items)
                        if i is not None and i < world.n_items]
                cands = world.candidates(user, t)
                # The paired request's items may be shown by now: the pool's best is built
                # from what the user has still not seen, as the oracle's is.
                unseen = np.intersect1d(np.array(pool), cands)
                if reply.error or len(pool) < k or len(unseen) < k:
                    return
                value = {name: list_stats(world, user, POLICIES[name](world, user, cands, k, t),
                                          t)["value"] for name in ("random", "oracle")}
                probes.append({"t": t_sent, "pool": len(pool), **value,
                               "ranked": list_stats(world, user, pool[:k], t)["value"],
                               "pool_best": list_stats(world, user, POLICIES["oracle"](
                                   world, user, unseen, k, t), t)["value"]})

            probing: deque = deque()
            while True:
                now = time.monotonic()
                sending = now - t0 < duration_s
                if sending and now >= next_send:
                    user = int(rng.choice(len(p_user), p=p_user))
                    fut = client.submit(user_id(user, config.tag), surface, k, timeout=timeout,
                                        context=context)
                    pending.append((fut, user, (now - t0) * time_scale))
                    counts["sent"] += 1
                    if probe_every and counts["sent"] % probe_every == 0:
                        probing.append((client.submit(user_id(user, config.tag), surface,
                                                      probe_k, timeout=timeout, context=context),
                                        user, (now - t0) * time_scale))
                    next_send += 1.0 / requests_per_s
                if sending and organic_per_s > 0 and now >= next_organic:
                    world.step((now - t0) * time_scale)
                    counts["organic_events"] += _session(world, producer, rng, p_user, k,
                                                         f"organic-{nonce}-{n_organic}",
                                                         (now - t0) * time_scale)
                    n_organic += 1
                    next_organic += 1.0 / organic_per_s
                # Replies are handled here, on this thread: the world is not thread-safe.
                for _ in range(len(pending)):
                    fut, user, t_sent = pending.popleft()
                    if fut.done():
                        handle(fut, user, t_sent)
                        bar.update(1)
                        if progress and records and counts["answered"] % 20 == 0:
                            bar.set_postfix(share=aggregate(records[-200:])["share_of_oracle"],
                                            refresh=False)
                    else:
                        pending.append((fut, user, t_sent))
                for _ in range(len(probing)):
                    fut, user, t_sent = probing.popleft()
                    if fut.done():
                        handle_probe(fut, user, t_sent)
                    else:
                        probing.append((fut, user, t_sent))
                if not sending and not pending and not probing:
                    break
                time.sleep(0.001)
            bar.close()

    end = duration_s * time_scale
    width = bucket_s or max(1.0, duration_s / 20) * time_scale
    summary = aggregate(records)
    series = over_time(records, width, end, outcomes)
    predictions = read_predictions(bootstrap, set(sent_at))
    counts["items_created"] = world.n_items - config.n_authors * config.items_per_author
    counts["sampled_engagement_per_impression"] = _ratio(
        counts["sampled_positives"],
        sum(r["stats"]["system"]["impressions"] for r in records))
    result = {
        "config": asdict(config),
        "run": {"requests_per_s": requests_per_s, "duration_s": duration_s, "k": k,
                "surface": surface, "time_scale": time_scale, "namespace": context["namespace"],
                "interval_s": width, "loop_started_at": round(loop_started_at, 3),
                "wall_s": round(time.time() - started, 2), **counts},
        "policies": summary["policies"],
        "share_of_oracle": summary["share_of_oracle"],
        "prediction_quality": prediction_quality(predictions, truth, fired),
        "adaptation": recovery(series, config.shift_at, width),
        "model_versions": version_timeline(records),
        "over_time": series,
    }
    if probe_every:
        result["funnel_probes"] = {"whole_run": probe_summary(probes),
                                   **({"from": probe_summary(probes, quality_from_s)}
                                      if quality_from_s is not None else {})}
    if quality_from_s is not None:
        late = {rid for rid, t in sent_at.items() if t >= quality_from_s}
        result["prediction_quality_from"] = {
            "from_s": quality_from_s,
            **prediction_quality([m for m in predictions if m.get("request_id") in late],
                                 truth, fired)}
    if plot:
        result["plot"] = save_plot(series, plot, config.shift_at, width,
                                   [span["from_s"] for span in result["model_versions"][1:]])
    return result


def save_plot(series: Sequence[dict], path: str, shift_at: Optional[float] = None,
              width: float = 0.0, version_changes: Sequence[float] = ()) -> str:
    """Share of oracle and value per request (per policy) per window, drawn at the
    window's middle, the shift and the ranker's version changes marked, as a PNG;
    says why when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed"
    fig, (share_ax, value_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ts = [row["t"] + width / 2 for row in series]
    share_ax.plot(ts, [row["share_of_oracle"] for row in series], marker=".", label="system")
    share_ax.axhline(0.0, color="lightgrey", linewidth=0.8)
    share_ax.set_ylabel("share of oracle")
    for name in NAMES:
        value_ax.plot(ts, [row["value_per_request"][name] for row in series], marker=".", label=name)
    value_ax.set_ylabel("value per request")
    value_ax.legend()
    for ax in (share_ax, value_ax):
        for t in version_changes:
            ax.axvline(t, color="lightsteelblue", linestyle=":", linewidth=0.8)
        if shift_at is not None:
            ax.axvline(shift_at, color="grey", linestyle="--")
    share_ax.set_title("dashed: interest shift; dotted: the serving ranker changed", fontsize=9)
    value_ax.set_xlabel("simulated seconds")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def format_summary(result: dict) -> str:
    """A few human lines: the policies side by side, then the headline numbers."""
    lines = [f"{'policy':<12}{'value/req':>11}{'eng/imp':>10}{'objectionable':>15}{'same author':>13}"]
    for name, p in result["policies"].items():
        lines.append(f"{name:<12}{_fmt(p['value_per_request']):>11}"
                     f"{_fmt(p['engagement_per_impression']):>10}"
                     f"{_fmt(p['objectionable_share']):>15}{_fmt(p['same_author_pair_share']):>13}")
    run_ = result["run"]
    lines.append(f"share of oracle: {_fmt(result['share_of_oracle'])}  "
                 f"answered {run_['answered']}/{run_['sent']}, timeouts {run_['timeouts']}, "
                 f"fallbacks {run_['fallbacks']}, empty {run_['empty_replies']}, "
                 f"short {run_['short_replies']} (namespace {run_['namespace']})")
    pq = result["prediction_quality"]
    lines.append("predictions: " + (", ".join(f"{h} cal {_fmt(v['calibration'])} ne {_fmt(v['ne'])}"
                                              for h, v in pq["heads"].items())
                                    if pq["available"] else pq["reason"]))
    if result["adaptation"].get("spans_shift"):
        lines.append(f"recovered after shift: {result['adaptation']['recovered_after_s']} s")
    if "plot" in result:
        lines.append(f"plot: {result['plot']}")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from streams.settings import settings
    ap = argparse.ArgumentParser(prog="streamrec simulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", default=settings.bootstrap)
    ap.add_argument("--rate", type=float, default=10.0, help="requests per second")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of closed loop")
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--items", type=int, default=400, help="initial catalogue size")
    ap.add_argument("--authors", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shift-at", type=float, default=None,
                    help="simulated second of the sudden interest shift")
    ap.add_argument("--burst-at", type=float, default=None,
                    help="simulated second of the viral burst")
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--interval", type=float, default=None,
                    help="width of the over-time windows, simulated seconds "
                         "(default a twentieth of the run)")
    ap.add_argument("--tag", default=None,
                    help="names this run's users and items (sim-<tag>-u5; letters and digits; "
                         "default a fresh random one, so runs on one worker never meet)")
    ap.add_argument("--out", help="write the summary JSON here (and a PNG beside it)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.tag is not None and not args.tag.isalnum():
        ap.error(f"--tag must be letters and digits, got {args.tag!r}")
    config = replace(WorldConfig(), n_users=args.users, n_authors=args.authors,
                     items_per_author=max(1, args.items // args.authors), seed=args.seed,
                     shift_at=args.shift_at, burst_at=args.burst_at)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot = str(Path(args.out).with_suffix(".png")) if args.out else None
    result = run(args.bootstrap, config, requests_per_s=args.rate, duration_s=args.duration,
                 k=args.k, progress=not args.quiet, plot=plot, tag=args.tag,
                 bucket_s=args.interval)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    print(format_summary(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

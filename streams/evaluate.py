"""``streamrec launch evaluate``: replay recorded traffic against a candidate version and
production, side by side (the figures and the verdict are :mod:`models.evaluation`'s).

What is replayed is the label join's record of real traffic, ``training.examples``:
each impression a request served, with the features serving had then and its labels.
Both versions score each request's examples as one batch, at the positions they were
shown at, alternating which goes first so neither pays for a cold cache alone; the
time and CPU each spends are its cost.  The examples are the newest ``last`` (or
those since ``since``) after the last offset either version's lineage says it trained
on, and of the candidate's surface when its record names one.

HitRate@10 (:func:`models.evaluation.hit_rate`) ranks each recorded request's items
by the version's value score with the items scored as if shown at the top (as the
funnel ranks them, with the surface's default value weights), and counts a hit when a
clicked item is in the top 10.  The recording holds only the items a request showed,
so only requests that showed more than 10 can tell one order from another; with none,
the figure is null with that reason.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Optional

import numpy as np

from models import evaluation
from models.features import HEADS, Example
from schemas.topics import TRAINING_EXAMPLES

#: Examples scored in one batch when they came from no request (a replay's impressions).
LOOSE_BATCH = 200


class EvaluationError(RuntimeError):
    """Nothing to evaluate: no broker, no such version, no recorded traffic."""


def parse_candidate(spec: Optional[str], model: Optional[str], version: Optional[str]
                    ) -> tuple[Optional[str], str]:
    """(model, version) from ``MODEL@VERSION``, a bare version, or ``--model``/``--version``.

    >>> parse_candidate("ranker@v7", None, None), parse_candidate("v7", "ranker", None)
    (('ranker', 'v7'), ('ranker', 'v7'))
    >>> parse_candidate(None, None, "v7")
    (None, 'v7')
    """
    if spec and (version or (model and "@" in spec)):
        raise ValueError("name the candidate once: MODEL@VERSION, or --model and --version")
    if spec and "@" in spec:
        model, _, version = spec.partition("@")
    elif spec:
        version = spec
    if not version:
        raise ValueError("name the candidate: MODEL@VERSION (or --model NAME --version V)")
    return model or None, version


def _resolve(registry: dict, model: Optional[str], version: str) -> tuple[dict, dict]:
    """The candidate's record and its model's production (live) version."""
    from stores.model_store import live_records
    match = [r for r in registry.values() if r["version"] == version
             and (model is None or r["model"] == model)]
    if not match:
        raise EvaluationError(f"unknown version: no {version!r}" + (f" of {model!r}" if model
                              else "") + " in the registry ('streamrec models list')")
    if len(match) > 1:
        raise EvaluationError(f"version {version!r} exists for several models "
                              f"({', '.join(r['model'] for r in match)}): name one, MODEL@VERSION")
    candidate = match[0]
    live = live_records(registry, candidate["model"])
    if not live:
        raise EvaluationError(f"{candidate['model']} has no production (live) version to "
                              f"compare with")
    production = live[-1]
    if production["version"] == candidate["version"]:
        raise EvaluationError(f"{candidate['model']} {version} is the production version: "
                              f"evaluate another version against it")
    return candidate, production


def recorded(bootstrap: str, after: Optional[int], progress: bool) -> Iterator[tuple[int, dict]]:
    """(offset, example) of every labelled example recorded after offset ``after``
    (messages at or before it are skipped undecoded)."""
    import orjson

    from stores.topic_reader import read_to_end
    for msg in read_to_end(bootstrap, TRAINING_EXAMPLES,
                           progress="read examples" if progress else None):
        if after is not None and msg.offset() <= after:
            continue
        for example in orjson.loads(msg.value()):
            yield msg.offset(), example


def batches(examples: list[dict]) -> list[tuple[bool, list[int]]]:
    """Indices of ``examples`` in scoring batches: (True, one request's examples in shown
    order) for each request, then (False, up to :data:`LOOSE_BATCH` others).

    >>> batches([{"request_id": "a", "position": 1}, {"request_id": None},
    ...          {"request_id": "a", "position": 0}])
    [(True, [2, 0]), (False, [1])]
    """
    groups: dict = {}
    loose = []
    for i, e in enumerate(examples):
        if e.get("request_id"):
            groups.setdefault(e["request_id"], []).append(i)
        else:
            loose.append(i)
    out = [(True, sorted(rows, key=lambda i: (examples[i].get("position") or 0, i)))
           for rows in groups.values()]
    out += [(False, loose[s:s + LOOSE_BATCH]) for s in range(0, len(loose), LOOSE_BATCH)]
    return out


def score(trainers: dict, examples: list[dict], *, k: int, progress: bool) -> dict:
    """Each version's probabilities at the shown positions, its ranking scores for
    HitRate (requests with more than ``k`` items) and what scoring cost it."""
    from tqdm import tqdm

    from models.value import value_scores, weights_for
    rows = [Example.from_record(d) for d in examples]
    probs = {v: np.zeros((len(rows), len(HEADS))) for v in trainers}
    ranking = {v: np.full(len(rows), np.nan) for v in trainers}
    wall = {v: [] for v in trainers}
    request_wall = {v: [] for v in trainers}
    cpu = {v: 0.0 for v in trainers}
    order = list(trainers)
    plan = batches(examples)
    for n, (is_request, idx) in enumerate(tqdm(plan, desc="score", unit="batch",
                                               disable=not progress)):
        batch = [rows[i] for i in idx]
        for version in (order if n % 2 == 0 else order[::-1]):
            trainer = trainers[version]
            c0, t0 = time.process_time(), time.perf_counter()
            probs[version][idx] = trainer.predict(batch)
            spent = time.perf_counter() - t0
            cpu[version] += time.process_time() - c0
            wall[version].append(spent)
            if is_request:
                request_wall[version].append(spent)
            if is_request and len(idx) > k:
                top = [dataclasses.replace(e, position=0) for e in batch]
                ranking[version][idx] = value_scores(trainer.predict(top),
                                                     weights_for(batch[0].surface))
    requests = sum(1 for is_request, _ in plan if is_request)
    return {v: {"probs": probs[v], "ranking": ranking[v],
                "cost": evaluation.cost(wall[v], cpu[v], len(rows), requests, request_wall[v])}
            for v in trainers}


def evaluate(bootstrap: str, model: Optional[str], version: str, *,
             last: Optional[int] = evaluation.DEFAULT_LAST, since: Optional[float] = None,
             k: int = evaluation.HIT_K, min_examples: int = evaluation.MIN_EXAMPLES,
             progress: bool = True) -> dict:
    """The report of ``model``'s ``version`` against production on recorded traffic."""
    import torch

    from stores import model_store
    from streams.producer import check_broker
    check_broker(bootstrap)
    registry = model_store.read_registry(bootstrap)
    candidate, production = _resolve(registry, model, version)
    model = candidate["model"]
    notes = []
    seen = {}
    for r in (candidate, production):
        seen[r["version"]] = evaluation.trained_through(r)
        if seen[r["version"]] is None:
            notes.append(f"{r['version']}'s lineage names no {TRAINING_EXAMPLES} offset: it "
                         f"may have trained on some of these examples")
    known = [o for o in seen.values() if o is not None]
    after = max(known) if known else None
    surface = candidate.get("surface")
    chosen = evaluation.choose(recorded(bootstrap, after, progress), after=after, since=since,
                               last=last, surface=surface)
    if not chosen.examples:
        where = f" after offset {after} (the newest either version trained on)" if after \
            is not None else ""
        raise EvaluationError(
            f"no recorded traffic to evaluate on: {chosen.after_cut} labelled examples in "
            f"{TRAINING_EXAMPLES}{where}, {chosen.filtered} of them outside the period or of "
            f"another surface than {surface or 'any'}; record traffic (requests and the "
            f"impressions and engagements that follow) first")
    blobs = model_store.version_blobs(bootstrap, model, [candidate["version"],
                                                         production["version"]])
    torch.set_num_threads(1)  # as the worker's trainer runs; steadier cost figures
    trainers = {v: model_store.trainer_from_bytes(blob) for v, blob in blobs.items()}
    scored = score(trainers, chosen.examples, k=k, progress=progress)
    labels, mask = evaluation.labels_matrix(chosen.examples)
    clicks = labels[:, HEADS.index(evaluation.HIT_HEAD)]
    requests = [e.get("request_id") for e in chosen.examples]
    sides = {}
    for r in (candidate, production):
        s = scored[r["version"]]
        sides[r["version"]] = {
            "version": r["version"], "state": r["state"],
            "trained_through": seen[r["version"]],
            "heads": evaluation.head_quality(labels, mask, s["probs"]),
            "hit_rate": evaluation.hit_rate(requests, clicks, s["ranking"], k=k),
            "cost": s["cost"]}
    tier = candidate.get("tier", "TIER2")
    report = {
        "model": model, "tier": tier,
        "candidate": sides[candidate["version"]], "production": sides[production["version"]],
        "examples": {"n": len(chosen.examples),
                     "requests": len({q for q in requests if q is not None}),
                     "offsets": [chosen.offsets[0], chosen.offsets[-1]],
                     "from_ts": min(float(e["ts"]) for e in chosen.examples),
                     "to_ts": max(float(e["ts"]) for e in chosen.examples),
                     "after_offset": after, "surface": surface},
        "verdict": evaluation.verdict(sides[candidate["version"]]["heads"], tier,
                                      min_examples=min_examples),
        "production_verdict": evaluation.verdict(sides[production["version"]]["heads"],
                                                 production.get("tier", tier),
                                                 min_examples=min_examples)["verdict"],
        "notes": notes}
    if report["production_verdict"] == "fail":
        notes.append(f"production {production['version']} breaks its SLO on these labels too")
    return report


def parse_since(text: str, now: float) -> float:
    """The start of the period ``--since`` names: a duration back from ``now`` (``90s``,
    ``30m``, ``2h``, ``1d``), Unix seconds, or a UTC time (``2026-11-23T19:00:00``).

    >>> parse_since("30m", now=10_000.0), parse_since("1700000000", now=0.0)
    (8200.0, 1700000000.0)
    >>> parse_since("1970-01-01T01:00:00", now=0.0)
    3600.0
    >>> parse_since("soon", now=0.0)
    Traceback (most recent call last):
    ...
    ValueError: --since 'soon': give a duration (30m, 2h, 1d), Unix seconds or a UTC time (2026-11-23T19:00:00)
    """
    import calendar
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    text = text.strip()
    try:
        if text[-1:] in units and text[:-1]:
            return now - float(text[:-1]) * units[text[-1]]
        if text.replace(".", "", 1).isdigit():
            return float(text)
        return float(calendar.timegm(time.strptime(text.rstrip("Z"), "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        raise ValueError(f"--since {text!r}: give a duration (30m, 2h, 1d), Unix seconds or a "
                         f"UTC time (2026-11-23T19:00:00)") from None

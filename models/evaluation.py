"""Offline evaluation of a candidate model version on recorded traffic, beside production.
Pure: numpy and dicts, no Kafka, no torch (``streams/evaluate.py`` reads the topics and
scores; ``streamrec launch evaluate`` prints what :func:`format_report` makes of it).

The recorded traffic is the label join's output (``training.examples``): every
impression a request served, with the features serving had and every head labelled
once its attribution window closed.  Both versions score the same examples, each at
the position it was shown at (what its labels measure), so their figures compare
like for like:

- per head, NE, calibration (predicted / observed) and AUC (:mod:`models.metrics`);
- HitRate@10 over recorded requests, where the recording can support it
  (:func:`hit_rate`);
- cost: model time per example and per request, and CPU seconds (:func:`cost`);
- a verdict on the candidate against its tier's SLO, the one launches and the
  stability monitor apply (:func:`verdict`, through :mod:`models.launch`).

The examples must be ones neither version trained on.  A version's lineage names the
last ``training.examples`` offset it learned from (:func:`trained_through`); only
examples after both versions' offsets are used (:func:`choose`).  A version with no
such lineage (a checkpoint from elsewhere) cannot tell: the report says so.

>>> labels, mask = [[1], [0], [0], [0]], [[True]] * 4
>>> heads = head_quality(labels, mask, [[0.6], [0.2], [0.1], [0.1]], heads=("click",))
>>> heads["click"]["n"], heads["click"]["positives"], heads["click"]["calibration"], heads["click"]["auc"]
(4, 1, 1.0, 1.0)
>>> v = verdict(heads, "TIER2")
>>> v["verdict"], v["reason"]
('not judged', 'no head has 200 labels with 5 positives (most labels on a head: 4)')
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional, Sequence

import numpy as np

from models.features import HEADS
from models.gate import labels_and_mask
from models.launch import MIN_EXAMPLES, breaches, launch_slo
from models.metrics import summarize
from models.stability import judged

#: Examples evaluated when no period is named: the newest this many.
DEFAULT_LAST = 5000
#: HitRate@K's K.
HIT_K = 10
#: The head whose positives HitRate counts.
HIT_HEAD = "click"


def trained_through(record: dict, topic: str = "training.examples") -> Optional[int]:
    """The last offset of ``topic`` the version learned from, per its lineage; None when
    the lineage does not say (the topic has one partition: the highest offset named).

    >>> trained_through({"lineage": {"source_topic": "training.examples",
    ...                              "offsets": {"0": 812}}})
    812
    >>> trained_through({"lineage": {"examples_seen": 0}}) is None
    True
    >>> trained_through({"lineage": {"source_topic": "other", "offsets": {"0": 5}}}) is None
    True
    """
    lineage = record.get("lineage") or {}
    if lineage.get("source_topic", topic) != topic:
        return None
    offsets = [int(v) for v in (lineage.get("offsets") or {}).values() if v is not None]
    return max(offsets) if offsets else None


@dataclass
class Selection:
    """The examples chosen, and what was passed over (to say why there are none)."""
    examples: list = field(default_factory=list)
    #: Offsets of the messages the examples came from, parallel to ``examples``.
    offsets: list = field(default_factory=list)
    #: Examples after the lineage cut, before the period and surface filters.
    after_cut: int = 0
    #: Of those, outside the period (``since``) or of another surface.
    filtered: int = 0


def choose(rows: Iterable[tuple[int, dict]], *, after: Optional[int] = None,
           since: Optional[float] = None, last: Optional[int] = DEFAULT_LAST,
           surface: Optional[str] = None) -> Selection:
    """The examples to evaluate on, oldest first: ``rows`` are (topic offset, example)
    in topic order; kept are those after offset ``after`` (what the versions trained
    on), with event time at or after ``since``, of ``surface`` (when named), and of
    those the newest ``last`` (None: all).

    >>> rows = [(0, {"ts": 10, "surface": "explore"}), (1, {"ts": 20, "surface": "explore"}),
    ...         (1, {"ts": 21, "surface": "home"}), (2, {"ts": 30, "surface": "explore"})]
    >>> [e["ts"] for e in choose(rows, after=0).examples]
    [20, 21, 30]
    >>> s = choose(rows, after=0, surface="explore", last=1)
    >>> [e["ts"] for e in s.examples], s.offsets, s.after_cut, s.filtered
    ([30], [2], 3, 1)
    >>> [e["ts"] for e in choose(rows, since=21, last=None).examples]
    [21, 30]
    """
    kept: deque = deque(maxlen=last) if last else deque()
    selection = Selection()
    for offset, example in rows:
        if after is not None and offset <= after:
            continue
        selection.after_cut += 1
        if ((since is not None and float(example.get("ts") or 0.0) < since)
                or (surface is not None and example.get("surface") != surface)):
            selection.filtered += 1
            continue
        kept.append((offset, example))
    selection.offsets = [o for o, _ in kept]
    selection.examples = [e for _, e in kept]
    return selection


def labels_matrix(examples: Sequence[dict], heads: Sequence[str] = HEADS
                  ) -> tuple[np.ndarray, np.ndarray]:
    """[N, heads] labels of label-join examples and the mask of the labels they have.

    >>> y, m = labels_matrix([{"labels": {"click": 1, "like": 0}}, {"labels": {}}],
    ...                      heads=("click", "like"))
    >>> y.tolist(), m.tolist()
    ([[1.0, 0.0], [0.0, 0.0]], [[True, True], [False, False]])
    """
    return labels_and_mask([example.get("labels") or {} for example in examples], heads)


def head_quality(labels, mask, probs, heads: Sequence[str] = HEADS) -> dict:
    """Per head, over the examples whose label is known: n, positives, rate, NE,
    calibration (predicted / observed), AUC and log loss, rounded to 4 digits as the
    stability monitor rounds them (None where a figure is undefined: no positives, or
    one class only).

    >>> q = head_quality([[1, 0], [0, 0]], [[1, 1], [1, 0]], [[0.7, 0.2], [0.1, 0.3]],
    ...                  heads=("click", "like"))
    >>> q["click"]["calibration"], q["click"]["auc"], q["like"]["n"], q["like"]["calibration"]
    (0.8, 1.0, 1, None)
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1, len(heads))
    m = np.asarray(mask, dtype=bool).reshape(y.shape)
    p = np.asarray(probs, dtype=np.float64).reshape(y.shape)
    out = {}
    for j, head in enumerate(heads):
        keep = m[:, j]
        figures = summarize(y[keep, j], p[keep, j])
        figures["positives"] = int(y[keep, j].sum())
        out[head] = figures
    return out


def hit_rate(requests: Sequence, positives, scores, k: int = HIT_K) -> dict:
    """HitRate@k over recorded requests: the share of requests with a positive whose
    ``k`` best-scored recorded items hold at least one of them.

    ``requests``: each example's request id (None: not from a request); ``positives``:
    0/1 per example (a click); ``scores``: the version's ranking score per example
    (ties keep the order the examples come in: give them in shown order).  Only
    requests with more than ``k`` labelled items count: the recording holds the items
    a request showed, not the candidates they were chosen from, so for a request that
    showed ``k`` or fewer, any order puts every positive in the top ``k`` and the figure
    would be 1 whatever the model.  When no request qualifies the value is None and
    ``reason`` says why.

    >>> hit_rate(["a"] * 12, [0] * 11 + [1], list(range(12, 0, -1)))  # the click ranks last
    {'value': 0.0, 'requests': 1, 'k': 10, 'reason': None}
    >>> hit_rate(["a"] * 12, [0] * 11 + [1], list(range(12)))["value"]
    1.0
    >>> hit_rate(["a"] * 10 + ["b"] * 8, [1] * 18, [0.5] * 18)["reason"]
    'no recorded request has more than 10 labelled items (at most 10): the candidates a request was ranked from are not recorded, and any order of 10 or fewer shown items puts every click in the top 10'
    """
    groups: dict = {}
    for i, request in enumerate(requests):
        if request is not None:
            groups.setdefault(request, []).append(i)
    pos = np.asarray(positives, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    big = [rows for rows in groups.values() if len(rows) > k]
    if not big:
        most = max((len(rows) for rows in groups.values()), default=0)
        return {"value": None, "requests": 0, "k": k,
                "reason": (f"no recorded request has more than {k} labelled items (at most "
                           f"{most}): the candidates a request was ranked from are not "
                           f"recorded, and any order of {k} or fewer shown items puts every "
                           f"{HIT_HEAD} in the top {k}")}
    hits = counted = 0
    for rows in big:
        rows = np.asarray(rows)
        if not pos[rows].any():
            continue
        counted += 1
        top = rows[np.argsort(-s[rows], kind="stable")[:k]]
        hits += bool(pos[top].any())
    if not counted:
        return {"value": None, "requests": 0, "k": k,
                "reason": f"none of the {len(big)} requests with more than {k} labelled items "
                          f"has a {HIT_HEAD}"}
    return {"value": round(hits / counted, 4), "requests": counted, "k": k, "reason": None}


def cost(wall_s: Sequence[float], cpu_s: float, examples: int, requests: int,
         request_wall_s: Sequence[float] = ()) -> dict:
    """What scoring cost one version: model time per example (all batches), per request
    (the batches that were one request each, as serving scores a request), and the CPU
    seconds the scoring took.

    >>> cost([0.002, 0.004], 0.005, examples=20, requests=2, request_wall_s=[0.002, 0.004])
    {'examples': 20, 'requests': 2, 'wall_s': 0.006, 'cpu_s': 0.005, 'ms_per_example': 0.3, 'ms_per_request': 3.0}
    """
    total = float(sum(wall_s))
    return {"examples": examples, "requests": requests, "wall_s": round(total, 4),
            "cpu_s": round(cpu_s, 4),
            "ms_per_example": round(1000.0 * total / examples, 4) if examples else None,
            "ms_per_request": (round(1000.0 * float(sum(request_wall_s)) / len(request_wall_s), 4)
                               if request_wall_s else None)}


def verdict(heads: dict, tier: str, *, min_examples: int = MIN_EXAMPLES,
            min_positives: Optional[int] = None) -> dict:
    """The candidate's verdict on these labels against its tier's SLO
    (:func:`models.launch.launch_slo`: the band and NE limit the stability monitor and
    launch steps apply, with the launch's minimum sample): ``pass`` when every head with
    enough labels is inside it, ``fail`` when one is not (``breaches`` says which),
    ``not judged`` when no head has enough labels.

    >>> heads = {"click": {"n": 400, "rate": 0.1, "calibration": 3.0, "ne": 1.4},
    ...          "like": {"n": 400, "rate": 0.0, "calibration": None, "ne": None}}
    >>> v = verdict(heads, "TIER2")
    >>> v["verdict"], v["judged"], [(b["head"], b["metric"]) for b in v["breaches"]]
    ('fail', ['click'], [('click', 'calibration'), ('click', 'normalized_entropy')])
    >>> verdict(heads, "TIER2", min_examples=500)["verdict"]
    'not judged'
    """
    slo = launch_slo(tier, min_examples)
    if min_positives is not None:
        slo = replace(slo, min_positives=min_positives)
    figures = {h: {"n": m.get("n", 0), "rate": m.get("rate") or 0.0,
                   "calibration": m.get("calibration"), "ne": m.get("ne")}
               for h, m in heads.items()}
    checked = sorted(h for h, m in figures.items() if judged(m, slo))
    broken = breaches(figures, slo)
    rules = {"tier": tier, "calibration": [round(slo.calibration_low, 4),
                                           round(slo.calibration_high, 4)],
             "max_ne": round(slo.max_normalized_entropy, 4),
             "min_examples": slo.min_examples, "min_positives": slo.min_positives}
    if not checked:
        most = max((m["n"] for m in figures.values()), default=0)
        return {"verdict": "not judged", "judged": [], "breaches": [], "slo": rules,
                "reason": f"no head has {slo.min_examples} labels with {slo.min_positives} "
                          f"positives (most labels on a head: {most})"}
    if broken:
        b = broken[0]
        reason = (f"{b['head']} {b['metric'].replace('_', ' ')} {b['value']:g} outside "
                  f"{b['bounds'][0]:g}-{b['bounds'][1]:g} on {b['n']} labels ({tier} SLO)")
    else:
        reason = f"{', '.join(checked)} inside the {tier} SLO"
    return {"verdict": "fail" if broken else "pass", "judged": checked, "breaches": broken,
            "slo": rules, "reason": reason}


#: ``streamrec launch evaluate``'s exit status for each verdict.
EXIT_STATUS = {"pass": 0, "fail": 1, "not judged": 2}


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                      for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]


def format_report(report: dict) -> str:
    """A report (as ``streams.evaluate.evaluate`` returns it) for people: the examples,
    each head side by side, HitRate, cost and the verdict.

    >>> heads = {"click": {"n": 300, "positives": 30, "rate": 0.1, "ne": 0.91,
    ...                    "calibration": 1.02, "auc": 0.66}}
    >>> cost_ = {"examples": 300, "requests": 30, "wall_s": 0.03, "cpu_s": 0.03,
    ...          "ms_per_example": 0.1, "ms_per_request": 1.0}
    >>> hr = {"value": None, "requests": 0, "k": 10, "reason": "too few items"}
    >>> side = {"heads": heads, "hit_rate": hr, "cost": cost_}
    >>> print(format_report({"model": "r", "tier": "TIER2",
    ...     "candidate": {"version": "c1", "state": "registered", "trained_through": None, **side},
    ...     "production": {"version": "p1", "state": "live", "trained_through": 7, **side},
    ...     "examples": {"n": 300, "requests": 30, "offsets": [8, 9], "from_ts": 0, "to_ts": 60,
    ...                  "after_offset": 7, "surface": None},
    ...     "verdict": {"verdict": "pass", "reason": "click inside the TIER2 SLO",
    ...                 "slo": {"calibration": [0.8, 1.25], "max_ne": 1.0, "min_examples": 200,
    ...                         "min_positives": 5}},
    ...     "notes": ["c1 has no lineage offsets"]}))
    r: candidate c1 (registered) vs production p1 (live), TIER2
    examples   300 labelled (30 requests), training.examples offsets 8-9, 1970-01-01 00:00:00 to 1970-01-01 00:01:00, after offset 7 (the newest either version trained on)
    HEAD   LABELS  POS  NE cand  NE prod  CAL cand  CAL prod  AUC cand  AUC prod
    click     300   30    0.910    0.910     1.020     1.020     0.660     0.660
    hit@10     candidate -, production -  (too few items)
    cost       candidate 0.1 ms/example, 1 ms/request, 0.03 CPU s; production 0.1 ms/example, 1 ms/request, 0.03 CPU s
    note       c1 has no lineage offsets
    verdict    PASS: click inside the TIER2 SLO (calibration 0.8-1.25, NE <= 1, heads with 200 labels and 5 positives)
    """
    import time
    cand, prod, ex = report["candidate"], report["production"], report["examples"]

    def when(t) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(t)))

    lines = [f"{report['model']}: candidate {cand['version']} ({cand['state']}) vs production "
             f"{prod['version']} ({prod['state']}), {report['tier']}"]
    period = (f"{ex['n']} labelled ({ex['requests']} requests), training.examples offsets "
              f"{ex['offsets'][0]}-{ex['offsets'][1]}, {when(ex['from_ts'])} to "
              f"{when(ex['to_ts'])}")
    if (ex.get("after_offset") or -1) >= 0:
        period += f", after offset {ex['after_offset']} (the newest either version trained on)"
    if ex.get("surface"):
        period += f", surface {ex['surface']}"
    lines.append(f"examples   {period}")
    rows = [("HEAD", "LABELS", "POS", "NE cand", "NE prod", "CAL cand", "CAL prod", "AUC cand",
             "AUC prod")]
    for head, c in cand["heads"].items():
        p = prod["heads"][head]
        rows.append((head, c["n"], c["positives"], _num(c["ne"]), _num(p["ne"]),
                     _num(c["calibration"]), _num(p["calibration"]), _num(c["auc"]),
                     _num(p["auc"])))
    lines += _table(rows)
    hc, hp = cand["hit_rate"], prod["hit_rate"]
    hit = f"{'hit@' + str(hc['k']):10s} candidate {_num(hc['value'])}, production {_num(hp['value'])}"
    hit += f"  ({hc['reason']})" if hc["value"] is None else f"  over {hc['requests']} requests"
    lines.append(hit)

    def spend(c: dict) -> str:
        per_request = (f", {c['ms_per_request']:g} ms/request" if c["ms_per_request"] is not None
                       else "")
        return f"{_num(c['ms_per_example'], 4).rstrip('0').rstrip('.')} ms/example{per_request}, " \
               f"{c['cpu_s']:g} CPU s"
    lines.append(f"cost       candidate {spend(cand['cost'])}; production {spend(prod['cost'])}")
    for note in report.get("notes") or ():
        lines.append(f"note       {note}")
    v, slo = report["verdict"], report["verdict"]["slo"]
    lines.append(f"verdict    {v['verdict'].upper()}: {v['reason']} (calibration "
                 f"{slo['calibration'][0]:g}-{slo['calibration'][1]:g}, NE <= {slo['max_ne']:g}, "
                 f"heads with {slo['min_examples']} labels and {slo['min_positives']} positives)")
    return "\n".join(lines)

"""Launching a model version on real traffic: who is served by which version, and when
a version on trial is taken back.  Pure: no Kafka, no torch (``stores/shared_view.py``
keeps the scorers, ``streams/serving.py`` and ``streams/stability.py`` are the glue).

A model's versions serve in three roles:

- **production**: the ``live`` version; it answers everyone not routed elsewhere.
- **canary**: a ``canary`` version answers a share of the users (its record's
  ``traffic_share``), chosen by a hash of the user id, so a user keeps the same
  version from request to request.  The hash is salted with the model's name only:
  raising a canary's share keeps the users it already had.
- **shadow**: a ``shadow`` version scores every request beside the version that
  answers it; its predictions are logged (tagged ``shadow``), never served.

>>> records = [
...     {"model": "r", "version": "p1", "state": "live", "tier": "TIER2", "history": [[1, "live"]]},
...     {"model": "r", "version": "c1", "state": "canary", "traffic_share": 0.25, "tier": "TIER2"},
...     {"model": "r", "version": "s1", "state": "shadow", "tier": "TIER2"}]
>>> plan = launch_plan(records, ready={("r", "p1"), ("r", "c1"), ("r", "s1")})
>>> plan.production, plan.canaries, plan.shadows
(('r', 'p1'), ((('r', 'c1'), 0.25),), (('r', 's1'),))
>>> sorted({route(plan, f"user{i}").role for i in range(40)})
['canary', 'production']
>>> route(plan, "user1").shadows
(('r', 's1'),)
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

from models.registry import (CANARY, LIVE, RETIRED, ROLLED_BACK, SHADOW, TIERS, slo_for,
                             traffic_share)
from models.stability import SLO, violations

PRODUCTION, CANARY_ROLE, SHADOW_ROLE = "production", "canary", "shadow"
Key = tuple[str, str]


@dataclass(frozen=True)
class LaunchPlan:
    """Which versions of the served model play which role (keys are (model, version))."""
    production: Optional[Key] = None
    #: (version, share) in the order their user buckets are laid out.
    canaries: tuple[tuple[Key, float], ...] = ()
    shadows: tuple[Key, ...] = ()


@dataclass(frozen=True)
class Route:
    """What one request gets: the version that answers it (None: no model, the blended
    cold-start ranking), in which role, and the versions that score it in shadow."""
    serve: Optional[Key]
    role: str
    shadows: tuple[Key, ...] = field(default=())


def _live_since(record: dict) -> float:
    return max((float(t) for t, s in record.get("history", []) if s == LIVE),
               default=float(record.get("created", 0.0) or 0.0))


def _since(record: dict, state: str) -> tuple:
    """When the version last entered ``state`` (then its name): stable canary order."""
    t = max((float(t) for t, s in record.get("history", []) if s == state),
            default=float(record.get("created", 0.0) or 0.0))
    return (t, record.get("version", ""))


def launch_plan(records: Iterable[dict], ready: set[Key]) -> LaunchPlan:
    """The plan for the registry's ``records``, given the versions whose weights are here.

    Production is the live version made live last (by ``live_since``, as before) among
    those ready; canaries and shadows are the same model's, ready, canaries laid out
    oldest first; their shares add up to at most 1 (a later canary gets what is left).
    Without a production version nothing is tried on traffic: a canary or shadow is
    judged beside production, and everyone else needs a version to answer them.

    >>> launch_plan([{"model": "r", "version": "c", "state": "canary"}], {("r", "c")})
    LaunchPlan(production=None, canaries=(), shadows=())
    >>> launch_plan([
    ...     {"model": "r", "version": "p", "state": "live"},
    ...     {"model": "r", "version": "a", "state": "canary", "traffic_share": 0.7,
    ...      "history": [[1, "canary"]]},
    ...     {"model": "r", "version": "b", "state": "canary", "traffic_share": 0.5,
    ...      "history": [[2, "canary"]]},
    ...     {"model": "r", "version": "s", "state": "shadow"},
    ...     {"model": "other", "version": "x", "state": "shadow"}],
    ...     {("r", "p"), ("r", "a"), ("r", "b"), ("other", "x")}).canaries
    ((('r', 'a'), 0.7), (('r', 'b'), 0.3))
    """
    records = list(records)
    live = [r for r in records if r.get("state") == LIVE and (r["model"], r["version"]) in ready]
    if not live:
        return LaunchPlan()
    return _model_plan(records, max(live, key=_live_since), ready)


def _model_plan(records: list[dict], chosen: dict, ready: set[Key]) -> LaunchPlan:
    """``chosen`` (a version of its model) as production, with that model's ready canaries
    and shadows."""
    model = chosen["model"]
    mine = [r for r in records if r.get("model") == model and (model, r["version"]) in ready]
    canaries, left = [], 1.0
    for r in sorted((r for r in mine if r.get("state") == CANARY),
                    key=lambda r: _since(r, CANARY)):
        share = round(min(traffic_share(r), left), 6)
        if share > 0:
            canaries.append(((model, r["version"]), share))
            left -= share
    shadows = tuple((model, r["version"]) for r in sorted(
        (r for r in mine if r.get("state") == SHADOW), key=lambda r: _since(r, SHADOW)))
    return LaunchPlan((model, chosen["version"]), tuple(canaries), shadows)


#: The model that ranks a surface no model names as its own: the online trainer's.
DEFAULT_MODEL = "ranker"


@dataclass(frozen=True)
class ServingPlan:
    """Which model ranks each surface, as its :class:`LaunchPlan`: ``surfaces`` for the
    surfaces a model's production version names, ``default`` for every other surface."""
    surfaces: tuple[tuple[str, LaunchPlan], ...] = ()
    default: LaunchPlan = LaunchPlan()

    def plan_for(self, surface: str) -> LaunchPlan:
        """The launch plan that answers ``surface``.

        >>> ServingPlan((("reels", LaunchPlan(("m", "v"))),)).plan_for("reels").production
        ('m', 'v')
        >>> ServingPlan((("reels", LaunchPlan(("m", "v"))),)).plan_for("explore")
        LaunchPlan(production=None, canaries=(), shadows=())
        """
        for name, plan in self.surfaces:
            if name == surface:
                return plan
        return self.default


def _production(records: list[dict], model: str, ready: set[Key],
                serving: Optional[str]) -> Optional[dict]:
    """``model``'s production record: its live version made live last among those whose
    weights are here.  While a live version's weights are still arriving, the version
    ``serving`` before keeps serving if it was retired (replaced); not if rolled back."""
    live = [r for r in records if r.get("model") == model and r.get("state") == LIVE]
    here = [r for r in live if (model, r["version"]) in ready]
    if here:
        return max(here, key=_live_since)
    before = next((r for r in records if r.get("model") == model
                   and r.get("version") == serving), None)
    if live and before is not None and before.get("state") == RETIRED \
            and (model, serving) in ready:
        return before
    return None


def serving_plan(records: Iterable[dict], ready: set[Key], *,
                 serving: Optional[dict[str, str]] = None,
                 default_model: str = DEFAULT_MODEL) -> ServingPlan:
    """Per surface, the model that ranks it and that model's launch (production, canaries,
    shadows: :func:`launch_plan`'s rules, applied to each model on its own).

    A model ranks the surface its production record names (``surface``); were two to
    name one, the one made live last.  Every other surface gets the default: the
    production version of ``default_model`` or of a model whose production names no
    surface, the one made live last (with one such model, as before several models
    served).  ``serving``: model -> the version that served it before (see
    :func:`_production`).

    >>> records = [
    ...     {"model": "ranker", "version": "p1", "state": "live", "history": [[1, "live"]]},
    ...     {"model": "reels", "version": "r1", "state": "live", "surface": "reels",
    ...      "history": [[2, "live"]]},
    ...     {"model": "reels", "version": "r2", "state": "canary", "traffic_share": 0.5}]
    >>> plan = serving_plan(records, {("ranker", "p1"), ("reels", "r1"), ("reels", "r2")})
    >>> plan.plan_for("explore").production, plan.plan_for("reels").production
    (('ranker', 'p1'), ('reels', 'r1'))
    >>> plan.plan_for("reels").canaries
    ((('reels', 'r2'), 0.5),)
    """
    records = list(records)
    serving = serving or {}
    productions = [p for p in (_production(records, m, ready, serving.get(m))
                               for m in sorted({r.get("model") for r in records
                                                if r.get("state") == LIVE}))
                   if p is not None]
    owners: dict[str, dict] = {}
    defaults = []
    for p in productions:
        surface = p.get("surface")
        if surface:
            if surface not in owners or _live_since(p) > _live_since(owners[surface]):
                owners[surface] = p
        if not surface or p["model"] == default_model:
            defaults.append(p)
    default = (_model_plan(records, max(defaults, key=_live_since), ready) if defaults
               else LaunchPlan())
    return ServingPlan(tuple((s, _model_plan(records, p, ready))
                             for s, p in sorted(owners.items())), default)


def select(plan: ServingPlan, surface: str, user_id: str) -> Route:
    """Which version answers ``user_id`` on ``surface`` and which score it in shadow: the
    surface's own model's :func:`route`, or the default model's.

    >>> plan = ServingPlan((("reels", LaunchPlan(("reels", "r1"))),), LaunchPlan(("ranker", "p1")))
    >>> select(plan, "reels", "u1").serve, select(plan, "home", "u1").serve
    (('reels', 'r1'), ('ranker', 'p1'))
    """
    return route(plan.plan_for(surface), user_id)


def bucket(model: str, user_id: str) -> float:
    """The user's place in [0, 1) for ``model``'s canaries: a hash, the same on every
    worker and every run (not Python's salted ``hash``).

    >>> bucket("ranker", "42") == bucket("ranker", "42"), 0 <= bucket("ranker", "42") < 1
    (True, True)
    """
    digest = hashlib.sha256(f"{model}\0{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def route(plan: LaunchPlan, user_id: str) -> Route:
    """Which version answers ``user_id`` and which score beside it in shadow.

    >>> plan = LaunchPlan(("r", "p"), ((("r", "c"), 1.0),), ())
    >>> route(plan, "anyone")
    Route(serve=('r', 'c'), role='canary', shadows=())
    >>> route(LaunchPlan(), "anyone")
    Route(serve=None, role='production', shadows=())
    """
    if plan.production is None:
        return Route(None, PRODUCTION, plan.shadows)
    if plan.canaries:
        place, start = bucket(plan.production[0], user_id), 0.0
        for key, share in plan.canaries:
            if start <= place < start + share:
                return Route(key, CANARY_ROLE, plan.shadows)
            start += share
    return Route(plan.production, PRODUCTION, plan.shadows)


# -- automatic rollback ----------------------------------------------------------------

#: Labels a head needs before a version on trial is judged (automatic rollback) or may
#: take its next launch step; ``STREAMREC_LAUNCH_MIN_EXAMPLES`` overrides.
MIN_EXAMPLES = 200

#: How long after an operator promoted it a live version is still on probation: a
#: breach then rolls it back to the version before.  Later, a breach only alerts (the live version has
#: earned its place; rolling back then might return to something worse).
PROBATION_S = 3600.0


@dataclass(frozen=True)
class Verdict:
    """A version on trial that breached its SLO: what to do and the figures why."""
    model: str
    version: str
    state: str
    action: str  # "roll_back" (shadow, canary) or "roll_back_live"
    reason: str
    evidence: dict


def launch_slo(tier: str, min_examples: int) -> SLO:
    """The tier's SLO (:func:`models.registry.slo_for`) with the launch's minimum sample:
    a version is not taken back on a handful of labels."""
    base = slo_for(tier if tier in TIERS else "TIER2")
    return SLO(base.calibration_low, base.calibration_high, base.max_normalized_entropy,
               max(base.min_examples, min_examples), base.min_positives)


def breaches(heads: dict, slo: SLO) -> list[dict]:
    """The heads of one version's stability report that are outside ``slo``, with enough
    labels (``slo.min_examples`` examples and ``slo.min_positives`` positives).

    >>> slo = SLO(min_examples=100)
    >>> breaches({"click": {"n": 99, "rate": 0.2, "calibration": 3.0, "ne": 1.5}}, slo)
    []
    >>> [(b["head"], b["metric"]) for b in breaches(
    ...     {"click": {"n": 400, "rate": 0.2, "calibration": 3.0, "ne": 0.9}}, slo)]
    [('click', 'calibration')]
    """
    out = []
    for alert in violations({"": heads}, slo):
        m = heads[alert["head"]]
        out.append({"head": alert["head"], "metric": alert["metric"],
                    "value": round(alert["value"], 4),
                    "bounds": [round(b, 4) for b in alert["bounds"]], "n": alert["n"],
                    "positives": round(alert["n"] * (m.get("rate") or 0.0))})
    return sorted(out, key=lambda b: (b["head"], b["metric"]))


def judge(records: Iterable[dict], report: dict, now: float, *, min_examples: int = MIN_EXAMPLES,
          probation_s: float = PROBATION_S) -> list[Verdict]:
    """The versions on trial to take back: a shadow or canary, or a live version still on
    probation (promoted by an operator less than ``probation_s`` ago, not held, with an
    earlier live version to return to), whose stability ``report`` (``model:version`` -> head -> figures) breaks its
    tier's SLO on at least ``min_examples`` labels.

    >>> recs = [{"model": "r", "version": "p", "state": "live", "tier": "TIER2",
    ...          "history": [[0, "live"]]},
    ...         {"model": "r", "version": "s", "state": "shadow", "tier": "TIER2"}]
    >>> bad = {"click": {"n": 500, "rate": 0.1, "calibration": 2.9, "ne": 1.3}}
    >>> [(v.version, v.action) for v in judge(recs, {"r:s": bad, "r:p": bad}, now=10.0)]
    [('s', 'roll_back')]
    """
    records = list(records)
    verdicts = []
    for r in records:
        state = r.get("state")
        if state not in (SHADOW, CANARY, LIVE):
            continue
        heads = report.get(f"{r['model']}:{r['version']}")
        if not heads:
            continue
        if state == LIVE:
            # Only a version an operator promoted (a launch's last step) is on probation;
            # the online trainer's own versions are judged by its gate before going live.
            since = float(r.get("promoted") or 0.0)
            earlier = any(o is not r and o.get("model") == r["model"]
                          and o.get("state") in (RETIRED, LIVE)
                          and any(s == LIVE for _, s in o.get("history", []))
                          for o in records)
            if not since or r.get("hold") or now - since > probation_s or not earlier:
                continue
        slo = launch_slo(r.get("tier", "TIER2"), min_examples)
        broken = breaches(heads, slo)
        if not broken:
            continue
        worst = broken[0]
        reason = (f"{worst['head']} {worst['metric'].replace('_', ' ')} {worst['value']:g} "
                  f"outside {worst['bounds'][0]:g}-{worst['bounds'][1]:g} on {worst['n']} "
                  f"labels ({r.get('tier', 'TIER2')} SLO, {state})")
        verdicts.append(Verdict(r["model"], r["version"], state,
                                "roll_back_live" if state == LIVE else "roll_back", reason,
                                {"breaches": broken, "judged_at": now, "state": state,
                                 "slo": {"calibration": [round(slo.calibration_low, 4),
                                                         round(slo.calibration_high, 4)],
                                         "max_ne": round(slo.max_normalized_entropy, 4),
                                         "min_examples": slo.min_examples,
                                         "min_positives": slo.min_positives}}))
    return verdicts


def on_trial(record: dict, now: float, probation_s: float = PROBATION_S) -> bool:
    """A shadow, a canary, or a live version an operator promoted less than
    ``probation_s`` ago: the versions whose stability the registry keeps.

    >>> on_trial({"state": "shadow"}, 0.0), on_trial({"state": "live", "promoted": 5.0}, 9.0)
    (True, True)
    >>> on_trial({"state": "live"}, 9.0), on_trial({"state": "registered"}, 9.0)
    (False, False)
    """
    if record.get("state") in (SHADOW, CANARY):
        return True
    promoted = float(record.get("promoted") or 0.0)
    return record.get("state") == LIVE and promoted > 0 and now - promoted <= probation_s


def figures(heads: dict, at: float) -> dict:
    """A version's stability report (head -> n, rate, calibration, ne) as the registry keeps
    it: the heads that have labels, rounded.

    >>> figures({"click": {"n": 300, "rate": 0.1, "calibration": 1.01234, "ne": 0.9},
    ...          "like": {"n": 0}}, 5.0)
    {'at': 5.0, 'heads': {'click': {'n': 300, 'rate': 0.1, 'calibration': 1.0123, 'ne': 0.9}}}
    """
    return {"at": at, "heads": {h: {k: round(v, 4) if isinstance(v, float) else v
                                    for k, v in m.items()}
                                for h, m in sorted(heads.items()) if m.get("n")}}


def step_check(record: dict, to: str, *, min_examples: int = MIN_EXAMPLES) -> Optional[str]:
    """Why ``record`` may not take its next launch step to ``to`` yet, or None if it may.

    A version leaving shadow or canary for a wider audience must have been judged on its
    stability figures (``record["stability"]``, kept by the stability monitor): at least
    one head with ``min_examples`` labels and enough positives, and no head outside its
    tier's SLO.  Other moves (into shadow; an operator's direct promote of a registered
    or retired version) are not gated here.

    >>> shadow = {"model": "r", "version": "s", "state": "shadow", "tier": "TIER2"}
    >>> step_check(shadow, "canary")
    'r s has no stability figures yet: it must be judged on at least 200 labels in shadow first'
    >>> ok = {"at": 1.0, "heads": {"click": {"n": 400, "rate": 0.1, "calibration": 1.05, "ne": 0.9}}}
    >>> step_check({**shadow, "stability": ok}, "canary") is None
    True
    >>> bad = {"at": 1.0, "heads": {"click": {"n": 400, "rate": 0.1, "calibration": 1.4, "ne": 0.9}}}
    >>> step_check({**shadow, "stability": bad}, "live")
    'r s breaks its TIER2 SLO in shadow: click calibration 1.4 outside 0.8-1.25 on 400 labels'
    """
    if record.get("state") not in (SHADOW, CANARY) or to not in (CANARY, LIVE):
        return None
    name, state = f"{record.get('model')} {record.get('version')}", record["state"]
    heads = (record.get("stability") or {}).get("heads") or {}
    if not heads:
        return (f"{name} has no stability figures yet: it must be judged on at least "
                f"{min_examples} labels in {state} first")
    slo = launch_slo(record.get("tier", "TIER2"), min_examples)
    broken = breaches(heads, slo)
    if broken:
        b = broken[0]
        return (f"{name} breaks its {record.get('tier', 'TIER2')} SLO in {state}: {b['head']} "
                f"{b['metric'].replace('_', ' ')} {b['value']:g} outside "
                f"{b['bounds'][0]:g}-{b['bounds'][1]:g} on {b['n']} labels")
    judged = [h for h, m in heads.items()
              if m.get("n", 0) >= slo.min_examples
              and round(m["n"] * (m.get("rate") or 0.0)) >= slo.min_positives]
    if not judged:
        most = max(int(m.get("n", 0)) for m in heads.values())
        return (f"{name} is not judged yet: {most} labels in {state}, {min_examples} needed "
                f"(with {slo.min_positives} positives)")
    return None


def stability_text(record: dict) -> str:
    """The version's stability figures in one line, or "" when it has none.

    >>> stability_text({"stability": {"at": 0, "heads": {"click": {"n": 400, "rate": 0.1,
    ...                 "calibration": 1.05, "ne": 0.91}}}})
    'click calibration 1.05 NE 0.91 (400 labels)'
    """
    heads = (record.get("stability") or {}).get("heads") or {}
    return "; ".join(f"{h} calibration {m.get('calibration')} NE {m.get('ne')} ({m.get('n')} labels)"
                     for h, m in sorted(heads.items()) if m.get("n"))


def share_text(share: float) -> str:
    """A traffic share as people read it.

    >>> share_text(0.05), share_text(0.125), share_text(1.0)
    ('5%', '12.5%', '100%')
    """
    pct = share * 100.0
    return f"{pct:.0f}%" if math.isclose(pct, round(pct)) else f"{pct:g}%"

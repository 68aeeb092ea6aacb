"""The model registry's rules: tiers, deployment states, transitions, holds, validation
and how records read.  Pure: no Kafka (``stores/model_store.py`` writes the records).

A registry record describes one version of one model::

    {"model": "ranker", "version": "20261123T120000-0000420", "parent": "...",
     "tier": "TIER2", "owner": "streamrec-online-trainer", "state": "live",
     "created": 1795000000.0, "lineage": {...}, "metrics": {...}, "decision": {...},
     "history": [[t, state], ...], "moves": [{"at", "from", "to", "by", "reason"}, ...]}

``history`` keeps ``[time, state]`` pairs (serving reads them); ``moves`` says who
or what moved the version and why.  ``rev`` counts the writes of the record: every
write is a compare-and-set against the revision it was computed from
(:func:`stamp`), so two writers cannot both build on the same record and lose one's
change.  A ``canary`` carries ``traffic_share``, the share of users it serves.  ``hold``, on a live record, says that a
rollback put it there: the trainer's gate may then register versions but not make
them live, until an operator promotes one (:func:`release`).

>>> record = {"model": "ranker", "version": "v2", "state": "registered", "tier": "TIER2",
...           "owner": "me"}
>>> validate_record(record) is record
True
>>> check_transition(record, "rolled_back")
Traceback (most recent call last):
...
models.registry.TransitionError: ranker v2: cannot go from registered to rolled_back (from registered: shadow, canary, live, retired)
>>> TIERS["TIER0"].needs_approval, TIERS["TIER2"].needs_approval
(True, False)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Optional

from models.stability import SLO


@dataclass(frozen=True)
class Tier:
    """What a model's importance drives.

    ``slo_scale`` widens (>1) or narrows (<1) the calibration band around 1 in log
    space; ``max_ne`` is the normalized-entropy limit (1 = no better than the base
    rate).  ``needs_approval``: the gate alone only registers a better version; an
    operator makes it live.  ``shed_rank``: under load, lower ranks are shed first.
    """
    name: str
    meaning: str
    slo_scale: float
    max_ne: float
    needs_approval: bool
    shed_rank: int


#: TIER0 is the most critical.  Strictness and approval fall with the tier; shedding
#: starts from TIER4.
TIERS: dict[str, Tier] = {t.name: t for t in (
    Tier("TIER0", "critical: the main ranking of a main surface; a bad version is an outage",
         slo_scale=0.5, max_ne=0.95, needs_approval=True, shed_rank=4),
    Tier("TIER1", "important: a main surface's supporting models (retrieval, value)",
         slo_scale=0.75, max_ne=0.98, needs_approval=True, shed_rank=3),
    Tier("TIER2", "standard: the default for a model in production",
         slo_scale=1.0, max_ne=1.0, needs_approval=False, shed_rank=2),
    Tier("TIER3", "secondary: small surfaces and auxiliary signals",
         slo_scale=1.25, max_ne=1.0, needs_approval=False, shed_rank=1),
    Tier("TIER4", "experimental: trials and research models, served to few",
         slo_scale=1.5, max_ne=1.02, needs_approval=False, shed_rank=0),
)}

REGISTERED, SHADOW, CANARY, LIVE, RETIRED, ROLLED_BACK = (
    "registered", "shadow", "canary", "live", "retired", "rolled_back")
STATES = (REGISTERED, SHADOW, CANARY, LIVE, RETIRED, ROLLED_BACK)
#: Accepted on input for ``live`` (the state serving reads is ``live``).
STATE_ALIASES = {"production": LIVE}
#: Where each state may go.  A retired version may come back (a promote, or the
#: rollback target); a registered one was never served, so it cannot be rolled back;
#: a live one leaves only by being replaced (retired) or rolled back.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    REGISTERED: (SHADOW, CANARY, LIVE, RETIRED),
    SHADOW: (CANARY, LIVE, RETIRED, ROLLED_BACK),
    CANARY: (LIVE, RETIRED, ROLLED_BACK),
    LIVE: (RETIRED, ROLLED_BACK),
    RETIRED: (SHADOW, CANARY, LIVE),
    ROLLED_BACK: (SHADOW, CANARY, LIVE, RETIRED),
}
#: States whose versions serve traffic or are being tried on it.
SERVING_STATES = (LIVE, SHADOW, CANARY)
REQUIRED_FIELDS = ("model", "version", "state", "tier", "owner")


class TransitionError(ValueError):
    """A deployment state change the rules do not allow."""


class RegistryConflict(RuntimeError):
    """A write computed from a revision of a record that is no longer the newest."""


#: Share of users a canary serves when its record names none.
DEFAULT_CANARY_SHARE = 0.05


def revision(record: Optional[dict]) -> int:
    """How many times the record was written (0: no record, or one from before revisions).

    >>> revision(None), revision({"model": "m"}), revision({"rev": 3})
    (0, 0, 3)
    """
    return int((record or {}).get("rev") or 0)


def record_key(record: dict) -> str:
    """The registry topic's key of a record."""
    return f"{record['model']}/{record['version']}"


def stamp(new: dict, current: Optional[dict], *, overwrite: bool = False) -> dict:
    """``new`` with the revision after ``current`` (the newest record of its key, None for a
    new version), once checked that it was computed from that revision: a record made
    from another (:func:`moved`) carries the revision it was made from.  ``overwrite``
    writes ``new`` whatever is there (a version published anew).

    >>> v1 = {"model": "m", "version": "v", "rev": 1, "state": "registered"}
    >>> stamp(moved(v1 | {"tier": "TIER2", "owner": "o"}, "shadow", by="ann"), v1)["rev"]
    2
    >>> v2 = {**v1, "state": "canary", "rev": 2, "moved_by": "bob"}
    >>> stamp({**v1, "state": "retired"}, v2)
    Traceback (most recent call last):
    ...
    models.registry.RegistryConflict: m v changed since it was read (revision 1, now 2: canary, moved by bob); read it again
    >>> stamp({"model": "m", "version": "new"}, None)["rev"], stamp(v1, v2, overwrite=True)["rev"]
    (1, 3)
    """
    if not overwrite and revision(new) != revision(current):
        state = (current or {}).get("state", "absent")
        who = f", moved by {current['moved_by']}" if current and current.get("moved_by") else ""
        raise RegistryConflict(f"{new.get('model')} {new.get('version')} changed since it was "
                               f"read (revision {revision(new)}, now {revision(current)}: "
                               f"{state}{who}); read it again")
    return {**new, "rev": revision(current) + 1}


def traffic_share(record: dict) -> float:
    """The share of users a canary serves (:data:`DEFAULT_CANARY_SHARE` when unnamed).

    >>> traffic_share({"state": "canary", "traffic_share": 0.2}), traffic_share({})
    (0.2, 0.05)
    """
    share = record.get("traffic_share")
    return DEFAULT_CANARY_SHARE if share is None else float(share)


def tier_of(name: str) -> Tier:
    """The tier called ``name``, or a ValueError that lists the known ones.

    >>> tier_of("TIER5")
    Traceback (most recent call last):
    ...
    ValueError: unknown tier 'TIER5' (known: TIER0, TIER1, TIER2, TIER3, TIER4)
    """
    try:
        return TIERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown tier {name!r} (known: {', '.join(TIERS)})") from None


def state_name(name: str) -> str:
    """``name`` as a registry state (``production`` is ``live``), or a ValueError.

    >>> state_name("production"), state_name("shadow")
    ('live', 'shadow')
    """
    state = STATE_ALIASES.get(name, name)
    if state not in STATES:
        raise ValueError(f"unknown state {name!r} (known: {', '.join(STATES)}; "
                         f"'production' means live)")
    return state


def validate_record(record: dict) -> dict:
    """``record`` unchanged if it can be written to the registry, else a ValueError
    naming what is wrong.

    >>> validate_record({"model": "ranker", "version": "v1", "state": "live", "tier": "T2"})
    Traceback (most recent call last):
    ...
    ValueError: registry record ranker/v1: missing owner
    >>> validate_record({"model": "ranker", "version": "v1", "state": "gone", "tier": "TIER2",
    ...                  "owner": "me"})
    Traceback (most recent call last):
    ...
    ValueError: registry record ranker/v1: unknown state 'gone' (known: registered, shadow, canary, live, retired, rolled_back; 'production' means live)
    """
    if not isinstance(record, dict):
        raise ValueError(f"registry record must be a JSON object, not {type(record).__name__}")
    name = f"{record.get('model', '?')}/{record.get('version', '?')}"
    missing = [f for f in REQUIRED_FIELDS if record.get(f) in (None, "")]
    if missing:
        raise ValueError(f"registry record {name}: missing {', '.join(missing)}")
    for field in ("model", "version", "owner"):
        if not isinstance(record[field], str):
            raise ValueError(f"registry record {name}: {field} must be a string")
    for field in ("type", "surface"):
        if field in record and record[field] is not None and (
                not isinstance(record[field], str) or not record[field].strip()):
            raise ValueError(f"registry record {name}: {field} must be a non-empty string")
    for field in ("model", "version"):
        # Both are parts of the topic key "model/version".
        if "/" in record[field] or record[field].strip() != record[field]:
            raise ValueError(f"registry record {name}: {field} {record[field]!r} may not "
                             f"contain '/' or surrounding spaces")
    if record["state"] not in STATES:
        raise ValueError(f"registry record {name}: unknown state {record['state']!r} "
                         f"(known: {', '.join(STATES)}; 'production' means live)")
    if record["tier"] not in TIERS:
        raise ValueError(f"registry record {name}: unknown tier {record['tier']!r} "
                         f"(known: {', '.join(TIERS)})")
    share = record.get("traffic_share")
    if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float))
                              or not 0.0 < share <= 1.0):
        raise ValueError(f"registry record {name}: traffic_share must be a number in (0, 1], "
                         f"not {share!r}")
    return record


def check_transition(record: dict, new_state: str) -> None:
    """Raise :class:`TransitionError` unless ``record`` may move to ``new_state``.

    Staying in the same state is an update of the record (a hold cleared), not a move.

    >>> check_transition({"model": "m", "version": "v", "state": "live"}, "live")
    >>> check_transition({"model": "m", "version": "v", "state": "live"}, "registered")
    Traceback (most recent call last):
    ...
    models.registry.TransitionError: m v: cannot go from live to registered (from live: retired, rolled_back)
    """
    old = record.get("state")
    new_state = state_name(new_state)
    if old == new_state:
        return
    if old not in TRANSITIONS:
        raise TransitionError(f"{record.get('model')} {record.get('version')}: unknown current "
                              f"state {old!r}")
    if new_state not in TRANSITIONS[old]:
        raise TransitionError(f"{record.get('model')} {record.get('version')}: cannot go from "
                              f"{old} to {new_state} (from {old}: {', '.join(TRANSITIONS[old])})")


def moved(record: dict, state: str, *, by: str, reason: str = "", at: Optional[float] = None,
          evidence: Optional[dict] = None, **changes) -> dict:
    """A new record for ``record`` in ``state``, checked and validated, with the move
    recorded (with ``evidence``, the figures that moved it, when given).  A change whose
    value is None removes that field (e.g. ``hold=None``).

    >>> r = {"model": "m", "version": "v", "state": "registered", "tier": "TIER2",
    ...      "owner": "me", "history": [[1.0, "registered"]]}
    >>> new = moved(r, "live", by="operator", reason="promoted", at=2.0)
    >>> new["history"], new["moves"][-1]["from"], new["reason"]
    ([[1.0, 'registered'], [2.0, 'live']], 'registered', 'promoted')
    """
    check_transition(record, state)
    state = state_name(state)
    at = time.time() if at is None else at
    new = {**record, **changes, "state": state, "moved_by": by, "reason": reason}
    new = {k: v for k, v in new.items() if not (k in changes and v is None)}
    if state != LIVE:
        # A hold means "the live version stays until a promote": it leaves with live.
        new.pop("hold", None)
    if state != CANARY:
        new.pop("traffic_share", None)
    if state != record.get("state"):
        new["history"] = list(record.get("history", [])) + [[at, state]]
    move = {"at": at, "from": record.get("state"), "to": state, "by": by, "reason": reason}
    if evidence is not None:
        move["evidence"] = evidence
    new["moves"] = list(record.get("moves", [])) + [move]
    return validate_record(new)


def registration(model: str, version: str, *, owner: str, tier: str, type: str,
                 surface: str, parent: Optional[str] = None, lineage: Optional[dict] = None,
                 source: str = "", by: str = "operator", at: Optional[float] = None) -> dict:
    """The record of a version an operator registers (``streamrec models register``): in
    state ``registered``, with its type, surface, tier and owner, who registered it and
    from what (``source``), validated (an unknown tier is refused with the known ones).

    >>> r = registration("ranker", "v9", owner="ann", tier="TIER1", type="explore_mtml",
    ...                  surface="explore", parent="v8", source="checkpoint c.pt", at=5.0)
    >>> r["state"], r["registered_by"], r["reason"], r["history"]
    ('registered', 'operator', 'registered by operator from checkpoint c.pt', [[5.0, 'registered']])
    >>> registration("ranker", "v9", owner="ann", tier="TIER9", type="t", surface="s")
    Traceback (most recent call last):
    ...
    ValueError: registry record ranker/v9: unknown tier 'TIER9' (known: TIER0, TIER1, TIER2, TIER3, TIER4)
    """
    at = time.time() if at is None else at
    reason = f"registered by {by}" + (f" from {source}" if source else "")
    return validate_record({
        "model": model, "version": version, "parent": parent, "type": type,
        "surface": surface, "tier": tier, "owner": owner, "state": REGISTERED,
        "created": at, "registered_by": by, "reason": reason, "lineage": lineage or {},
        "history": [[at, REGISTERED]],
        "moves": [{"at": at, "from": None, "to": REGISTERED, "by": by, "reason": reason}]})


def hold_for_rollback(rolled_back_version: str, at: float, by: str = "operator") -> dict:
    """The hold a rollback leaves on the version it makes live."""
    return {"since": at, "by": by, "rolled_back": rolled_back_version,
            "reason": f"rollback of {rolled_back_version}"}


def release(candidate: dict, live: Optional[dict]) -> dict:
    """The record the gate's candidate is written as.

    The gate may say ``live``; it still goes ``registered`` when the model's live
    version holds a rollback (until an operator promotes a version), or when its
    tier needs an operator's approval.  The gate's own decision stays in the record.

    >>> cand = {"model": "m", "version": "v3", "state": "live", "tier": "TIER2", "owner": "t"}
    >>> release(cand, None)["state"]
    'live'
    >>> held = {"model": "m", "version": "v1", "state": "live",
    ...         "hold": hold_for_rollback("v2", 1.0)}
    >>> release(cand, held)["reason"]
    'held by a rollback: rollback of v2 (v1 stays live until an operator promotes a version)'
    >>> waiting = release({**cand, "tier": "TIER1", "history": [[5.0, "live"]]}, None)
    >>> waiting["state"], waiting["reason"], waiting["history"]
    ('registered', 'awaiting approval (TIER1)', [[5.0, 'registered']])
    """
    if candidate.get("state") != LIVE:
        return candidate
    if live is not None and live.get("hold"):
        return _registered(candidate, f"held by a rollback: {live['hold'].get('reason', 'rollback')} "
                           f"({live['version']} stays live until an operator promotes a version)")
    tier = tier_of(candidate.get("tier"))
    if tier.needs_approval:
        return _registered(candidate, f"awaiting approval ({tier.name})")
    return candidate


def _registered(candidate: dict, reason: str) -> dict:
    # Its history must not say live: rollback and serving read "live" entries there.
    history = [[t, REGISTERED if state == LIVE else state]
               for t, state in candidate.get("history", [])]
    return {**candidate, "state": REGISTERED, "reason": reason, "history": history}


def slo_for(tier: str, base: SLO = SLO()) -> SLO:
    """The stability SLO of a model of ``tier``: the base band scaled in log space.

    >>> s = slo_for("TIER0")
    >>> round(s.calibration_low, 3), round(s.calibration_high, 3), s.max_normalized_entropy
    (0.894, 1.118, 0.95)
    >>> slo_for("TIER2") == SLO()
    True
    """
    t = tier_of(tier)
    return SLO(calibration_low=math.exp(t.slo_scale * math.log(base.calibration_low))
               if t.slo_scale != 1.0 else base.calibration_low,
               calibration_high=math.exp(t.slo_scale * math.log(base.calibration_high))
               if t.slo_scale != 1.0 else base.calibration_high,
               max_normalized_entropy=base.max_normalized_entropy * t.max_ne,
               min_examples=base.min_examples, min_positives=base.min_positives)


def shed_order(records: Iterable[dict]) -> list[dict]:
    """Models in the order to shed them under load: least critical tier first.

    >>> [r["model"] for r in shed_order([{"model": "a", "tier": "TIER0"},
    ...                                  {"model": "b", "tier": "TIER4"},
    ...                                  {"model": "c", "tier": "TIER2"}])]
    ['b', 'c', 'a']
    """
    return sorted(records, key=lambda r: tier_of(r.get("tier")).shed_rank)


def stability_key(record: dict) -> str:
    """How the stability monitor names a version (serving's ``model:version``)."""
    return f"{record['model']}:{record['version']}"


def watched_versions(records: Iterable[dict]) -> set[str]:
    """The versions whose stability is worth keeping: those that serve or are tried on
    traffic (live, shadow, canary) and each model's newest registered one (the next
    candidate).  Retired, rolled back and superseded registered versions are dropped.

    >>> watched_versions([
    ...     {"model": "m", "version": "v1", "state": "retired", "created": 1},
    ...     {"model": "m", "version": "v2", "state": "live", "created": 2},
    ...     {"model": "m", "version": "v3", "state": "registered", "created": 3},
    ...     {"model": "m", "version": "v4", "state": "registered", "created": 4},
    ...     {"model": "m", "version": "v5", "state": "rolled_back", "created": 5}]) == {
    ...     "m:v2", "m:v4"}
    True
    """
    keep, newest_registered = set(), {}
    for r in records:
        if r.get("state") in SERVING_STATES:
            keep.add(stability_key(r))
        elif r.get("state") == REGISTERED:
            best = newest_registered.get(r["model"])
            if best is None or _created(r) > _created(best):
                newest_registered[r["model"]] = r
    return keep | {stability_key(r) for r in newest_registered.values()}


def _created(record: dict) -> tuple:
    return (float(record.get("created") or 0.0), record.get("version", ""))


def filter_records(records: Iterable[dict], *, model: Optional[str] = None,
                   tier: Optional[str] = None, state: Optional[str] = None,
                   surface: Optional[str] = None, type: Optional[str] = None) -> list[dict]:
    """Records of ``model``, ``tier``, ``state``, ``surface`` and ``type`` (each optional),
    oldest first within a model.

    >>> rs = [{"model": "m", "version": "v1", "tier": "TIER2", "state": "live"},
    ...       {"model": "m", "version": "v2", "tier": "TIER2", "state": "registered",
    ...        "surface": "reels", "type": "reels_mtml"}]
    >>> [r["version"] for r in filter_records(rs, state="production")]
    ['v1']
    >>> [r["version"] for r in filter_records(rs, surface="reels", type="reels_mtml")]
    ['v2']
    """
    tier = tier_of(tier).name if tier else None
    state = state_name(state) if state else None
    return sorted((r for r in records
                   if (model is None or r.get("model") == model)
                   and (tier is None or r.get("tier") == tier)
                   and (state is None or r.get("state") == state)
                   and (surface is None or r.get("surface") == surface)
                   and (type is None or r.get("type") == type)),
                  key=lambda r: (r.get("model", ""), _created(r)))


def _why(record: dict) -> str:
    """The one-line reason a version is in its state."""
    if record.get("hold"):
        return f"live; {record['hold'].get('reason', 'rollback')} holds it until a promote"
    if record.get("reason"):
        return record["reason"]
    return (record.get("decision") or {}).get("reason", "")


def _cell(value, width: int) -> str:
    text = "-" if value in (None, "") else str(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def format_table(records: Iterable[dict], reason_width: int = 70) -> str:
    """Records as an aligned table, one version a row, with why it is in its state.

    >>> print(format_table([{"model": "ranker", "version": "v1", "state": "live", "tier": "TIER2",
    ...                      "owner": "trainer", "created": 0, "lineage": {"examples_seen": 500},
    ...                      "decision": {"reason": "beats the base rate"}}]))
    MODEL   VERSION  STATE  TIER   SURFACE  TYPE  OWNER    PARENT  EXAMPLES  CREATED           WHY
    ranker  v1       live   TIER2  -        -     trainer  -       500       1970-01-01 00:00  beats the base rate
    >>> print(format_table([{"model": "r", "version": "v2", "state": "canary", "tier": "TIER2",
    ...                      "surface": "reels", "type": "reels_mtml", "owner": "o",
    ...                      "traffic_share": 0.05, "reason": "canary by ann"}]))
    MODEL  VERSION  STATE      TIER   SURFACE  TYPE        OWNER  PARENT  EXAMPLES  CREATED  WHY
    r      v2       canary 5%  TIER2  reels    reels_mtml  o      -       -         -        canary by ann
    """
    rows = [("MODEL", "VERSION", "STATE", "TIER", "SURFACE", "TYPE", "OWNER", "PARENT",
             "EXAMPLES", "CREATED", "WHY")]
    for r in records:
        created = r.get("created")
        state = r.get("state")
        if state == CANARY:
            state = f"canary {traffic_share(r) * 100:g}%"
        rows.append((r.get("model"), r.get("version"), state, r.get("tier"),
                     _cell(r.get("surface"), 16), _cell(r.get("type"), 24),
                     _cell(r.get("owner"), 24), r.get("parent"),
                     (r.get("lineage") or {}).get("examples_seen"),
                     time.strftime("%Y-%m-%d %H:%M", time.gmtime(created))
                     if created is not None else None,
                     _cell(_why(r), reason_width)))
    if len(rows) == 1:
        return "no versions match"
    cells = [[_cell(v, 200) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in cells)


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(t))) if t is not None else "-"


def format_detail(record: dict) -> str:
    """One version in full: identity, why it is in its state, the gate's evidence,
    lineage and every move.

    >>> print(format_detail({"model": "m", "version": "v2", "state": "registered",
    ...     "tier": "TIER1", "owner": "t", "parent": "v1", "created": 60,
    ...     "reason": "awaiting approval (TIER1)", "lineage": {"examples_seen": 900, "step": 12},
    ...     "decision": {"go_live": True, "reason": "weighted NE 0.7 beats v1 (0.8)",
    ...                  "evidence": {"n": 900, "heads": {"click": {
    ...                      "candidate": {"ne": 0.7, "calibration": 1.01},
    ...                      "live": {"ne": 0.8, "calibration": 1.1}}}}},
    ...     "history": [[60, "registered"]]}))
    m v2: registered (TIER1, approval needed to go live)
      owner      t
      parent     v1
      created    1970-01-01 00:01:00
      why        awaiting approval (TIER1)
      gate       go live: weighted NE 0.7 beats v1 (0.8)
        click    NE 0.7 (live 0.8)  calibration 1.01 (live 1.1)
      lineage    examples_seen=900 step=12
      history
        1970-01-01 00:01:00  registered
    """
    tier = TIERS.get(record.get("tier"))
    approval = ", approval needed to go live" if tier and tier.needs_approval else ""
    lines = [f"{record.get('model')} {record.get('version')}: {record.get('state')} "
             f"({record.get('tier')}{approval})"]

    def row(label: str, value) -> None:
        lines.append(f"  {label:10s} {value}")

    row("owner", record.get("owner", "-"))
    for field in ("type", "surface"):
        if record.get(field):
            row(field, record[field])
    row("parent", record.get("parent") or "-")
    row("created", _when(record.get("created")))
    if _why(record) != (record.get("decision") or {}).get("reason"):
        row("why", _why(record) or "-")
    if record.get("hold"):
        hold = record["hold"]
        row("hold", f"since {_when(hold.get('since'))} by {hold.get('by', '-')}: "
                    f"{hold.get('reason', '')}; the gate cannot make a newer version live")
    decision = record.get("decision") or {}
    if decision:
        verdict = "go live" if decision.get("go_live") else (
            "stay registered" if decision.get("decided") else "no decision yet")
        row("gate", f"{verdict}: {decision.get('reason', '')}")
        for head, sides in sorted(((decision.get("evidence") or {}).get("heads") or {}).items()):
            cand, live = sides.get("candidate") or {}, sides.get("live") or {}
            text = f"NE {cand.get('ne', '-')}"
            if live:
                text += f" (live {live.get('ne', '-')})"
            text += f"  calibration {cand.get('calibration', '-')}"
            if live:
                text += f" (live {live.get('calibration', '-')})"
            lines.append(f"    {head:8s} {text}")
    if record.get("traffic_share") is not None:
        row("share", f"{record['traffic_share']:.4g} of users (canary)")
    for head, m in sorted(((record.get("stability") or {}).get("heads") or {}).items()):
        lines.append(f"  {'stability' if head == min(record['stability']['heads']) else '':10s} "
                     f"{head:8s} calibration {m.get('calibration', '-')}  NE {m.get('ne', '-')}"
                     f"  ({m.get('n', 0)} labels, at {_when(record['stability'].get('at'))})")
    lineage = record.get("lineage") or {}
    if lineage:
        row("lineage", " ".join(f"{k}={v}" for k, v in lineage.items()))
    if record.get("metrics"):
        row("metrics", " ".join(f"{k}={v}" for k, v in record["metrics"].items()))
    lines.append("  history")
    moves = record.get("moves") or []
    for t, state in record.get("history", []):
        move = next((m for m in moves if m.get("to") == state and m.get("at") == t), None)
        tail = f"  by {move['by']}: {move['reason']}" if move and move.get("reason") else (
            f"  by {move['by']}" if move else "")
        lines.append(f"    {_when(t)}  {state}{tail}")
    return "\n".join(lines)

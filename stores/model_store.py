"""Model weights as Kafka messages: chunked, checksummed, versioned.

Weights must reach every worker and outlive any one machine, so a published
version is written to the compacted ``models.weights`` topic as chunks and a
manifest (written last, with the SHA-256 of the whole), and described in the
``models.registry`` topic.  :class:`WeightAssembler` rebuilds a version from
its chunks on the reading side and refuses anything incomplete or corrupt.

Weights travel as float16 (half the bytes; scores differ in the 3rd-4th
decimal) and load back as float32.  A version is a full snapshot or, when the
publisher passes a :class:`WeightDeltas`, a delta on the last full snapshot
(:mod:`models.weight_delta`: only the embedding rows that changed); its manifest
says which (``kind``, ``base``), and retention never drops a base a kept delta
needs (:func:`weights_to_drop`).

>>> a = WeightAssembler()
>>> parts = split(b"x" * 10, chunk_bytes=4)
>>> for n, p in enumerate(parts): a.add_part("m", "v1", n, p)
>>> a.add_manifest("m", "v1", manifest_for(b"x" * 10, len(parts)))
b'xxxxxxxxxx'
"""
from __future__ import annotations

import hashlib
import io
from typing import Callable, Optional

import torch

from models import weight_delta
from models.registry import (LIVE, RETIRED, ROLLED_BACK, hold_for_rollback, moved,
                             record_key, release, stamp, validate_record)
from streams.kafka_config import client_config

CHUNK_BYTES = 900_000
#: The model's tensors in a serving state; every other key is plain data.
NETS = ("tower", "ranker", "calibration")
DELTA_FORMAT = "streamrec.weights.delta/1"
#: Every registry writer uses this transactional id: a writer that starts fences the
#: one before it (Kafka's transaction coordinator), so writes are serialised.
REGISTRY_WRITER_ID = "streamrec.models.registry.writer"


def split(blob: bytes, chunk_bytes: int = CHUNK_BYTES) -> list[bytes]:
    return [blob[i:i + chunk_bytes] for i in range(0, len(blob), chunk_bytes)] or [b""]


def manifest_for(blob: bytes, parts: int) -> dict:
    return {"parts": parts, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def serving_state(trainer) -> dict:
    """The weights serving needs (no optimiser state), embedding tables and layers as
    float16.  A version loaded back gives the same state bit for bit (float16 values
    are exact in float32), so a reader can rebuild a delta on the model it serves."""
    state = trainer.state_dict()
    state.pop("optimizers", None)
    for net in ("tower", "ranker"):
        state[net] = {k: v.half() if v.is_floating_point() else v for k, v in state[net].items()}
    return state


def state_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def serving_bytes(trainer) -> bytes:
    """:func:`serving_state` as bytes: a full snapshot."""
    return state_bytes(serving_state(trainer))


def _load(blob: bytes) -> dict:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def trainer_from_state(state: dict, frozen: bool = True):
    """A :class:`models.training.Trainer` from a :func:`serving_state` (frozen for
    serving; the trainer resumes from an unfrozen one with fresh optimiser state)."""
    from dataclasses import asdict

    from models.mtml import RankerConfig
    from models.training import Trainer
    from models.two_tower import TowerConfig
    state = dict(state)
    for net in ("tower", "ranker"):
        state[net] = {k: v.float() if v.is_floating_point() else v for k, v in state[net].items()}
    ranker_cfg = dict(state["ranker_config"])
    ranker_cfg["hidden"] = tuple(ranker_cfg["hidden"])
    trainer = Trainer(TowerConfig(**state["tower_config"]), RankerConfig(**ranker_cfg),
                      **state["settings"])
    trainer.load_state_dict({**state, "ranker_config": asdict(trainer.ranker.config)})
    return trainer.frozen_copy() if frozen else trainer


def trainer_from_bytes(blob: bytes, frozen: bool = True):
    """:func:`trainer_from_state` of :func:`serving_bytes` output."""
    return trainer_from_state(_load(blob), frozen)


def _tensors(state: dict) -> dict:
    """A serving state's tensors, flat: ``tower.user_id.weight`` ..."""
    return {f"{net}.{k}": v for net in NETS for k, v in state[net].items()}


def _meta(state: dict) -> dict:
    return {k: v for k, v in state.items() if k not in NETS}


def rebuild(base_state: Optional[dict], payload: bytes, manifest: dict) -> dict:
    """The serving state of a delta version (``payload`` and ``manifest`` as published),
    rebuilt on its base's state; checked against the manifest.  Raises
    :class:`models.weight_delta.MissingBase` when the base is None (not here)."""
    base = manifest.get("base")
    if base_state is None:
        raise weight_delta.MissingBase(f"a delta on version {base}, whose weights are not here")
    body = _load(payload)
    if body.get("format") != DELTA_FORMAT or body.get("base") != base:
        raise ValueError(f"not a weight delta on version {base} (format {body.get('format')!r}, "
                         f"base {body.get('base')!r})")
    if body["delta"]["sha256"] != manifest.get("state_sha256"):
        raise ValueError("the delta's weights do not match their manifest")
    tensors = weight_delta.apply(_tensors(base_state), body["delta"])
    state = {**body["meta"], **{net: {} for net in NETS}}
    for name, t in tensors.items():
        net, key = name.split(".", 1)
        state[net][key] = t
    return state


class WeightDeltas:
    """The publisher's side of deltas: which snapshot the next version is a delta on.

    A version is a full snapshot when it is the first, every ``full_every``-th, when
    the last full snapshot's weights are no longer published, or when a delta would not
    be smaller; otherwise a delta on the last full snapshot (not on the version before:
    a reader then needs two versions at most, and retention keeps one base per delta).
    ``full_every=1`` publishes full snapshots only.
    """

    def __init__(self, full_every: int = 10):
        if full_every < 1:
            raise ValueError(f"full_every must be at least 1, not {full_every}")
        self.full_every = full_every
        #: (version, flat tensors, fingerprint) of the last full snapshot published.
        self.base: Optional[tuple[str, dict, str]] = None
        self.deltas_since_full = 0

    def encode(self, version: str, blob: bytes, published) -> tuple[bytes, dict]:
        """(payload, manifest fields) for ``version`` whose full snapshot is ``blob``;
        ``published``: the versions whose weights are in the topic now."""
        state = _load(blob)
        tensors = _tensors(state)
        # The base must still be published, as this publisher wrote it.
        if (self.base is not None and self.base[0] in published
                and published[self.base[0]].get("state_sha256", self.base[2]) == self.base[2]
                and self.deltas_since_full + 1 < self.full_every):
            base_version, base_tensors, base_sha = self.base
            d = weight_delta.diff(base_tensors, tensors, base_sha256=base_sha)
            payload = state_bytes({"format": DELTA_FORMAT, "base": base_version,
                                   "meta": _meta(state), "delta": d})
            if len(payload) < len(blob):
                self.deltas_since_full += 1
                return payload, {"kind": "delta", "base": base_version, "state_sha256": d["sha256"]}
        fingerprint = weight_delta.fingerprint(tensors)
        # Remembered as written, so the next delta is made on what readers will have.
        self.base, self.deltas_since_full = (version, tensors, fingerprint), 0
        return blob, {"kind": "full", "state_sha256": fingerprint}


class Weights(bytes):
    """A version's payload as assembled, with its ``manifest`` (``kind`` ``delta`` names
    its ``base``; no ``kind``, or ``full``, is a full snapshot)."""
    manifest: dict

    @property
    def base(self) -> Optional[str]:
        """The version this one is a delta on; None for a full snapshot."""
        return self.manifest.get("base") if self.manifest.get("kind") == "delta" else None


class WeightAssembler:
    """Collects chunks per (model, version); returns the payload (:class:`Weights`) once
    it is whole and sound."""

    def __init__(self):
        self.parts: dict[tuple[str, str], dict[int, bytes]] = {}
        self.manifests: dict[tuple[str, str], dict] = {}

    def add_part(self, model: str, version: str, n: int, data: bytes) -> Optional[Weights]:
        self.parts.setdefault((model, version), {})[n] = data
        return self._complete(model, version)

    def add_manifest(self, model: str, version: str, manifest: dict) -> Optional[Weights]:
        self.manifests[(model, version)] = manifest
        return self._complete(model, version)

    def add_message(self, key: str, value: Optional[bytes]) -> Optional[Weights]:
        """Add one ``models.weights`` message (``model/version/part-N`` or
        ``model/version/manifest``; None is a tombstone, which forgets the version);
        returns the version's blob once it is whole and sound."""
        import orjson
        model, version, part = key.split("/", 2)
        if value is None:
            self.forget(model, version)
            return None
        if part == "manifest":
            return self.add_manifest(model, version, orjson.loads(value))
        return self.add_part(model, version, int(part.split("-")[1]), value)

    def forget(self, model: str, version: str) -> None:
        self.parts.pop((model, version), None)
        self.manifests.pop((model, version), None)

    def _complete(self, model: str, version: str) -> Optional[Weights]:
        manifest = self.manifests.get((model, version))
        parts = self.parts.get((model, version), {})
        if manifest is None or len(parts) < manifest["parts"]:
            return None
        blob = b"".join(parts[i] for i in range(manifest["parts"]))
        self.forget(model, version)
        if len(blob) != manifest["bytes"] or hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
            raise ValueError(f"{model} {version}: weights do not match their manifest")
        weights = Weights(blob)
        weights.manifest = manifest
        return weights


def publish(bootstrap: str, model: str, version: str, blob: bytes, record: dict,
            keep_versions: int = 3, *, gate: bool = False,
            deltas: Optional[WeightDeltas] = None) -> dict:
    """Write a version's chunks, then its manifest, then its registry record.

    ``blob`` is the version's full snapshot (:func:`serving_bytes`); with ``deltas``
    the version may go out as a delta on the last full snapshot instead
    (:meth:`WeightDeltas.encode`).  The manifest goes last so readers never assemble
    a version with missing parts; the registry record goes after it so nobody is
    told to serve weights that are not there yet.  A record with state ``live``
    retires the model's other live versions (see :func:`retired_by`).  Versions
    beyond the newest ``keep_versions`` are tombstoned (their weights leave the
    topic; their registry records stay, as history), except the live version and
    the one live before it (what a rollback returns to), those on trial or an
    operator's, and the full snapshot any kept delta is built on
    (:func:`weights_to_drop`): versions the gate keeps registered must not push the
    served weights out.

    The record and the retirements it causes are one registry write
    (:func:`write_registry`); with ``gate`` the record is first passed through
    :func:`models.registry.release` against the live version read in that write, so
    a rollback's hold made a moment before is never missed.  Returns the record as
    written.
    """
    from schemas.topics import MODEL_WEIGHTS
    validate_record(record)
    if (record["model"], record["version"]) != (model, version):
        raise ValueError(f"registry record {record['model']}/{record['version']} published as "
                         f"{model}/{version}")
    manifests = published_manifests(bootstrap, model)
    payload, fields = blob, {}
    if deltas is not None:
        payload, fields = deltas.encode(version, blob, manifests)
    producer, manifests[version] = _write_weights(bootstrap, model, version, payload, fields)
    written = write_registry(bootstrap, lambda registry: published_records(
        registry, record, gate=gate), overwrite=(record_key(record),))
    registry = read_registry(bootstrap)
    manifests = dict(sorted(manifests.items()))
    for old in weights_to_drop(manifests, keep_versions, protected_versions(registry, model)):
        for n in range(manifests[old]["parts"]):
            producer.produce(MODEL_WEIGHTS, key=f"{model}/{old}/part-{n:04d}".encode(),
                             value=None)
        producer.produce(MODEL_WEIGHTS, key=f"{model}/{old}/manifest".encode(), value=None)
    producer.flush(30)
    return written[0]


def weights_to_drop(manifests: dict[str, dict], keep_versions: int,
                    protected: set[str]) -> list[str]:
    """Versions whose weights may leave the topic (a delta before its base): all but the
    newest ``keep_versions`` of ``manifests`` (oldest first) and ``protected``, and never
    the base a kept delta is built on (nor that base's base).

    >>> m = {"v1": {"kind": "full"}, "v2": {"kind": "delta", "base": "v1"},
    ...      "v3": {"kind": "full"}, "v4": {"kind": "delta", "base": "v3"},
    ...      "v5": {"kind": "delta", "base": "v3"}, "v6": {"kind": "delta", "base": "v3"}}
    >>> weights_to_drop(m, 3, set())
    ['v2', 'v1']
    >>> weights_to_drop(m, 3, {"v2"}), weights_to_drop(m, 1, set())
    ([], ['v5', 'v4', 'v2', 'v1'])
    """
    names = list(manifests)
    kept = (set(names[-keep_versions:]) if keep_versions > 0 else set()) | (
        protected & set(names))
    todo = list(kept)
    while todo:
        manifest = manifests[todo.pop()]
        base = manifest.get("base") if manifest.get("kind") == "delta" else None
        if base is not None and base in manifests and base not in kept:
            kept.add(base)
            todo.append(base)
    return [v for v in reversed(names) if v not in kept]


def _write_weights(bootstrap: str, model: str, version: str, blob: bytes,
                   fields: Optional[dict] = None):
    """A version's chunks, then its manifest (with ``fields``: a delta's ``kind`` and
    ``base``), so readers never assemble a version with missing parts; returns the
    producer, flushed, and the manifest."""
    import orjson
    from confluent_kafka import Producer

    from schemas.topics import MODEL_WEIGHTS
    producer = Producer(client_config(bootstrap, {"enable.idempotence": True, "linger.ms": 5}))
    parts = split(blob)
    for n, part in enumerate(parts):
        producer.produce(MODEL_WEIGHTS, key=f"{model}/{version}/part-{n:04d}".encode(), value=part)
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError(f"{model} {version}: weight chunks not delivered")
    manifest = {**manifest_for(blob, len(parts)), **(fields or {})}
    producer.produce(MODEL_WEIGHTS, key=f"{model}/{version}/manifest".encode(),
                     value=orjson.dumps(manifest))
    if producer.flush(30):
        raise RuntimeError(f"{model} {version}: manifest not delivered")
    return producer, manifest


def published_records(registry: dict[str, dict], record: dict, *, gate: bool = False) -> list[dict]:
    """What publishing ``record`` writes, given the registry now: the record (passed
    through :func:`models.registry.release` with ``gate``), then, when it is live, every
    other live version of its model retired.

    >>> reg = {"m/v1": {"model": "m", "version": "v1", "state": "live", "tier": "TIER2",
    ...                 "owner": "o", "rev": 4, "hold": {"reason": "rollback of v0"}}}
    >>> new = {"model": "m", "version": "v2", "state": "live", "tier": "TIER2", "owner": "o"}
    >>> [(r["version"], r["state"]) for r in published_records(reg, new, gate=True)]
    [('v2', 'registered')]
    >>> [(r["version"], r["state"], r.get("rev")) for r in published_records(reg, new)]
    [('v2', 'live', None), ('v1', 'retired', 4)]
    """
    if gate:
        live = live_records(registry, record["model"])
        record = release(record, live[-1] if live else None)
    out = [validate_record(record)]
    if record.get("state") == LIVE:
        out += retired_by(registry, record)
    return out

def publish_candidate(bootstrap: str, model: str, version: str, blob: bytes,
                      record: dict, *, deltas: Optional[WeightDeltas] = None) -> dict:
    """Publish a version the online trainer's gate judged; returns the record as written.

    The gate may say ``live``; the version is still written ``registered`` while a
    rollback holds the model, or when its tier needs an operator's approval
    (:func:`models.registry.release`).
    """
    return publish(bootstrap, model, version, blob, record, gate=True, deltas=deltas)


def live_since(record: dict) -> float:
    """When the version last became live (its newest ``live`` history entry; else created).

    Serving breaks a tie between two live versions by this, never by name.

    >>> live_since({"created": 5.0, "history": [[5.0, "registered"], [9.0, "live"]]})
    9.0
    """
    return max((float(t) for t, state in record.get("history", []) if state == "live"),
               default=float(record.get("created", 0.0)))


def live_records(registry: dict[str, dict], model: str) -> list[dict]:
    """The model's versions in state ``live``, the one made live last at the end."""
    return sorted((r for r in registry.values() if r["model"] == model and r["state"] == "live"),
                  key=live_since)


def previous_live(registry: dict[str, dict], model: str) -> Optional[dict]:
    """The version that was live before the current one: where a rollback returns to.

    >>> registry = {"m/a": {"model": "m", "version": "a", "state": "retired",
    ...                     "history": [[1.0, "live"], [2.0, "retired"]]},
    ...             "m/b": {"model": "m", "version": "b", "state": "live", "history": [[2.0, "live"]]},
    ...             "m/c": {"model": "m", "version": "c", "state": "registered", "history": []}}
    >>> previous_live(registry, "m")["version"]
    'a'
    """
    current = live_records(registry, model)
    current_key = current[-1]["version"] if current else None
    before = [r for r in registry.values() if r["model"] == model and r["version"] != current_key
              and r["state"] in ("live", "retired")
              and any(state == "live" for _, state in r.get("history", []))]
    return max(before, key=live_since) if before else None


def protected_versions(registry: dict[str, dict], model: str) -> set[str]:
    """Versions whose weights must stay: every live one, the rollback target, those on
    trial (shadow, canary) and those an operator registered (``streamrec models
    register``) until they are retired.

    >>> protected_versions({
    ...     "m/a": {"model": "m", "version": "a", "state": "live", "history": [[1, "live"]]},
    ...     "m/b": {"model": "m", "version": "b", "state": "shadow"},
    ...     "m/c": {"model": "m", "version": "c", "state": "registered", "registered_by": "ann"},
    ...     "m/d": {"model": "m", "version": "d", "state": "registered"}}, "m") == {"a", "b", "c"}
    True
    """
    from models.registry import CANARY, REGISTERED, SHADOW
    keep = {r["version"] for r in live_records(registry, model)}
    keep |= {r["version"] for r in registry.values() if r["model"] == model and (
        r["state"] in (SHADOW, CANARY) or (r["state"] == REGISTERED and r.get("registered_by")))}
    previous = previous_live(registry, model)
    return keep | ({previous["version"]} if previous else set())


def retired_by(registry: dict[str, dict], record: dict) -> list[dict]:
    """Every other live version of ``record``'s model, ``retired``: one version is live."""
    return [moved(r, RETIRED, by="registry", reason=f"replaced by {record['version']}",
                  retired_by=record["version"], hold=None)
            for r in live_records(registry, record["model"]) if r["version"] != record["version"]]


def _current(registry: dict[str, dict], record: dict) -> dict:
    """The registry's newest record of ``record``'s version (a caller's copy may be stale)."""
    key = f"{record['model']}/{record['version']}"
    if key not in registry:
        raise RuntimeError(f"no version {record['version']!r} of {record['model']!r} in the "
                           f"registry")
    return registry[key]


def promote(bootstrap: str, record: dict, by: str = "operator", *, to: str = LIVE,
            traffic_share: Optional[float] = None, force: bool = False,
            min_examples: Optional[int] = None) -> dict:
    """Make ``record``'s version live (an operator's decision) and retire the one it replaces;
    or, with ``to``, move it to ``shadow`` or ``canary`` (``traffic_share`` of the users).

    Promoting to live clears a rollback's hold; promoting the held live version itself
    only clears the hold.  A version leaving shadow or canary must have passed its
    stability figures (:func:`models.launch.step_check`; ``force`` steps anyway and
    says so in the reason); the figures go into the move as its evidence.  Decided and
    written in one registry write, on the registry as it is then.
    """
    from models.launch import MIN_EXAMPLES, step_check
    from models.registry import CANARY, state_name
    to = state_name(to)
    if record["version"] not in dict(published_versions(bootstrap, record["model"])):
        raise RuntimeError(f"{record['model']} {record['version']}: its weights are no longer "
                           f"published")

    def change(registry: dict[str, dict]) -> list[dict]:
        import time
        current = _current(registry, record)
        refusal = step_check(current, to, min_examples=min_examples or MIN_EXAMPLES)
        if refusal and not force:
            raise RuntimeError(f"{refusal} (--force steps anyway)")
        forced = f" (forced: {refusal})" if refusal else ""
        evidence = ({"stability": current["stability"]} if current.get("stability")
                    and current["state"] != to else None)
        if to != LIVE:
            if current["state"] == LIVE:
                raise RuntimeError(f"{current['model']} {current['version']} is live: it cannot "
                                   f"go back to {to}")
            if current["state"] == to and (to != CANARY or traffic_share is None):
                raise RuntimeError(f"{current['model']} {current['version']} is already {to}")
            share = {"traffic_share": traffic_share} if to == CANARY and traffic_share else {}
            what = f"{to} ({share['traffic_share']:.0%} of users)" if share else to
            return [moved(current, to, by=by, reason=f"{what} by {by}{forced}",
                          evidence=evidence, **share)]
        if current["state"] == LIVE:
            if not current.get("hold"):
                raise RuntimeError(f"{current['model']} {current['version']} is already live")
            return [moved(current, LIVE, by=by,
                          reason=f"promoted by {by}: {current['hold'].get('reason')} released",
                          promoted=time.time(), hold=None)]
        # Marked, so the registry tells an operator's choice from the gate's.
        new = moved(current, LIVE, by=by, reason=f"promoted by {by}{forced}",
                    promoted=time.time(), hold=None, evidence=evidence)
        return [new] + retired_by(registry, new)

    return write_registry(bootstrap, change)[0]


def rollback(bootstrap: str, model: str, by: str = "operator", *, reason: str = "",
             evidence: Optional[dict] = None,
             expect_live: Optional[str] = None) -> tuple[dict, dict]:
    """Put the previously live version back live and mark the current one ``rolled_back``.

    Returns (rolled back, now live).  The previous version must still have its
    weights.  The version put back holds the rollback: the trainer's gate registers
    its versions but makes none live until someone promotes one.  Both records are
    one registry write (the version put back first, so serving never falls back to
    no model); ``reason`` and ``evidence`` say why (an automatic rollback's figures).
    With ``expect_live`` the rollback happens only while that version is the live one
    (else :class:`models.registry.RegistryConflict`): an automatic rollback judged on
    one version never takes back another.
    """
    published = dict(published_versions(bootstrap, model))

    def change(registry: dict[str, dict]) -> list[dict]:
        import time
        current = live_records(registry, model)
        previous = previous_live(registry, model)
        if not current or previous is None:
            raise RuntimeError(f"nothing to roll back to: {model} has no earlier live version")
        if previous["version"] not in published:
            raise RuntimeError(f"{model} {previous['version']}: its weights are no longer "
                               f"published")
        newest = current[-1]["version"]
        if expect_live is not None and newest != expect_live:
            from models.registry import RegistryConflict
            raise RegistryConflict(f"{model}: {expect_live} is no longer live ({newest} is)")
        why = f": {reason}" if reason else ""
        back = moved(previous, LIVE, by=by, reason=f"rollback of {newest} by {by}{why}",
                     hold=hold_for_rollback(newest, time.time(), by), evidence=evidence)
        gone = [moved(r, ROLLED_BACK, by=by,
                      reason=f"rolled back to {back['version']} by {by}{why}", hold=None,
                      evidence=evidence)
                for r in current if r["version"] != back["version"]]
        return [back] + gone

    written = write_registry(bootstrap, change)
    return written[-1], written[0]


def retire(bootstrap: str, record: dict, by: str = "operator") -> dict:
    """Take a version out of use for good: it will not be promoted by accident.  A live
    version is refused (serving would lose its model): promote another or roll back."""
    def change(registry: dict[str, dict]) -> list[dict]:
        current = _current(registry, record)
        if current["state"] == LIVE:
            raise RuntimeError(f"{current['model']} {current['version']} is live: promote "
                               f"another version or roll back before retiring it")
        if current["state"] == RETIRED:
            raise RuntimeError(f"{current['model']} {current['version']} is already retired")
        return [moved(current, RETIRED, by=by, reason=f"retired by {by}")]

    return write_registry(bootstrap, change)[0]


def version_blobs(bootstrap: str, model: str, versions) -> dict[str, bytes]:
    """The published weights of ``versions`` of ``model`` as full snapshots
    (:func:`serving_bytes` form: a delta version rebuilt on its base), read from
    ``models.weights``; a RuntimeError names any whose weights are gone."""
    from schemas.topics import MODEL_WEIGHTS
    from stores.topic_reader import read_to_end
    payloads: dict[str, Weights] = {}
    assembler = WeightAssembler()
    for msg in read_to_end(bootstrap, MODEL_WEIGHTS):
        key = msg.key().decode()
        if key.split("/", 1)[0] != model:
            continue
        version = key.split("/", 2)[1]
        if msg.value() is None:
            payloads.pop(version, None)
        # Every version is kept, not only those asked for: a delta needs its base.
        weights = assembler.add_message(key, msg.value())
        if weights is not None:
            payloads[version] = weights
    states: dict[str, dict] = {}

    def state_of(version: str) -> Optional[dict]:
        if version not in payloads:
            return None
        if version not in states:
            weights = payloads[version]
            states[version] = (_load(weights) if weights.base is None else
                               rebuild(state_of(weights.base), weights, weights.manifest))
        return states[version]

    found, missing = {}, []
    for version in sorted(set(versions)):
        weights = payloads.get(version)
        try:
            found[version] = (weights if weights is None or weights.base is None
                              else state_bytes(state_of(version)))
        except weight_delta.MissingBase as exc:
            raise RuntimeError(f"{model} {version}: {exc} (tombstoned or compacted away)") \
                from None
        if found[version] is None:
            missing.append(version)
    if missing:
        raise RuntimeError(f"{model} {', '.join(missing)}: weights not published (or no "
                           f"longer: older versions' weights are tombstoned)")
    return {v: bytes(b) for v, b in found.items()}


def register(bootstrap: str, record: dict, blob: bytes) -> dict:
    """Add a new version in state ``registered`` (an operator's, from a checkpoint or a
    copy of another version's weights): its weights, then its record, written by
    :func:`write_registry` as a compare-and-set against "no such version", so an
    existing version is never overwritten.  Its parent, when named, must be a version
    of the same model.  Returns the record as written."""
    from models.registry import REGISTERED
    validate_record(record)
    if record["state"] != REGISTERED:
        raise ValueError(f"a version is registered in state {REGISTERED}, not {record['state']}")
    key = record_key(record)

    def check(registry: dict[str, dict]) -> None:
        if key in registry:
            raise RuntimeError(f"{record['model']} {record['version']} is already in the "
                               f"registry ({registry[key]['state']}): choose another version")
        parent = record.get("parent")
        if parent and f"{record['model']}/{parent}" not in registry:
            raise RuntimeError(f"unknown parent: no version {parent!r} of {record['model']!r} "
                               f"in the registry")

    # Refused before any weights are written; checked again inside the write.
    check(read_registry(bootstrap))
    _write_weights(bootstrap, record["model"], record["version"], blob)

    def change(registry: dict[str, dict]) -> list[dict]:
        check(registry)
        return [record]

    return write_registry(bootstrap, change)[0]


def published_versions(bootstrap: str, model: str) -> list[tuple[str, int]]:
    """(version, parts) of the model's weights still in the topic, oldest first."""
    return [(v, m["parts"]) for v, m in published_manifests(bootstrap, model).items()]


def published_manifests(bootstrap: str, model: str) -> dict[str, dict]:
    """The manifest of each version of the model whose weights are still in the topic,
    oldest first (by name: the trainer's versions start with their time)."""
    import orjson

    from schemas.topics import MODEL_WEIGHTS
    from stores.topic_reader import read_to_end
    manifests: dict[str, dict] = {}
    for msg in read_to_end(bootstrap, MODEL_WEIGHTS):
        m, version, part = msg.key().decode().split("/", 2)
        if m == model and part == "manifest":
            if msg.value() is None:
                manifests.pop(version, None)
            else:
                manifests[version] = orjson.loads(msg.value())
    return dict(sorted(manifests.items()))


def read_registry(bootstrap: str, timeout: float = 30.0) -> dict[str, dict]:
    """The latest committed registry record per model/version.

    Registry writes are transactions (:func:`write_registry`), so the topic holds
    commit markers beside the records: the read ends when the consumer's position
    reaches the end offset, not when a record at the last offset arrives.
    """
    import time

    import orjson
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from schemas.topics import MODEL_REGISTRY
    consumer = Consumer(client_config(bootstrap, {
        "group.id": "streamrec-registry-reader", "enable.auto.commit": False,
        "isolation.level": "read_committed"}))
    records: dict[str, dict] = {}
    try:
        meta = consumer.list_topics(MODEL_REGISTRY, timeout=10).topics[MODEL_REGISTRY]
        if meta.error is not None:
            raise RuntimeError(f"topic {MODEL_REGISTRY!r}: {meta.error}; run 'streamrec topics "
                               f"create'")
        ends = {}
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(MODEL_REGISTRY, p),
                                                       timeout=10)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(MODEL_REGISTRY, p, OFFSET_BEGINNING) for p in ends])
        deadline = time.monotonic() + timeout
        while ends:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {MODEL_REGISTRY!r}: not read to its end within "
                                   f"{timeout:g} s")
            for msg in consumer.consume(1000, timeout=0.2):
                if msg.error():
                    continue
                if msg.value() is None:
                    records.pop(msg.key().decode(), None)
                else:
                    records[msg.key().decode()] = orjson.loads(msg.value())
            for tp in consumer.position([TopicPartition(MODEL_REGISTRY, p) for p in list(ends)]):
                if tp.offset >= ends[tp.partition]:
                    del ends[tp.partition]
    finally:
        consumer.close()
    return records


def write_registry(bootstrap: str, change: Callable[[dict[str, dict]], list[dict]], *,
                   overwrite: tuple = (), attempts: int = 12, timeout: float = 30.0) -> list[dict]:
    """Write the records ``change`` computes from the registry, as a compare-and-set.

    Every writer uses one transactional id (:data:`REGISTRY_WRITER_ID`): starting it
    fences the writer before (whose commit then fails) and waits until that one's
    transaction has ended.  Then the registry is read (committed records only), ``change``
    computes the new records from it, each is stamped with the next revision, checked to
    be made from the newest one (:func:`models.registry.stamp`; keys in ``overwrite``
    are written whatever is there), and all are committed in one transaction.  A writer
    fenced on the way starts again from a fresh read, so no concurrent update is lost;
    a record made from a stale copy raises :class:`models.registry.RegistryConflict`.
    Writers that keep fencing each other back off for a random, growing time.
    Errors of ``change`` (a move the rules refuse) go to the caller; nothing is written.
    Returns the records as written.
    """
    import random
    import time

    import orjson
    from confluent_kafka import KafkaException, Producer

    from schemas.topics import MODEL_REGISTRY
    last: Exception = RuntimeError("no attempt made")
    for attempt in range(attempts):
        producer = Producer(client_config(bootstrap, {
            "transactional.id": REGISTRY_WRITER_ID, "transaction.timeout.ms": 10_000}))
        try:
            producer.init_transactions(timeout)
            registry = read_registry(bootstrap, timeout)
            written = [stamp(validate_record(r), registry.get(record_key(r)),
                             overwrite=record_key(r) in overwrite) for r in change(registry)]
            if not written:
                return []
            producer.begin_transaction()
            for r in written:
                producer.produce(MODEL_REGISTRY, key=record_key(r).encode(), value=orjson.dumps(r))
            producer.commit_transaction(timeout)
            return written
        except (KafkaException, TimeoutError) as exc:
            last = exc
            error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
            if error is not None and error.txn_requires_abort():
                try:
                    producer.abort_transaction(timeout)
                except KafkaException:
                    pass
            time.sleep(random.uniform(0.0, min(0.1 * 2 ** attempt, 2.0)))
    raise RuntimeError(f"registry write failed after {attempts} attempts (other writers "
                       f"kept fencing it, or the broker kept failing): {last}")


def record_stability(bootstrap: str, model: str, version: str, figures: dict) -> list[dict]:
    """Keep a version's latest stability figures in its registry record (the gate of its
    next launch step reads them), while it is on trial (:func:`models.launch.on_trial`);
    written on the record as it is then, so no one's move is lost."""
    import time

    from models.launch import on_trial

    def change(registry: dict[str, dict]) -> list[dict]:
        current = registry.get(f"{model}/{version}")
        if current is None or not on_trial(current, time.time()):
            return []
        return [{**current, "stability": figures}]

    return write_registry(bootstrap, change)


def set_state(bootstrap: str, record: dict, state: str, *, by: str = "operator",
              reason: str = "", evidence: Optional[dict] = None, **changes) -> dict:
    """Write a new registry record for a version in another deployment state (or the
    same state with other fields: a hold cleared).  The move must be allowed
    (:func:`models.registry.check_transition`) and the record valid; who moved it and
    why are recorded.  A change whose value is None removes that field.

    ``record`` is the copy the caller read: the write is a compare-and-set against
    it, so a record someone changed since raises
    :class:`models.registry.RegistryConflict` instead of being overwritten.
    """
    return write_registry(bootstrap, lambda registry: [
        moved(record, state, by=by, reason=reason, evidence=evidence, **changes)])[0]

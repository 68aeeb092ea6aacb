"""Continuous online fine-tuning: learn from every labelled batch, publish gated versions.

``training.examples`` has one partition, so exactly one worker trains.  It
resumes from the live version whose weights every worker already has (or
starts fresh: serving uses the blended retrieval scores until a version is
live) and takes one optimiser step per mini-batch.  Before it learns from a
batch, the batch is scored by the trainer's current state (the candidate) and
by the live version: progressive validation on examples neither has trained
on (:mod:`models.gate`).  Every ``STREAMREC_PUBLISH_INTERVAL_S`` it publishes a
version: weights to ``models.weights`` (a full snapshot every
``STREAMREC_WEIGHTS_FULL_EVERY``-th version, deltas on it between), a registry
record (parent, lineage, metrics, the gate's decision and its evidence) to
``models.registry``.  The version is ``live`` only if the gate says it is better
than the live version (the first must beat the base rate), no rollback holds the
model and its tier needs no operator's approval (:func:`models.registry.release`); otherwise it is
``registered``: kept for an operator to promote, not served.  Training continues from the trainer's
own state either way; it adopts the live version only when someone else made
it live (a bootstrap, promote or rollback).  Workers swap to a live version
atomically when it has fully arrived.
"""
from __future__ import annotations

import asyncio
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson

from models.features import Example
from models.gate import GateRules, ProgressiveValidation, labels_and_mask
from schemas.topics import TRAINING_EXAMPLES
from stores import model_store
from streams import metrics
from streams.agent_errors import Policy, guarded
from streams.app import app
from streams.settings import settings
from streams.view import view

MODEL = "ranker"
#: The gate's thresholds; STREAMREC_GATE_MIN_EXAMPLES, _MIN_POSITIVES, _MAX_NE,
#: _MIN_NE_GAIN, _CALIBRATION_SLACK and _CALIBRATION_BAND override models/gate.py's.
GATE_RULES = GateRules.from_env(os.environ)
#: Every STREAMREC_WEIGHTS_FULL_EVERY-th version is a full snapshot; those between are
#: deltas on it (only the embedding rows that changed).  1: full snapshots only.
DELTAS = model_store.WeightDeltas(int(os.environ.get("STREAMREC_WEIGHTS_FULL_EVERY", "10")))
examples_topic = app.topic(TRAINING_EXAMPLES)
# One thread: torch work must not block the event loop, and steps must stay in order.
_executor = ThreadPoolExecutor(1, thread_name_prefix="trainer")
#: window: progressive validation since the last decision; made_live: the version this
#: trainer last made live; seen_live: the live version at the previous batch.
state = {"trainer": None, "parent": None, "last_publish": 0.0, "offsets": {}, "losses": {},
         "since_publish": 0, "window": None, "made_live": None, "seen_live": None}


def _live_scorer():
    live = view.scorer
    return live if live is not None and live.model == MODEL else None


def _resume_or_start():
    import torch
    from models.training import Trainer
    torch.set_num_threads(1)  # leave the other core to serving and ingest
    live = _live_scorer()
    if live is not None:
        blob = model_store.serving_bytes(live.trainer)
        return model_store.trainer_from_bytes(blob, frozen=False), live.version
    return Trainer(), None


def _predict(trainer, examples: list, chunk: int = 1024) -> np.ndarray:
    return np.concatenate([trainer.predict(examples[s:s + chunk])
                           for s in range(0, len(examples), chunk)])


def _validate(examples: list, live, offsets: dict) -> None:
    """Score a fresh batch with the candidate and the live version before either learns
    from it; a change of live version starts a new window (both judged on the same rows)."""
    live_version = live.version if live is not None else None
    window = state["window"]
    if window is None or window.live_version != live_version:
        window = state["window"] = ProgressiveValidation(live_version)
    labels, mask = labels_and_mask([e.labels for e in examples])
    window.add(labels, mask, _predict(state["trainer"], examples),
               _predict(live.trainer, examples) if live is not None else None, offsets)


def _fit(examples: list) -> dict:
    trainer = state["trainer"]
    losses = {}
    for start in range(0, len(examples), settings.train_batch):
        losses = trainer.fit(examples[start:start + settings.train_batch])
    return losses


def version_record(trainer, parent, state: str, lineage: dict, metrics: dict,
                   decision: dict) -> dict:
    """The registry record of a version of the trainer's current state."""
    now = time.time()
    return {"model": MODEL, "version": f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}-"
                                        f"{trainer.step:07d}",
            "parent": parent, "tier": settings.model_tier, "owner": settings.model_owner,
            "state": state, "created": now,
            "lineage": {"source_topic": TRAINING_EXAMPLES, **lineage,
                        "examples_seen": trainer.examples_seen, "step": trainer.step},
            "metrics": metrics, "decision": decision, "history": [[now, state]]}


def _publish() -> dict:
    """Publish the candidate as a version, live only if the gate says so."""
    trainer = state["trainer"]
    window = state["window"] or ProgressiveValidation(None)
    # This trainer's state continues the live version when it made that version live.
    descendant = window.live_version is not None and window.live_version == state["made_live"]
    decision = window.decide(GATE_RULES, descendant=descendant)
    record = version_record(
        trainer, state["parent"], decision.state,
        {"offsets": dict(state["offsets"]), "trained_on": socket.gethostname()},
        {k: round(v, 5) for k, v in state["losses"].items()}, decision.to_dict())
    version = record["version"]
    # The gate's go-live still waits while a rollback holds the model or its tier
    # needs an operator's approval: the record comes back registered, with the reason.
    record = model_store.publish_candidate(settings.bootstrap, MODEL, version,
                                           model_store.serving_bytes(trainer), record,
                                           deltas=DELTAS)
    state["parent"] = version
    if record["state"] == "live":
        state["made_live"] = version
    if decision.decided:
        # The next decision is judged on examples that come after this one.
        state["window"] = None
    return record


def _adopt_live(live) -> bool:
    """Start over from the live version when someone else changed it: an operator's
    bootstrap, promote or rollback.  Not when it is the version this trainer made live,
    and never merely because the gate kept this trainer's version registered."""
    live_version = live.version if live is not None else None
    changed = live_version != state["seen_live"]
    state["seen_live"] = live_version
    return live is not None and changed and live_version != state["made_live"]


@app.agent(examples_topic)
async def train(stream):
    async for batch in stream.take_events(50, within=1.0):
        if settings.online_training:
            # Training must never take serving down with it: a failed batch is counted,
            # logged and dropped (the next batch trains on).
            await guarded("trainer", train_batch, batch, Policy.DROP)


async def train_batch(batch) -> None:
    loop = asyncio.get_running_loop()
    live = _live_scorer()
    if _adopt_live(live) or state["trainer"] is None:
        # Start from what serving uses: at start-up, and whenever an operator
        # bootstraps, promotes or rolls back a version.
        state["trainer"], state["parent"] = await loop.run_in_executor(
            _executor, _resume_or_start)
        state["made_live"], state["window"] = None, None
    examples, offsets = [], {}
    for event in batch:
        for d in orjson.loads(event.value):
            try:
                examples.append(Example.from_record(d))
            except (KeyError, TypeError, ValueError):
                metrics.counters["bad_training_examples"] += 1
        partition, offset = str(event.message.partition), event.message.offset
        state["offsets"][partition] = offset
        first, _ = offsets.get(partition, (offset, offset))
        offsets[partition] = (min(first, offset), offset)
    if not examples:
        return
    await loop.run_in_executor(_executor, _validate, examples, live, offsets)
    state["losses"] = await loop.run_in_executor(_executor, _fit, examples)
    state["since_publish"] += len(examples)
    metrics.counters["examples_trained"] += len(examples)
    now = time.time()
    if now - state["last_publish"] >= settings.publish_interval_s:
        record = await loop.run_in_executor(_executor, _publish)
        state["last_publish"], state["since_publish"] = now, 0
        metrics.counters["model_versions_published"] += 1
        metrics.counters[f"model_versions_{record['state']}"] += 1
        app.logger.info("published %s %s (%s) after %d examples: %s", MODEL,
                        record["version"], record["state"],
                        record["lineage"]["examples_seen"],
                        record.get("reason") or record["decision"]["reason"])


def bootstrap(bootstrap_servers: str, *, epochs: int = 2, progress: bool = True) -> dict:
    """Train initial weights from every recorded example, then publish them live (an operator's
    decision: the gate judges only the online trainer's versions; the previous live one retires)."""
    from models.training import Trainer
    from stores.topic_reader import read_to_end
    examples, last_offset = [], -1
    for msg in read_to_end(bootstrap_servers, TRAINING_EXAMPLES,
                           progress="read examples" if progress else None):
        examples.extend(Example.from_record(d) for d in orjson.loads(msg.value()))
        last_offset = max(last_offset, msg.offset())
    if not examples:
        raise RuntimeError("no labelled examples in 'training.examples' yet: replay events first")
    trainer = Trainer()
    losses = trainer.pretrain(examples, epochs=epochs, progress=progress)
    record = version_record(
        trainer, None, "live", {"offsets": {"0": last_offset}, "bootstrap_epochs": epochs},
        {"epoch_losses": [round(x, 5) for x in losses]},
        {"go_live": True, "decided": True, "evidence": {},
         "reason": "bootstrapped by an operator (streamrec train)"})
    model_store.publish(bootstrap_servers, record["model"], record["version"],
                        model_store.serving_bytes(trainer), record)
    return record

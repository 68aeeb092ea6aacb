"""Continuous online fine-tuning: learn from every labelled batch, publish versions.

``training.examples`` has one partition, so exactly one worker trains.  It
resumes from the newest live version whose weights every worker already has
(or starts fresh: serving uses the blended retrieval scores until the first
version is live), takes one optimiser step per mini-batch, and every
``STREAMREC_PUBLISH_INTERVAL_S`` publishes a new version: weights to
``models.weights``, a registry record (parent, lineage, metrics) to
``models.registry``.  Workers swap to it atomically when it has fully arrived.
"""
from __future__ import annotations

import asyncio
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import orjson

from models.features import Example
from schemas.topics import TRAINING_EXAMPLES
from stores import model_store
from streams import metrics
from streams.app import app
from streams.settings import settings
from streams.view import view

MODEL = "ranker"
examples_topic = app.topic(TRAINING_EXAMPLES)
# One thread: torch work must not block the event loop, and steps must stay in order.
_executor = ThreadPoolExecutor(1, thread_name_prefix="trainer")
state = {"trainer": None, "parent": None, "last_publish": 0.0, "offsets": {}, "losses": {},
         "since_publish": 0, "own": set()}


def example_from_record(d: dict) -> Example:
    """A training example from a label-join record (serving's own prediction is not a feature)."""
    return Example.from_dict({k: v for k, v in d.items() if k != "predicted"})


def _resume_or_start():
    import torch
    from models.training import Trainer
    torch.set_num_threads(1)  # leave the other core to serving and ingest
    live = view.scorer
    if live is not None:
        for record in view.registry.values():
            if (record["model"], record["version"]) == (live.model, live.version):
                blob = model_store.serving_bytes(live.trainer)
                return model_store.trainer_from_bytes(blob, frozen=False), live.version
    return Trainer(), None


def _fit(examples: list) -> dict:
    trainer = state["trainer"]
    losses = {}
    for start in range(0, len(examples), settings.train_batch):
        losses = trainer.fit(examples[start:start + settings.train_batch])
    return losses


def _publish() -> dict:
    trainer = state["trainer"]
    version = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{trainer.step:07d}"
    record = {
        "model": MODEL, "version": version, "parent": state["parent"], "tier": settings.model_tier,
        "owner": settings.model_owner, "state": "live", "created": time.time(),
        "lineage": {"source_topic": TRAINING_EXAMPLES, "offsets": dict(state["offsets"]),
                    "examples_seen": trainer.examples_seen, "step": trainer.step,
                    "trained_on": socket.gethostname()},
        "metrics": {k: round(v, 5) for k, v in state["losses"].items()},
        "history": [[time.time(), "live"]],
    }
    model_store.publish(settings.bootstrap, MODEL, version, model_store.serving_bytes(trainer),
                        record)
    state["parent"] = version
    state["own"].add(version)
    return record


@app.agent(examples_topic)
async def train(stream):
    loop = asyncio.get_running_loop()
    async for batch in stream.take_events(50, within=1.0):
        if not settings.online_training:
            continue
        try:
            live = view.scorer
            parent_state = view.registry.get(f"{MODEL}/{state['parent']}", {}).get("state")
            # Not adopting our own previous version while our newest is still on its way;
            # adopting anything once our newest was rolled back.
            adopt = (live is not None and live.version != state["parent"]
                     and (live.version not in state["own"] or parent_state not in (None, "live")))
            if state["trainer"] is None or adopt:
                # Start from what serving uses: at start-up, and whenever an operator
                # bootstraps, promotes or rolls back a version this trainer did not write.
                state["trainer"], state["parent"] = await loop.run_in_executor(
                    _executor, _resume_or_start)
            examples = []
            for event in batch:
                for d in orjson.loads(event.value):
                    try:
                        examples.append(example_from_record(d))
                    except (KeyError, TypeError, ValueError):
                        metrics.counters["bad_training_examples"] += 1
                state["offsets"][str(event.message.partition)] = event.message.offset
            if not examples:
                continue
            state["losses"] = await loop.run_in_executor(_executor, _fit, examples)
            state["since_publish"] += len(examples)
            metrics.counters["examples_trained"] += len(examples)
            now = time.time()
            if now - state["last_publish"] >= settings.publish_interval_s:
                record = await loop.run_in_executor(_executor, _publish)
                state["last_publish"], state["since_publish"] = now, 0
                metrics.counters["model_versions_published"] += 1
                app.logger.info("published %s %s after %d examples", MODEL, record["version"],
                                record["lineage"]["examples_seen"])
        except Exception:
            # Training must never take serving down with it.
            metrics.counters["trainer_errors"] += 1
            app.logger.exception("training on a batch of %d messages failed", len(batch))


def bootstrap(bootstrap_servers: str, *, epochs: int = 2, progress: bool = True) -> dict:
    """Train initial weights from every recorded example, then publish them live."""
    from models.training import Trainer
    from stores.topic_reader import read_to_end
    examples, last_offset = [], -1
    for msg in read_to_end(bootstrap_servers, TRAINING_EXAMPLES,
                           progress="read examples" if progress else None):
        examples.extend(example_from_record(d) for d in orjson.loads(msg.value()))
        last_offset = max(last_offset, msg.offset())
    if not examples:
        raise RuntimeError("no labelled examples in 'training.examples' yet: replay events first")
    trainer = Trainer()
    losses = trainer.pretrain(examples, epochs=epochs, progress=progress)
    version = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{trainer.step:07d}"
    record = {"model": MODEL, "version": version, "parent": None, "tier": settings.model_tier,
              "owner": settings.model_owner, "state": "live", "created": time.time(),
              "lineage": {"source_topic": TRAINING_EXAMPLES, "offsets": {"0": last_offset},
                          "examples_seen": trainer.examples_seen, "step": trainer.step,
                          "bootstrap_epochs": epochs},
              "metrics": {"epoch_losses": [round(x, 5) for x in losses]},
              "history": [[time.time(), "live"]]}
    model_store.publish(bootstrap_servers, MODEL, version, model_store.serving_bytes(trainer),
                        record)
    return record

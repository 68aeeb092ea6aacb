"""Item-side state shared with every worker through compacted topics.

Item-side aggregates are computed on the partition that owns the item and
published to compacted topics; pre-generated batches and funnel configuration
arrive the same way.  Every worker runs a :class:`SharedItemView`: a
background thread with a plain confluent-kafka consumer (no consumer group,
all partitions, from the start) that keeps the latest value per key in
memory.  Serving reads it without I/O.

A group-less reader is used rather than a Faust GlobalTable so every worker
sees every partition regardless of rebalances.

Pre-generated batches are versioned: a batch's parts are staged until its
manifest and every part it lists have arrived, then swapped in at once, so a
worker keeps serving the previous batch until the new one is complete.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from models.funnel import DEFAULT_CONFIG, FunnelConfig
from models.launch import DEFAULT_MODEL, PRODUCTION, LaunchPlan, launch_plan, route
from models.trending import merge_snapshots
from schemas.topics import (AUTHOR_ITEMS, CONFIG, ITEM_PROFILES, MODEL_REGISTRY, MODEL_WEIGHTS,
                            PREGEN, TRENDING_SNAPSHOTS)
from models.weight_delta import MissingBase
from stores.model_store import (WeightAssembler, live_since, rebuild, serving_state,
                                trainer_from_bytes, trainer_from_state)
from streams.kafka_config import client_config

log = logging.getLogger(__name__)
SHARED_TOPICS = (TRENDING_SNAPSHOTS, ITEM_PROFILES, AUTHOR_ITEMS, PREGEN, CONFIG, MODEL_WEIGHTS,
                 MODEL_REGISTRY)


class PregenBatch:
    """One complete pre-generated batch: named lists and item embeddings in an ANN index."""

    def __init__(self, version: str, parts: dict, meta: dict):
        self.version = version
        self.meta = meta
        self.lists: dict[str, dict[str, list]] = {}
        ids, vectors = [], []
        for (name, key), value in parts.items():
            if name == "embeddings":
                ids.extend(value["ids"])
                vectors.extend(value["vectors"])
            else:
                self.lists.setdefault(name, {})[key] = [tuple(x) for x in value["items"]]
        self.index = None
        if ids:
            from stores.ann import AnnIndex
            matrix = np.asarray(vectors, dtype=np.float32)
            self.index = AnnIndex(matrix.shape[1], space="cosine", max_elements=len(ids))
            self.index.upsert(ids, matrix)


class SharedItemView:
    """Implements :class:`models.funnel.ItemView` over the shared topics."""

    def __init__(self, bootstrap: str, topics=SHARED_TOPICS, trending_ttl_s: float = 0.25):
        self.bootstrap = bootstrap
        self.topics = tuple(topics)
        #: surface -> {surface/partition: snapshot}; author -> {author/partition: snapshot}
        self._trending: dict[str, dict[str, dict]] = {}
        self._authors: dict[str, dict[str, dict]] = {}
        self._profiles: dict[str, dict] = {}
        self._configs: dict[str, FunnelConfig] = {}
        self._staging: dict[str, dict] = {}
        self._manifests: dict[str, dict] = {}
        self.pregen_batch: Optional[PregenBatch] = None
        self._weights = WeightAssembler()
        #: (model, version) -> frozen Trainer, for every version whose weights are here.
        self.models: dict[tuple[str, str], object] = {}
        #: model/version -> registry record (the newest record per key).
        self.registry: dict[str, dict] = {}
        #: The scorer serving uses: the registry's live version, if its weights are here.
        self.scorer = None
        #: Who serves whom (:mod:`models.launch`): canaries and shadows of the live model,
        #: and their scorers, (model, version) -> ModelScorer.
        self.launch = LaunchPlan()
        self.trial_scorers: dict[tuple[str, str], object] = {}
        #: Item tower vectors of the live version (see refresh_tower_index).
        self.tower_index = None
        self.tower_refreshed = 0
        #: surface -> (n, computed at, merged list); see trending().
        self._trending_cache: dict[str, tuple] = {}
        #: author -> changes applied to its snapshots; author -> (that count, merged items).
        self._author_versions: dict[str, int] = {}
        self._author_cache: dict[str, tuple] = {}
        self.trending_ttl_s = trending_ttl_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.messages = 0
        self.bad_messages = 0
        #: Delta versions skipped because their base was not here.
        self.missing_bases = 0
        self.last_update = 0.0

    # -- ItemView ---------------------------------------------------------
    def trending(self, surface: str, n: int, now: float):
        # Merging and decaying every partition's snapshot costs milliseconds; the
        # answer barely moves within a fraction of a second, so reuse it briefly.
        cached = self._trending_cache.get(surface)
        if cached and cached[0] >= n and 0 <= now - cached[1] < self.trending_ttl_s:
            return cached[2][:n]
        with self._lock:
            snaps = list(self._trending.get(surface, {}).values())
        merged = merge_snapshots(snaps, n, now)
        self._trending_cache[surface] = (n, now, merged)
        return merged

    def neighbours(self, item: str):
        p = self._profiles.get(item)
        return [tuple(x) for x in p["nbrs"]] if p else []

    def author_of(self, item: str):
        p = self._profiles.get(item)
        return p.get("author") if p else None

    def quality(self, item: str):
        p = self._profiles.get(item)
        return p.get("q") if p else None

    def first_seen(self, item: str):
        p = self._profiles.get(item)
        return p.get("first") if p else None

    def author_items(self, author: str):
        # Every request asks for a few authors' items, and an author's snapshots change
        # only every few seconds: merge once per change (callers must not mutate it).
        with self._lock:
            version = self._author_versions.get(author, 0)
            cached = self._author_cache.get(author)
            if cached is not None and cached[0] == version:
                return cached[1]
            snaps = list(self._authors.get(author, {}).values())
        merged = merge_snapshots(snaps, 50, max(s["ts"] for s in snaps)) if snaps else []
        self._author_cache[author] = (version, merged)
        return merged

    def pregen(self, name: str, key: str):
        batch = self.pregen_batch
        return batch.lists.get(name, {}).get(key, []) if batch else []

    def embedding(self, item: str):
        index = self._embedding_index()
        return index.vector(item) if index is not None and item in index else None

    def similar(self, item: str, k: int):
        index = self._embedding_index()
        if index is None or item not in index:
            return []
        return index.query_item(item, k)

    def nearest(self, vector, k: int):
        index = self._embedding_index()
        if index is None or len(vector) != index.config.dim:
            return []
        return index.query(vector, k)

    def funnel_config(self, surface: str) -> FunnelConfig:
        return self._configs.get(surface, DEFAULT_CONFIG)

    # -- what item_stats re-seeds its boards from after a restart ---------
    def trending_snapshot(self, key: str) -> Optional[dict]:
        with self._lock:
            return self._trending.get(key.rsplit("/", 1)[0], {}).get(key)

    def author_snapshot(self, key: str) -> Optional[dict]:
        with self._lock:
            return self._authors.get(key.rsplit("/", 1)[0], {}).get(key)

    # -- lifecycle --------------------------------------------------------
    def start(self) -> "SharedItemView":
        self._thread = threading.Thread(target=self._run, name="shared-item-view", daemon=True)
        self._thread.start()
        return self

    @property
    def caught_up(self) -> bool:
        """True once every shared topic was read up to where it ended when the view started."""
        return self._caught_up.is_set()

    def wait_caught_up(self, timeout: float = 30.0) -> bool:
        return self._caught_up.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def apply(self, topic: str, key: bytes, value: Optional[bytes]) -> None:
        """Apply one message; a malformed one is counted and skipped, never fatal."""
        try:
            if topic == MODEL_WEIGHTS:
                self.apply_weights(key.decode(), value)
            else:
                self._apply(topic, key.decode(), None if value is None else orjson.loads(value))
        except Exception as exc:  # a bad record must not stop the view for everyone
            self.bad_messages += 1
            log.warning("shared view skipped a bad %s record %r: %s", topic, key, exc)
        self.messages += 1
        self.last_update = time.time()

    def _apply(self, topic: str, k: str, value) -> None:
        if topic in (TRENDING_SNAPSHOTS, AUTHOR_ITEMS):
            group = k.rsplit("/", 1)[0]  # "surface/partition", "surface@region/partition"
            target = self._trending if topic == TRENDING_SNAPSHOTS else self._authors
            with self._lock:
                if topic == AUTHOR_ITEMS:
                    self._author_versions[group] = self._author_versions.get(group, 0) + 1
                by_part = target.setdefault(group, {})
                if value is None:
                    by_part.pop(k, None)
                else:
                    by_part[k] = value
        elif topic == ITEM_PROFILES:
            if value is None:
                self._profiles.pop(k, None)
            else:
                self._profiles[k] = value
        elif topic == CONFIG:
            if value is None:
                self._configs.pop(k, None)
            else:
                self._configs[k] = FunnelConfig.from_dict(value)
        elif topic == PREGEN:
            self._apply_pregen(k, value)
        elif topic == MODEL_REGISTRY:
            if value is None:
                self.registry.pop(k, None)
            else:
                self.registry[k] = value
            self._choose_live_model()

    def apply_weights(self, key: str, value: Optional[bytes]) -> None:
        """``model/version/part-N`` chunks and ``model/version/manifest`` (raw bytes); a
        version loads when whole: a full snapshot as it is, a delta on its base."""
        model, version, part = key.split("/", 2)
        if value is None:
            self.models.pop((model, version), None)
            self._weights.forget(model, version)
            return
        if part == "manifest":
            blob = self._weights.add_manifest(model, version, orjson.loads(value))
        else:
            blob = self._weights.add_part(model, version, int(part.split("-")[1]), value)
        if blob is None:
            return
        if blob.base is None:
            self.models[(model, version)] = trainer_from_bytes(blob)
        else:
            # A delta is rebuilt on the base this view holds (a full snapshot, earlier in
            # the topic).  Without it (a base gone, a topic cut short) the version is
            # skipped, never served half-built: the next full snapshot comes soon.
            base = self.models.get((model, blob.base))
            try:
                state = rebuild(None if base is None else serving_state(base), blob,
                                blob.manifest)
            except MissingBase as exc:
                self.missing_bases += 1
                log.warning("model %s version %s skipped: %s", model, version, exc)
                return
            self.models[(model, version)] = trainer_from_state(state)
        log.info("model %s version %s loaded (%d bytes%s)", model, version, len(blob),
                 f", a delta on {blob.base}" if blob.base else "")
        self._choose_live_model()

    def _default_records(self) -> list:
        """Records of the default model (``ranker``, or one whose records name no
        surface): the view's scorer is the one surfaces without a model of their own
        get, and the one the trainer, the tower index and ``live_model`` follow; a
        surface's own model (``models.launch.serving_plan``) must not move them."""
        return [r for r in self.registry.values()
                if not r.get("surface") or r.get("model") == DEFAULT_MODEL]

    def _choose_live_model(self) -> None:
        """Serve the version the registry marks live, once its weights have arrived.

        Making a version live retires the one before, so one version per model is
        live; should two be (an operator's promote racing the trainer), the one made
        live last serves (:func:`~stores.model_store.live_since`), not the newest name.
        While the live version's weights are still arriving, a version retired in
        its favour keeps serving; one rolled back stops at once.
        """
        from models.scoring import ModelScorer
        live = [r for r in self._default_records() if r.get("state") == "live"]
        ready = [r for r in live if (r["model"], r["version"]) in self.models]
        if not ready:
            current = self.scorer
            record = current and self.registry.get(f"{current.model}/{current.version}", {})
            if live and record and record.get("state") == "retired":
                return
            # Back to the cold-start path: blended scores and the pre-generated space.
            self.scorer = None
            self.tower_index = None
            self._choose_trials()
            return
        chosen = max(ready, key=live_since)
        model, version = chosen["model"], chosen["version"]
        if self.scorer is None or (self.scorer.model, self.scorer.version) != (model, version):
            # A new scorer per version: its cached item vectors die with the old one.
            scorer = ModelScorer(self.models[(model, version)], model, version)
            self.refresh_tower_index(scorer)
            self.scorer = scorer
        self._choose_trials()

    def _choose_trials(self) -> None:
        """The canaries and shadows beside the live version (:func:`models.launch.launch_plan`),
        with a scorer each; a version that leaves its trial stops at once."""
        from models.scoring import ModelScorer
        plan = launch_plan(self._default_records(), set(self.models))
        if self.scorer is None or plan.production != (self.scorer.model, self.scorer.version):
            plan = LaunchPlan()
        keys = [k for k, _ in plan.canaries] + list(plan.shadows)
        self.trial_scorers = {k: self.trial_scorers.get(k) or ModelScorer(self.models[k], *k)
                              for k in keys}
        self.launch = plan

    def route(self, user_id: str):
        """(scorer, role, shadow scorers) for one request (:func:`models.launch.route`):
        the live version's scorer for everyone but a canary's users."""
        plan, trials = self.launch, self.trial_scorers
        chosen = route(plan, user_id)
        scorer = trials.get(chosen.serve) if chosen.role != PRODUCTION else None
        shadows = [trials[k] for k in chosen.shadows if k in trials]
        if scorer is None:
            return self.scorer, PRODUCTION, shadows
        return scorer, chosen.role, shadows

    def refresh_tower_index(self, scorer, min_change: float = 1e-3) -> int:
        """Put the new version's item-tower vectors into the tower ANN index.

        Only items whose vector moved (cosine distance above ``min_change``)
        are re-embedded, so a fine-tuning step that barely touched an item
        costs nothing.  Returns how many items were upserted.
        """
        from models.features import Example
        from stores.ann import AnnIndex
        now = time.time()
        items = [(i, p) for i, p in list(self._profiles.items())]
        if not items:
            return 0
        examples = [Example(user_id="", item_id=i, author_id=p.get("author"), surface="explore",
                            ts=now, item_counts=dict(p.get("q") or {}),
                            item_age_s=max(0.0, now - p["first"]) if p.get("first") else 0.0)
                    for i, p in items]
        vectors = np.concatenate([scorer.trainer.item_vectors(examples[s:s + 1024])
                                  for s in range(0, len(examples), 1024)]).astype(np.float32)
        index = self.tower_index
        if index is None or index.config.dim != vectors.shape[1]:
            index = AnnIndex(vectors.shape[1], space="cosine", max_elements=len(items))
        changed_ids, changed_vecs = [], []
        for (item, _), vec in zip(items, vectors):
            old = index.vector(item) if item in index else None
            if old is None or 1.0 - float(old @ vec) / (
                    float(np.linalg.norm(old) * np.linalg.norm(vec)) or 1.0) > min_change:
                changed_ids.append(item)
                changed_vecs.append(vec)
        if changed_ids:
            index.upsert(changed_ids, np.stack(changed_vecs))
        self.tower_index = index
        self.tower_refreshed = len(changed_ids)
        log.info("tower index: %d of %d item vectors refreshed for %s", len(changed_ids),
                 len(items), scorer.version)
        return len(changed_ids)

    def _embedding_index(self):
        """Item tower vectors while a model is live; the pre-generated ones otherwise.

        One space per lookup: vectors of the two spaces are not comparable.
        """
        if self.scorer is not None and self.tower_index is not None and len(self.tower_index):
            return self.tower_index
        batch = self.pregen_batch
        return batch.index if batch else None

    def _apply_pregen(self, k: str, value) -> None:
        version, rest = k.split("/", 1)
        active = self.pregen_batch.version if self.pregen_batch else ""
        # Tombstones only clean up old batches; versions are sortable timestamps.
        if value is None or version <= active:
            return
        if rest == "manifest":
            self._manifests[version] = value
        else:
            name, part_key = rest.split("/", 1)
            self._staging.setdefault(version, {})[(name, part_key)] = value
        manifest = self._manifests.get(version)
        parts = self._staging.get(version, {})
        if manifest is not None and len(parts) == manifest["parts"]:
            self.pregen_batch = PregenBatch(version, parts, manifest.get("meta", {}))
            log.info("pre-generated batch %s is live (%d parts)", version, len(parts))
            for old in [v for v in list(self._staging) if v <= version]:
                self._staging.pop(old, None)
                self._manifests.pop(old, None)

    def _run(self) -> None:
        consumer = Consumer(client_config(self.bootstrap, {
            "group.id": "streamrec-shared-view",  # required by the client; never committed
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 50,  # freshness of shared state is ~0.5 s anyway
        }))
        try:
            assignment, high = [], {}
            meta = consumer.list_topics(timeout=10)
            for topic in self.topics:
                if topic not in meta.topics:
                    raise RuntimeError(f"topic {topic!r} does not exist: run 'streamrec topics create'")
                for p in meta.topics[topic].partitions:
                    assignment.append(TopicPartition(topic, p, OFFSET_BEGINNING))
                    high[(topic, p)] = consumer.get_watermark_offsets(
                        TopicPartition(topic, p), timeout=10)[1]
            consumer.assign(assignment)
            pending = {tp for tp, h in high.items() if h > 0}
            if not pending:
                self._caught_up.set()
            while not self._stop.is_set():
                for msg in consumer.consume(500, timeout=0.1):
                    if msg.error():
                        continue
                    self.apply(msg.topic(), msg.key() or b"", msg.value())
                    tp = (msg.topic(), msg.partition())
                    if tp in pending and msg.offset() >= high[tp] - 1:
                        pending.discard(tp)
                if pending:
                    # The registry is written in transactions: its last offset may be a
                    # commit marker, which is never delivered but moves the position.
                    for tp in consumer.position([TopicPartition(t, p) for t, p in pending]):
                        if tp.offset >= high[(tp.topic, tp.partition)]:
                            pending.discard((tp.topic, tp.partition))
                if not pending and not self._caught_up.is_set():
                    self._caught_up.set()
        finally:
            consumer.close()

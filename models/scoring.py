"""Learned ranking stages for the funnel: two-tower first stage, MTML + value second.

A :class:`ModelScorer` wraps one frozen model version.  It caches item tower
vectors for its version (a new version gets a new scorer, so the cache is
invalidated by construction) and turns candidates into examples with the same
features the label join records at impression time.

Items are ranked as if each were shown at the top (the order is what matters
there); the probabilities logged for the items actually served are predicted
again at the positions they were shown at, because that is what their labels
(and the stability monitor's calibration) measure.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from models.features import (COUNT_KEYS, SOURCE_NAMES, Batch, Example, ItemColumns,
                             collate_for_user, source_row)
from models.value import value_scores

FIRST_STAGE_K = 300
USER_CACHE = 100_000
SECOND_STAGE_K = 300
#: Share of the first stage's places kept for retrieval's own best items, so a
#: tower that has not learned these users and items yet cannot throw them away.
FIRST_STAGE_BLEND_SHARE = 0.5


class ModelScorer:
    def __init__(self, trainer, model: str, version: str, *, first_stage_k: int = FIRST_STAGE_K,
                 second_stage_k: int = SECOND_STAGE_K):
        self.trainer = trainer
        self.model = model
        self.version = version
        self.first_stage_k = first_stage_k
        self.second_stage_k = second_stage_k
        #: item id -> row of _item_matrix holding its tower vector for this version.
        self._item_rows: dict[str, int] = {}
        self._item_matrix = np.zeros((0, 0), dtype=np.float32)
        #: (request id, item id -> row, batch) of the last second stage.
        self._scored: tuple = (None, {}, None)
        #: (user, what the user tower reads of the history) -> user vector, bounded.
        self._user_vectors: "OrderedDict[tuple, np.ndarray]" = OrderedDict()

    def batch(self, ctx, request_id: str, candidates, positions=None) -> Batch:
        """The features of ``ctx``'s user shown each candidate: what the label join will
        record for the item if it is served (:func:`~models.features.collate_for_user`)."""
        totals = ctx.history.totals()
        user = self._example(ctx, "", None, request_id, ctx.history.recent_positive_items(20),
                             ctx.history.author_counts(), None, totals)
        return collate_for_user(user, self.columns(ctx, candidates), self.trainer.features,
                                positions)

    @staticmethod
    def columns(ctx, candidates) -> ItemColumns:
        """The candidates' item-side fields as columns, one view lookup per item and one
        history lookup per author."""
        quality, first_seen, now = ctx.view.quality, ctx.view.first_seen, ctx.now
        counts, ages, per_author = [], [], {}
        for c in candidates:
            q = quality(c.item_id)
            counts.append([q.get(k, 0) for k in COUNT_KEYS] if q else [0, 0, 0, 0])
            first = first_seen(c.item_id)
            ages.append(max(0.0, now - first) if first else 0.0)
            if c.author_id not in per_author:
                per_author[c.author_id] = ctx.history.author_stats(c.author_id)
        return ItemColumns([c.item_id for c in candidates], [c.author_id for c in candidates],
                           np.array(counts, dtype=np.float64).reshape(-1, 4),
                           np.array(ages, dtype=np.float64),
                           np.array([source_row(c.sources) for c in candidates],
                                    dtype=np.float64).reshape(-1, len(SOURCE_NAMES)),
                           np.array([per_author[c.author_id] for c in candidates],
                                    dtype=np.float64).reshape(-1, 4))

    def _example(self, ctx, item, author, request_id, recent=(), authors=None,
                 source_scores=None, totals=None, position: int = 0) -> Example:
        first = ctx.view.first_seen(item)
        # Position 0 while ranking: where an item lands is decided after scoring.
        return Example(
            user_id=ctx.user_id, item_id=item, author_id=author, surface=ctx.surface,
            ts=ctx.now, position=position, user_recent=list(recent), user_authors=authors or {},
            item_counts=dict(ctx.view.quality(item) or {}),
            item_age_s=max(0.0, ctx.now - first) if first else 0.0,
            source_scores=source_scores or {}, request_id=request_id,
            user_author=ctx.history.author_stats(author) if totals is not None else [],
            user_totals=list(totals) if totals is not None else [])

    def user_vector(self, ctx, request_id, recent, authors) -> np.ndarray:
        key = (ctx.user_id, ctx.surface, tuple(recent))
        vector = self._user_vectors.get(key)
        if vector is None:
            vector = self.trainer.user_vectors(
                [self._example(ctx, "", None, request_id, recent, authors)])[0]
            self._user_vectors[key] = vector
            if len(self._user_vectors) > USER_CACHE:
                self._user_vectors.popitem(last=False)
        return vector

    def item_vectors(self, ctx, candidates) -> np.ndarray:
        """Item tower vectors, computed once per item for this version and cached."""
        rows = self._item_rows
        missing = list({c.item_id: c for c in candidates if c.item_id not in rows}.values())
        if missing:
            examples = [self._example(ctx, c.item_id, c.author_id, None) for c in missing]
            vectors = self.trainer.item_vectors(examples)
            if len(rows) + len(vectors) > len(self._item_matrix):
                grown = np.zeros((max(2 * len(self._item_matrix), len(rows) + len(vectors)),
                                  vectors.shape[1]), dtype=vectors.dtype)
                if rows:
                    grown[:len(rows)] = self._item_matrix[:len(rows)]
                self._item_matrix = grown
            for c, v in zip(missing, vectors):
                rows[c.item_id] = len(rows)
                self._item_matrix[rows[c.item_id]] = v
        # One gather from a matrix: stacking hundreds of small arrays costs more.
        return self._item_matrix[[rows[c.item_id] for c in candidates]]

    def rank(self, ctx, request_id: str, candidates, weights: dict) -> tuple[list, list, dict]:
        """Order candidates by value; returns (ranked, [], stage counts).

        Predictions are logged for served items only, at their shown positions
        (:meth:`served_predictions`), so nothing is returned for logging here.
        """
        if not candidates:
            return [], [], {}
        first = self.first_stage(ctx, request_id, candidates)
        second = first[:self.second_stage_k]
        # Second stage: full features (what the label join records) for the survivors only.
        scored = [candidates[i] for i in second]
        batch = self.batch(ctx, request_id, scored)
        # Kept for served_predictions: the served items' rows are already built.
        self._scored = (request_id, {c.item_id: row for row, c in enumerate(scored)}, batch)
        probs = self.trainer.predict_batch(batch)
        values = value_scores(probs, weights)
        order = np.argsort(-values, kind="stable")
        ranked = []
        for j in order:
            scored[j].score = float(values[j])
            ranked.append(scored[j])
        # Items the second stage did not score keep their first-stage order, after it.
        ranked.extend(candidates[i] for i in first[self.second_stage_k:])
        counts = {"first_stage": int(len(first)), "second_stage": int(len(second))}
        return ranked, [], counts

    def first_stage(self, ctx, request_id: str, candidates) -> np.ndarray:
        """Indices of the candidates that reach the second stage, best first.

        Half the places go to retrieval's own order (``candidates`` come sorted
        by blended score), the rest to the two-tower dot product: the user
        vector is cached until the user's history changes, item vectors per
        version.
        """
        n = len(candidates)
        if n <= self.first_stage_k:
            return np.arange(n)
        recent = ctx.history.recent_positive_items(20)
        user = self.user_vector(ctx, request_id, recent, ctx.history.author_counts())
        dots = self.item_vectors(ctx, candidates) @ user
        by_blend = int(self.first_stage_k * FIRST_STAGE_BLEND_SHARE)
        keep = np.zeros(n, dtype=bool)
        keep[:by_blend] = True
        by_tower = [i for i in np.argsort(-dots, kind="stable") if not keep[i]]
        keep[by_tower[:self.first_stage_k - by_blend]] = True
        chosen = np.flatnonzero(keep)
        return chosen[np.argsort(-dots[chosen], kind="stable")]

    def served_predictions(self, ctx, request_id: str, served) -> list:
        """``[item, "served", probabilities]`` of each served item at the position it
        was shown at: what its labels will measure."""
        if not served:
            return []
        scored_for, rows, batch = self._scored
        if scored_for == request_id and all(c.item_id in rows for c in served):
            batch = batch.take([rows[c.item_id] for c in served])
            batch = batch.at_positions(range(len(served)))
        else:
            batch = self.batch(ctx, request_id, served, positions=range(len(served)))
        probs = self.trainer.predict_batch(batch)
        return [[c.item_id, "served", [round(float(p), 5) for p in row]]
                for c, row in zip(served, probs)]

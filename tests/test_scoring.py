"""The learned stages inside the funnel, with a tiny real model."""
from __future__ import annotations

from models.funnel import FunnelConfig, SourceSpec, StaticItemView, recommend
from models.history import UserHistory
from models.mtml import RankerConfig
from models.scoring import ModelScorer
from models.training import Trainer
from models.two_tower import TowerConfig
from schemas.requests import RecommendationRequest

NOW = 1_700_000_000.0


def tiny_trainer() -> Trainer:
    return Trainer(TowerConfig(hash_size=256, author_size=16, surface_size=8, dim=8),
                   RankerConfig(hash_size=256, author_size=16, surface_size=8))


def world(n=60):
    trending = [(f"t{i}", float(n - i), f"a{i % 7}") for i in range(n)]
    return StaticItemView(trending={"explore": trending})


def test_model_ranks_and_logs_predictions():
    scorer = ModelScorer(tiny_trainer(), "ranker", "v1", first_stage_k=30, second_stage_k=10)
    predictions: list = []
    req = RecommendationRequest("r1", "u1", "explore", k=5, deadline=NOW + 5)
    cfg = FunnelConfig(sources={"trending": SourceSpec(1.0, 60)})
    reply = recommend(req, UserHistory(), world(), clock=lambda: NOW, config=cfg, scorer=scorer,
                      predictions=predictions)
    assert reply.model_versions == {"ranker": "ranker:v1"}
    assert reply.stage_counts["first_stage"] == 30 and reply.stage_counts["second_stage"] == 10
    assert len(reply.items) == 5 and not reply.fallback
    # Logged: exactly the served items, in order, with every head's probability.
    assert [p[0] for p in predictions] == [i.item_id for i in reply.items]
    assert all(p[1] == "served" and len(p[2]) == 8 for p in predictions)
    # Item and user vectors were computed once and reused on the next request.
    cached = dict(scorer._item_rows)
    users = dict(scorer._user_vectors)
    recommend(req, UserHistory(), world(), clock=lambda: NOW, config=cfg, scorer=scorer)
    assert scorer._item_rows == cached and scorer._user_vectors.keys() == users.keys()
    # A new positive changes what the user tower reads: a new user vector.
    h = UserHistory()
    h.apply("t3", "like", NOW - 10)
    recommend(req, h, world(), clock=lambda: NOW, config=cfg, scorer=scorer)
    assert len(scorer._user_vectors) == len(users) + 1


def test_ranking_follows_the_value_model():
    scorer = ModelScorer(tiny_trainer(), "ranker", "v1", first_stage_k=20, second_stage_k=20)
    req = RecommendationRequest("r1", "u1", "explore", k=20, deadline=NOW + 5)
    cfg = FunnelConfig(sources={"trending": SourceSpec(1.0, 20)}, max_author_run=20)
    reply = recommend(req, UserHistory(), world(20), clock=lambda: NOW, config=cfg, scorer=scorer)
    scores = [i.score for i in reply.items]
    assert scores == sorted(scores, reverse=True), "items are in value order"
    flipped = FunnelConfig(sources=cfg.sources, max_author_run=20,
                           value_weights={"see_less": -1.0})
    reply2 = recommend(req, UserHistory(), world(20), clock=lambda: NOW, config=flipped,
                       scorer=scorer)
    assert [i.item_id for i in reply2.items] != [i.item_id for i in reply.items], \
        "value weights from the surface's config change the order"


def test_served_items_are_predicted_at_their_shown_position():
    trainer = tiny_trainer()
    scorer = ModelScorer(trainer, "ranker", "v1", first_stage_k=30, second_stage_k=30)
    req = RecommendationRequest("r1", "u1", "explore", k=5, deadline=NOW + 5)
    cfg = FunnelConfig(sources={"trending": SourceSpec(1.0, 30)})
    predictions: list = []
    reply = recommend(req, UserHistory(), world(), clock=lambda: NOW, config=cfg, scorer=scorer,
                      predictions=predictions)
    from models.features import Example
    last = reply.items[-1]
    seen_at = [Example("u1", last.item_id, last.author_id, "explore", NOW, position=p,
                       source_scores=dict(last.source_scores), request_id="r1",
                       user_author=[0, 0, 0, 0], user_totals=[0, 0, 0, 0]) for p in (0, 4)]
    at_top, at_shown = trainer.predict(seen_at)
    logged = predictions[-1][2]
    assert abs(logged[0] - at_shown[0]) < 1e-3 and abs(logged[0] - at_top[0]) > 1e-4, \
        "the last item's probability is predicted at position 4, not 0"


def test_first_stage_keeps_retrievals_best_items_whatever_the_tower_says():
    scorer = ModelScorer(tiny_trainer(), "ranker", "v1", first_stage_k=20, second_stage_k=20)
    from models.funnel import blend
    from models.sources import RetrievalContext
    view = world(60)
    cands = blend({"trending": view.trending("explore", 60, NOW)}, {"trending": 1.0})
    ctx = RetrievalContext("explore", UserHistory(), view, NOW, user_id="u1")
    kept = set(scorer.first_stage(ctx, "r1", cands).tolist())
    assert len(kept) == 20 and set(range(10)) <= kept


def test_scorer_batch_equals_the_examples_the_label_join_records():
    """Serving collates one user against many items without an Example per row; the
    tensors must be exactly those of the per-row Examples (what training reads)."""
    import torch

    from models.features import TENSOR_FIELDS, collate
    from models.funnel import Candidate
    from models.sources import RetrievalContext

    scorer = ModelScorer(tiny_trainer(), "ranker", "v1")
    h = UserHistory()
    for i, kind in enumerate(["impression", "click", "like", "impression", "see_less", "save"]):
        h.apply(f"t{i}", kind, NOW - 100 + i, f"a{i % 3}")
    view = StaticItemView(quality={"t1": {"pos": 3, "imp": 9}, "t8": {"imp": 2, "see_less": 1}})
    view.first_seen = lambda item: NOW - 3600.0 if item in ("t1", "t9") else None
    ctx = RetrievalContext("explore", h, view, NOW, user_id="u1")
    candidates = [Candidate(f"t{i}", 1.0 / (i + 1), f"a{i % 4}" if i != 5 else None,
                            {"trending": 0.5, "author": 0.1 * i}) for i in range(10)]
    for positions in (None, range(10)):
        fast = scorer.batch(ctx, "r1", candidates, positions)
        slow = collate([scorer._example(ctx, c.item_id, c.author_id, "r1",
                                        h.recent_positive_items(20), h.author_counts(),
                                        dict(c.sources), h.totals(), p)
                        for c, p in zip(candidates, positions or [0] * 10)],
                       scorer.trainer.features)
        for name in TENSOR_FIELDS:
            assert torch.equal(getattr(fast, name), getattr(slow, name)), name
        assert fast.request_ids == slow.request_ids and fast.surfaces == slow.surfaces


def test_served_predictions_reuse_the_second_stage_rows_exactly():
    """The served items' rows are taken from the second stage's batch and moved to their
    shown positions: the same probabilities as collating them afresh."""
    from models.funnel import Candidate
    from models.sources import RetrievalContext
    from models.value import weights_for

    scorer = ModelScorer(tiny_trainer(), "ranker", "v1")
    h = UserHistory()
    for i, kind in enumerate(["impression", "click", "like", "impression", "save"]):
        h.apply(f"t{i}", kind, NOW - 100 + i, f"a{i % 3}")
    ctx = RetrievalContext("explore", h, StaticItemView(quality={"t3": {"pos": 2, "imp": 5}}),
                           NOW, user_id="u1")
    candidates = [Candidate(f"t{i}", 1.0 / (i + 1), f"a{i % 4}", {"trending": 0.1 * i})
                  for i in range(12)]
    ranked, _, _ = scorer.rank(ctx, "r1", candidates, weights_for("explore"))
    served = [ranked[3], ranked[0], ranked[7]]
    fresh = scorer.trainer.predict_batch(scorer.batch(ctx, "r1", served, positions=range(3)))

    def no_collating(*args, **kwargs):
        raise AssertionError("served items of the ranked request were collated again")
    scorer.batch = no_collating
    reused = scorer.served_predictions(ctx, "r1", served)
    del scorer.batch
    assert [r[0] for r in reused] == [c.item_id for c in served]
    assert [r[2] for r in reused] == [[round(float(p), 5) for p in row] for row in fresh]
    # Another request's items are collated afresh, not looked up in r1's rows.
    other = scorer.served_predictions(ctx, "r2", served)
    assert [r[2] for r in other] == [r[2] for r in reused]


def test_cached_item_vectors_are_the_towers_own():
    """Vectors gathered from the scorer's cache (grown over several requests, with repeats)
    equal the item tower's output for the same items."""
    import numpy as np

    from models.funnel import Candidate
    from models.sources import RetrievalContext

    scorer = ModelScorer(tiny_trainer(), "ranker", "v1")
    ctx = RetrievalContext("explore", UserHistory(), StaticItemView(), NOW, user_id="u1")
    batches = [[Candidate(f"t{i}", 1.0, f"a{i % 3}", {}) for i in ids]
               for ids in (range(3), range(2, 9), [8, 0, 8, 5], range(20))]
    for cands in batches:
        got = scorer.item_vectors(ctx, cands)
        want = scorer.trainer.item_vectors([scorer._example(ctx, c.item_id, c.author_id, None)
                                            for c in cands])
        assert np.allclose(got, want, atol=1e-6)
    assert len(scorer._item_rows) == 20

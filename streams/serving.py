"""Serving: answer recommendation requests on the request/reply topics.

Requests are keyed by user id, so they arrive on the partition that holds the
user's history; item-side state comes from the shared view.  The funnel itself
is :func:`models.funnel.recommend`; this agent only decodes, calls it, replies
and counts.  Which model and version answer is :func:`models.launch.select`'s choice:
the model whose production version names the request's surface (else the default
model), and of that model the live version, or a canary for its share of users;
versions in shadow score the served items after the reply is sent, and their
predictions are logged tagged ``shadow``.  The reply names the model and version that
ranked it (``model_versions["ranker"]``, ``model:version``).

A request read again after its partition changed hands, whose reply a previous
owner already sent, is not answered again (:func:`answered_before`).
A request whose deadline has passed when it is read is not worked on
(``requests_expired``): its client has stopped waiting, and after an outage
(a redelivered backlog, a worker that took over) answering it would only delay
the requests that can still be answered in time.
"""
from __future__ import annotations

import asyncio
import time
from functools import partial

import orjson

from models.funnel import Candidate, recommend
from models.launch import PRODUCTION, ServingPlan, select, serving_plan
from models.history import UserHistory
from models.sources import RetrievalContext
from schemas.events import SchemaError, decode_json
from schemas.requests import RecommendationReply, RecommendationRequest, parse_request
from models.features import HEADS
from schemas.topics import PREDICTIONS, REPLIES, REQUESTS, partition_for
from streams import labels, metrics
from streams.agent_errors import Policy, guarded
from streams.app import app
from streams.deadletters import send_dead_letter
from streams.tables import user_history
from streams.settings import settings
from streams.view import view
from stores.topic_reader import keys_since

requests_topic = app.topic(REQUESTS)
replies_topic = app.topic(REPLIES)
predictions_topic = app.topic(PREDICTIONS)


@app.agent(requests_topic)
async def serve(stream):
    async for event in stream.events():
        # One bad request must never stop serving for everyone else; its client's
        # deadline ends it (a request that fails validation is answered with the error).
        await guarded("serve", lambda events: serve_one(events[0]), [event], Policy.DROP)


def shadow_predictions(shadows, req: RecommendationRequest, history: UserHistory, reply,
                       now: float) -> list:
    """(``model:version``, predictions) of each shadow version for the items served: their
    head probabilities at the positions shown, as the served version logs its own, so
    the labels measure both alike.  A shadow that fails is counted, never in the way."""
    if not shadows or not reply.items:
        return []
    ctx = RetrievalContext(req.surface, history, view, now, user_id=req.user_id)
    served = [Candidate(i.item_id, i.score, i.author_id, dict(i.source_scores or {}))
              for i in reply.items]
    out = []
    for scorer in shadows:
        try:
            out.append((f"{scorer.model}:{scorer.version}",
                        scorer.served_predictions(ctx, req.request_id, served)))
        except Exception:  # a broken candidate must not cost production anything
            metrics.counters["shadow_errors"] += 1
    return out


#: The serving plan (:func:`models.launch.serving_plan`) and what it was made from: it is
#: made again when the view swaps its launch plan (it does on every registry record and
#: every version whose weights arrive), when the registry or the loaded versions change
#: in number, and at least every REPLAN_S.
REPLAN_S = 1.0
_plan: dict = {"plan": ServingPlan(), "launch": None, "sizes": None, "at": float("-inf")}
#: Scorers of the versions serving answers with that the view keeps none for (another
#: surface's model, its canaries and shadows), (model, version) -> ModelScorer.
_scorers: dict = {}


def serving_now(now: float) -> ServingPlan:
    """The serving plan for the view's registry and loaded versions."""
    sizes = (len(view.registry), len(view.models))
    cached = _plan["plan"]
    if (_plan["launch"] is view.launch and _plan["sizes"] == sizes
            and now - _plan["at"] < REPLAN_S):
        return cached
    plans = [cached.default] + [p for _, p in cached.surfaces]
    before = {p.production[0]: p.production[1] for p in plans if p.production}
    plan = serving_plan(list(view.registry.values()), set(view.models), serving=before)
    keys = {k for p in [plan.default] + [p for _, p in plan.surfaces]
            for k in [p.production, *(c for c, _ in p.canaries), *p.shadows] if k}
    for gone in set(_scorers) - keys:
        del _scorers[gone]
    _plan.update(plan=plan, launch=view.launch, sizes=sizes, at=now)
    return plan


def scorer_for(key):
    """The scorer of version ``key``: the view's own when it has one (the live version it
    chose, its canaries and shadows), else one kept here; None without its weights."""
    if key is None:
        return None
    live = view.scorer
    if live is not None and (live.model, live.version) == key:
        return live
    scorer = view.trial_scorers.get(key) or _scorers.get(key)
    if scorer is None and key in view.models:
        from models.scoring import ModelScorer
        scorer = _scorers[key] = ModelScorer(view.models[key], *key)
    return scorer


def choose(req: RecommendationRequest, now: float):
    """(scorer, role, shadow scorers) for one request: :func:`models.launch.select` on the
    serving plan, mapped to scorers (a canary without one leaves its users to production)."""
    plan = serving_now(now)
    chosen = select(plan, req.surface, req.user_id)
    shadows = [s for s in map(scorer_for, chosen.shadows) if s is not None]
    scorer = scorer_for(chosen.serve)
    if scorer is None and chosen.role != PRODUCTION:
        return scorer_for(plan.plan_for(req.surface).production), PRODUCTION, shadows
    return scorer, chosen.role, shadows


#: Requests partition -> its end offset when this process first served from it: below
#: it, a previous owner may have answered a request already (it was killed, or lost the
#: partition, before committing it).
taken_over: dict = {}
#: Ids of the requests answered by anyone in the REPLY_LOOKBACK_S before this process's
#: assignment (consumer generation) began to be served, read once per generation.
answered: dict = {"generation": None, "ids": frozenset()}
#: Longer than any deadline a client sets: an older request has expired anyway.
REPLY_LOOKBACK_S = 60.0


@app.on_partitions_revoked.connect
async def forget_takeovers(sender, revoked, **kwargs) -> None:
    for tp in revoked:
        taken_over.pop(tp, None)


async def answered_before(msg, request_id: str) -> bool:
    """Whether a request read again after its partition changed hands was answered
    already: its reply is in the replies topic.  A worker killed after answering but
    before committing leaves its requests to the next owner, which within their
    deadline would answer them a second time."""
    tp = msg.tp
    if tp not in taken_over:
        taken_over[tp] = (await app.consumer.highwaters(tp)).get(tp) or 0
    if msg.offset >= taken_over[tp]:
        return False
    generation = app.consumer_generation_id
    if answered["generation"] != generation:
        ids: frozenset = frozenset()
        try:
            ids = frozenset(await asyncio.get_running_loop().run_in_executor(
                None, partial(keys_since, settings.bootstrap, REPLIES,
                              time.time() - REPLY_LOOKBACK_S)))
        except Exception as exc:  # the broker away: answering twice beats not answering
            metrics.counters["reply_reads_failed"] += 1
            app.logger.warning("could not read %s for requests answered before: %r",
                               REPLIES, exc)
        answered.update(generation=generation, ids=ids)
    return request_id.encode() in answered["ids"]


def expired(req: RecommendationRequest, now: float) -> bool:
    """The request's deadline has passed: nobody waits for its reply any more.

    >>> req = RecommendationRequest("r", "u", "explore", 10, deadline=100.0)
    >>> expired(req, 99.9), expired(req, 100.0)
    (False, True)
    """
    return now >= req.deadline


async def serve_one(event) -> None:
    msg = event.message
    received = time.time()
    record = None
    try:
        record = decode_json(event.value)
        req = parse_request(record)
        if req.reply_partition is not None and req.reply_partition >= settings.partitions:
            raise SchemaError(f"'reply_partition' {req.reply_partition} does not exist "
                              f"({REPLIES} has {settings.partitions} partitions)")
    except SchemaError as exc:
        metrics.counters["bad_requests"] += 1
        await send_dead_letter(event.value, str(exc), msg)
        request_id = record.get("request_id") if isinstance(record, dict) else None
        if isinstance(request_id, (str, int)):
            # The client is waiting: tell it why instead of letting it time out.
            partition = record.get("reply_partition")
            valid = isinstance(partition, int) and 0 <= partition < settings.partitions
            await replies_topic.send(
                key=str(request_id).encode(), partition=partition if valid else None,
                value=RecommendationReply(
                request_id=str(request_id), user_id=str(record.get("user_id")),
                surface=str(record.get("surface")), items=[], model_versions={}, fallback=False,
                server_latency_ms=0.0, error=str(exc)).to_json())
        return
    if expired(req, received):
        metrics.counters["requests_expired"] += 1
        return
    if await answered_before(msg, req.request_id):
        metrics.counters["requests_answered_before"] += 1
        return
    expected = partition_for(req.user_id, settings.partitions)
    if expected != msg.partition:
        await requests_topic.send(key=req.user_id.encode(), value=event.value, partition=expected)
        metrics.counters["requests_rerouted"] += 1
        return
    history = UserHistory.from_dict(user_history.get(req.user_id))
    predictions: list = []
    # The surface's model (else the default one): its live version, or a canary for its
    # share of users (models/launch.py).
    scorer, role, shadows = choose(req, received)
    reply = recommend(req, history, view, config=view.funnel_config(req.surface),
                      scorer=scorer, predictions=predictions)
    # The reply first: the client is waiting; the bookkeeping is not.
    await replies_topic.send(key=req.request_id.encode(), value=reply.to_json(),
                             partition=req.reply_partition)
    served_by = reply.model_versions.get("ranker", "")
    beside = shadow_predictions(shadows, req, history, reply, received) if served_by else []
    labels.remember_served(req.request_id, reply.items, served_by, predictions, beside)
    if predictions:
        # One message per request: the heads' probabilities of every item the model scored.
        await predictions_topic.send(key=req.user_id.encode(), value=orjson.dumps({
            "request_id": req.request_id, "user_id": req.user_id, "surface": req.surface,
            "model": served_by, "role": role, "served": True, "ts": received,
            "heads": list(HEADS), "items": predictions}))
        if role != "production":
            metrics.counters[f"requests_served_{role}"] += 1
    for name, items in beside:
        # What the shadow would have predicted for the served items: logged, never served.
        await predictions_topic.send(key=req.user_id.encode(), value=orjson.dumps({
            "request_id": req.request_id, "user_id": req.user_id, "surface": req.surface,
            "model": name, "role": "shadow", "served": False, "beside": served_by,
            "ts": received, "heads": list(HEADS), "items": items}))
        metrics.counters["shadow_predictions"] += 1
    metrics.counters["requests_served"] += 1
    if reply.fallback:
        metrics.counters["fallbacks"] += 1
    metrics.observe_latency((time.time() - received) * 1000.0)

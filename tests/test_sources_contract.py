"""What every retrieval source promises, over every ItemView implementation.

Like river's ``check_estimator``: each source in :data:`models.sources.SOURCES`
runs against each :class:`models.funnel.ItemView` (the in-memory
:class:`~models.funnel.StaticItemView`, serving's
:class:`~stores.shared_view.SharedItemView` fed the messages the agents and the
pre-generation job publish, and bench/retrieval.py's ``ReplayView``), all built
from one synthetic event stream folded as ingest and item_stats fold it.  For
every request the source must:

* return nothing the request excludes (what the user saw or rejected, and the
  request's own exclusions);
* return at most ``fetch`` hits, each item once;
* order hits by descending score;
* say why on every hit;
* answer the same inputs the same way, in this process and in another (a replay).

A new source is checked once it is in ``SOURCES``; a new view, once it is in
:data:`VIEWS` with a builder of that name on :class:`World`.
"""
from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from models.funnel import ItemView, StaticItemView
from models.history import UserHistory
from models.item_state import profile
from models.pregen import item_embeddings, popular
from models.sources import SOURCES, RetrievalContext
from schemas.events import EngagementEvent
from schemas.topics import AUTHOR_ITEMS, ITEM_PROFILES, PREGEN, TRENDING_SNAPSHOTS
from stores.shared_view import SharedItemView
from streams.pregen import batch_parts
from tests.test_item_state import load_bench

T0 = 1_700_000_000.0
HALF_LIFE_S = 3600.0
DIM = 8
#: streams.item_stats publishes this many items per trending snapshot and per
#: author (importing it would start the Faust app).
SNAPSHOT_SIZE, AUTHOR_ITEMS_SIZE = 500, 50
FETCHES = (1, 4, 200)
VIEWS = ("static", "shared", "replay")


# --------------------------------------------------------------------------- the world

def world_events(seed: int = 7) -> list[EngagementEvent]:
    """Users of four tastes engaging with 48 items by 6 authors over about three hours,
    in two regions and on two surfaces, with negatives and follows among them."""
    rng = random.Random(seed)
    items = [f"i{n:02d}" for n in range(48)]
    users = [f"u{n:02d}" for n in range(24)]
    kinds = ["impression", "click", "like", "save", "see_less", "report", "follow"]
    events, ts = [], T0
    for n in range(900):
        user = rng.choice(users)
        taste = int(user[1:]) % 4
        item = rng.choice([i for j, i in enumerate(items) if j % 4 == taste]
                          if rng.random() < 0.8 else items)
        kind = rng.choices(kinds, weights=[30, 30, 20, 5, 6, 2, 2])[0]
        events.append(EngagementEvent(
            f"e{n}", user, item, kind, "explore" if rng.random() < 0.85 else "home", ts,
            author_id=f"a{int(item[1:]) % 6}", region="eu" if int(user[1:]) % 2 else "us"))
        ts += rng.uniform(1.0, 20.0)
    return events


EVENTS = world_events()
NOW = EVENTS[-1].ts + 1.0


class World:
    """The folded stream and the pre-generated batch every view is built from."""

    def __init__(self, events: list[EngagementEvent]):
        self.bench = load_bench("retrieval")
        self.state = self.bench.LiveState(HALF_LIFE_S, batch=50)
        for ev in events:
            self.state.apply(ev)
        self.state.flush()
        self.popular = popular(events, now=NOW)
        self.vectors = item_embeddings(events, dim=DIM)
        self.parts = batch_parts(events, now=NOW, window_days=7.0, dim=DIM)

    def static(self) -> StaticItemView:
        state = self.state
        return StaticItemView(
            trending={key: [(i, s, board.authors.get(i)) for i, s in board.top(SNAPSHOT_SIZE, NOW)]
                      for key, board in state.boards.items()},
            neighbours={i: [tuple(n) for n in profile(s)["nbrs"]] for i, s in state.stats.items()},
            author_items={a: [(i, s, a) for i, s in board.top(AUTHOR_ITEMS_SIZE, NOW)]
                          for a, board in state.author_boards.items()},
            quality={i: s["q"] for i, s in state.stats.items() if s.get("q")},
            embeddings=dict(self.vectors), pregen={"popular": self.popular},
            authors={i: s["author"] for i, s in state.stats.items()})

    def shared(self) -> SharedItemView:
        """Fed by hand what item_stats and ``streamrec pregen`` publish (one partition)."""
        view = SharedItemView("unused:0")
        for item, stats in self.state.stats.items():
            view.apply(ITEM_PROFILES, item.encode(), orjson.dumps(profile(stats)))
        for key, board in self.state.boards.items():
            view.apply(TRENDING_SNAPSHOTS, f"{key}/0".encode(),
                       orjson.dumps(board.snapshot(SNAPSHOT_SIZE, NOW)))
        for author, board in self.state.author_boards.items():
            view.apply(AUTHOR_ITEMS, f"{author}/0".encode(),
                       orjson.dumps(board.snapshot(AUTHOR_ITEMS_SIZE, NOW)))
        for name_key, value in self.parts.items():
            view.apply(PREGEN, f"v1/{name_key}".encode(), orjson.dumps({**value, "version": "v1"}))
        view.apply(PREGEN, b"v1/manifest",
                   orjson.dumps({"version": "v1", "parts": len(self.parts), "meta": {}}))
        assert view.bad_messages == 0 and view.pregen_batch is not None
        return view

    def replay(self):
        index, _ = self.bench.build_index(self.vectors, "exact")
        view = self.bench.ReplayView(self.state, {"popular": self.popular}, index)
        view.now = NOW
        return view

    def view(self, kind: str):
        return getattr(self, kind)()


@pytest.fixture(scope="module")
def world() -> World:
    return World(EVENTS)


@pytest.fixture(scope="module")
def views(world) -> dict:
    return {kind: world.view(kind) for kind in VIEWS}


def requests(world: World) -> dict[str, tuple]:
    """Named requests: (history, extra exclusions, surface, region).

    The heaviest users, a follower, a cold user, and requests that also exclude
    what tops every list (so exclusion is tested where it bites).
    """
    histories = world.state.histories
    heavy = sorted(histories, key=lambda u: (-len(histories[u].positives), u))[:3]
    follower = min(u for u, h in histories.items() if h.follows)
    tops = set()
    for board in world.state.boards.values():
        tops.update(i for i, _ in board.top(3, NOW))
    for listed in world.popular.values():
        tops.update(i for i, _, _ in listed[:3])
    for user in heavy[:1]:
        for seed in histories[user].positive_seeds(NOW, 3):
            tops.update(n[0] for n in profile(world.state.stats[seed])["nbrs"][:3])
    out = {}
    for user in heavy:
        out[f"{user}-explore"] = (histories[user], set(), "explore", None)
        out[f"{user}-eu"] = (histories[user], set(), "explore", "eu")
    out[f"{heavy[0]}-home-us-tops"] = (histories[heavy[0]], tops, "home", "us")
    out[f"{heavy[1]}-eu-tops"] = (histories[heavy[1]], tops, "explore", "eu")
    out[f"{follower}-follows"] = (histories[follower], set(), "explore", None)
    out["cold-eu-tops"] = (UserHistory(), tops, "explore", "eu")
    return out


def context(history: UserHistory, exclude: set, surface: str, region, view) -> RetrievalContext:
    """As ``recommend`` builds it, from a copy of the history (sources must not need it)."""
    history = copy.deepcopy(history)
    return RetrievalContext(surface, history, view, NOW, excluded=history.excluded() | exclude,
                            region=region, user_id="u")


def answers(name: str, view, world: World, fetch: int) -> dict[str, tuple]:
    """Each request's context and the source's hits for it."""
    out = {}
    for request, args in requests(world).items():
        ctx = context(*args, view)
        out[request] = ctx, SOURCES[name](ctx, fetch)
    return out


# --------------------------------------------------------------------------- contracts

@pytest.mark.parametrize("kind", VIEWS)
def test_every_view_implements_the_item_view_protocol(views, kind):
    methods = [m for m in vars(ItemView) if not m.startswith("_")]
    assert set(methods) >= {"trending", "neighbours", "pregen", "nearest"}
    missing = [m for m in methods if not callable(getattr(views[kind], m, None))]
    assert not missing, f"{kind} lacks {missing}"


@pytest.mark.parametrize("kind", VIEWS)
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_answers_something_on_every_view(world, views, name, kind):
    """Not a contract: the world is rich enough that the contracts below are not
    met by returning nothing."""
    got = answers(name, views[kind], world, 200)
    assert sum(len(hits) for _, hits in got.values()) >= 5, (name, kind)


@pytest.mark.parametrize("kind", VIEWS)
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_returns_no_excluded_item(world, views, name, kind):
    for fetch in FETCHES:
        for request, (ctx, hits) in answers(name, views[kind], world, fetch).items():
            leaked = [h.item_id for h in hits if h.item_id in ctx.excluded]
            assert not leaked, (name, kind, request, fetch, leaked)


@pytest.mark.parametrize("kind", VIEWS)
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_exclusion_is_tested_where_it_bites(world, views, name, kind):
    """Without its exclusions, some request would have been offered an excluded item."""
    bitten = False
    for args in requests(world).values():
        ctx = context(*args, views[kind])
        excluded, ctx.excluded = ctx.excluded, set()
        bitten |= any(h.item_id in excluded for h in SOURCES[name](ctx, 200))
    assert bitten, (name, kind)


@pytest.mark.parametrize("kind", VIEWS)
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_returns_at_most_fetch_hits_each_item_once(world, views, name, kind):
    for fetch in FETCHES:
        for request, (_, hits) in answers(name, views[kind], world, fetch).items():
            assert len(hits) <= fetch, (name, kind, request, fetch, len(hits))
            item_ids = [h.item_id for h in hits]
            assert len(set(item_ids)) == len(item_ids), (name, kind, request, fetch)


@pytest.mark.parametrize("kind", VIEWS)
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_scores_descend(world, views, name, kind):
    for fetch in FETCHES:
        for request, (_, hits) in answers(name, views[kind], world, fetch).items():
            scores = [h.score for h in hits]
            assert scores == sorted(scores, reverse=True), (name, kind, request, fetch, scores)


@pytest.mark.parametrize("kind", VIEWS)
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_says_why_on_every_hit(world, views, name, kind):
    for request, (_, hits) in answers(name, views[kind], world, 200).items():
        silent = [h.item_id for h in hits if not (isinstance(h.why, str) and h.why.strip())]
        assert not silent, (name, kind, request, silent)


@pytest.mark.parametrize("kind", VIEWS)
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_is_deterministic(world, views, name, kind):
    """The same request against the same view, and against a view built afresh from
    the same stream, gets the same hits in the same order."""
    first = answers(name, views[kind], world, 200)
    again = answers(name, views[kind], world, 200)
    fresh = answers(name, world.view(kind), world, 200)
    for request, (_, hits) in first.items():
        assert again[request][1] == hits, (name, kind, request)
        assert fresh[request][1] == hits, (name, kind, request)



def all_answers() -> dict[str, list]:
    """Every source's hits for every request on every view, as JSON-ready lists."""
    world = World(EVENTS)
    return {f"{kind}/{name}/{request}": [list(h) for h in hits]
            for kind in VIEWS for name in sorted(SOURCES)
            for request, (_, hits) in answers(name, world.view(kind), world, 200).items()}


def test_sources_answer_alike_in_processes_with_different_string_hashing(world):
    """A replay in another process decides as the original did: no answer may depend
    on the order of a set or dict of strings, which PYTHONHASHSEED changes."""
    root = Path(__file__).resolve().parents[1]
    script = ("import json, tests.test_sources_contract as t; "
              "print(json.dumps(t.all_answers(), sort_keys=True))")
    outputs = [subprocess.run([sys.executable, "-c", script], cwd=root, check=True,
                              capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2")]
    assert outputs[0] == outputs[1]
    assert len(json.loads(outputs[0])) == len(VIEWS) * len(SOURCES) * len(requests(world))

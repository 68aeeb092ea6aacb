"""A simulated world of users, authors and items with known engagement probabilities.

The closed-loop simulator (``streams/simulate.py``) lets simulated users react
to what the real system serves.  Because the world knows the TRUE probability
of every engagement, any ranking can be scored by its true expected value,
not only by the clicks it happened to get.

Everything is seeded: the same :class:`WorldConfig` gives the same world, the
same items created over time and the same sampled engagements.  Time ``t`` is
simulated seconds since the start; item ids inside the world are ints, on the
wire they are ``sim-i<n>`` (authors ``sim-a<n>``, users ``sim-u<n>``), or
``sim-<tag>-i<n>`` for a world with a ``tag``: each run of the simulator tags
its world, so two runs on one worker never meet each other's users or items.

>>> w = World(WorldConfig(n_users=5, n_authors=3, items_per_author=4, seed=1))
>>> p = w.true_probabilities(0, 0, position=0, t=0.0)
>>> sorted(p) == sorted(ENGAGEMENT_HEADS), all(0.0 <= v <= 1.0 for v in p.values())
(True, True)
>>> p["like"] <= p["click"]            # a like only ever follows a click
True
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from models.features import LONG_DWELL_MS
from models.value import value_score, weights_for
from schemas.events import POSITIVE_HEADS, EngagementEvent  # noqa: F401  (re-exported for the simulator)

#: Every engagement the world can produce; ``long_dwell`` becomes a ``dwell`` event.
ENGAGEMENT_HEADS = ("click", "like", "save", "share", "comment", "follow",
                    "see_less", "report", "long_dwell")
#: Heads that only happen after a click (their probabilities are click * P(head | click)).
AFTER_CLICK = ("like", "save", "share", "comment", "follow", "long_dwell")
SURFACE = "explore"
#: Base logits per head (click, see_less, report: given attention; the rest: given a click).
BASE_LOGITS = {"click": -1.7, "like": -0.85, "save": -2.4, "share": -2.9, "comment": -2.9,
               "follow": -3.5, "see_less": -3.5, "report": -5.3, "long_dwell": -0.6}
#: Affinity at which a head is at its base rate (typical of a random user-item pair).
NEUTRAL_AFFINITY = 0.35
_NOISE_DIM = 8


@dataclass(frozen=True)
class WorldConfig:
    n_users: int = 200
    n_authors: int = 40
    #: Latent interest dimensions.
    topics: int = 16
    items_per_author: int = 10
    #: Fresh items created per simulated minute.
    items_per_minute: float = 30.0
    objectionable_share: float = 0.05
    #: Attention at position p is 1 / (1 + p) ** position_decay.
    position_decay: float = 0.7
    #: Bound (in logits) of the per user-item noise.
    noise: float = 0.3
    seed: int = 0
    #: Dirichlet concentration of interests: lower means more focused users.
    interest_concentration: float = 0.3
    #: Gradual drift: interests move 1 - exp(-rate * minutes) of the way to a target.
    drift_per_minute: float = 0.01
    #: Sudden shift: at this simulated second, shift_share of users get new interests.
    shift_at: Optional[float] = None
    shift_share: float = 1.0
    #: Viral burst: one item's click logit jumps by burst_boost, halving every half-life.
    burst_at: Optional[float] = None
    burst_boost: float = 3.0
    burst_half_life_s: float = 120.0
    #: Fresh items appeal more; the bonus halves every freshness_half_life_s.
    freshness_half_life_s: float = 3600.0
    #: Items older than this are deleted from the catalogue.
    item_lifetime_s: float = 2 * 86400.0
    #: Epoch seconds of t = 0, for event timestamps when no wall clock is given.
    epoch: float = 1_790_000_000.0
    #: Names this world's ids on the wire (see :func:`namespace`); changes nothing inside it.
    tag: str = ""

    def __post_init__(self):
        if not (self.tag == "" or self.tag.isalnum()):
            raise ValueError(f"a world's tag is letters and digits only, got {self.tag!r}")


def namespace(tag: str = "") -> str:
    """The prefix of every wire id of a world tagged ``tag``.

    >>> namespace(), namespace("7f3a")
    ('sim-', 'sim-7f3a-')
    """
    return f"sim-{tag}-" if tag else "sim-"


def user_id(u: int, tag: str = "") -> str:
    return f"{namespace(tag)}u{u}"


def item_id(i: int, tag: str = "") -> str:
    return f"{namespace(tag)}i{i}"


def author_id(a: int, tag: str = "") -> str:
    return f"{namespace(tag)}a{a}"


def parse_item(wire_id: str, tag: str = "") -> Optional[int]:
    """The item index of a wire id of the world tagged ``tag``, or None for
    items not of that world (real data, or another run's world).

    >>> parse_item("sim-i12"), parse_item("movie-3"), parse_item("sim-x1-i12")
    (12, None, None)
    >>> parse_item("sim-x1-i12", "x1"), parse_item("sim-i12", "x1")
    (12, None)
    """
    prefix = namespace(tag) + "i"
    if isinstance(wire_id, str) and wire_id.startswith(prefix) and wire_id[len(prefix):].isdigit():
        return int(wire_id[len(prefix):])
    return None


def attention(position, decay: float):
    """Position bias: the chance a user looks at the item at ``position`` (0 = top).

    >>> float(attention(0, 0.7)), round(float(attention(3, 1.0)), 2)
    (1.0, 0.25)
    """
    return 1.0 / (1.0 + np.asarray(position, dtype=np.float64)) ** decay


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def head_probabilities(affinity, quality, author_affinity, author_quality, freshness,
                       objectionable, boost, seen, base: Sequence[float], noise=0.0) -> np.ndarray:
    """Marginal probability of every head, shape [n, len(ENGAGEMENT_HEADS)].

    Inputs are arrays (broadcast together) with values in [0, 1] except
    ``boost`` and ``noise`` (logits) and ``base`` (one logit per head, in
    ENGAGEMENT_HEADS order).  The structure:

    * click = seen * sigmoid(base + 5 (affinity - 0.35) + 1.5 (quality - 0.5)
      + (freshness - 0.5) + boost - objectionable + noise): rises with affinity;
    * like, save, share, comment, follow, long_dwell = click * sigmoid(...):
      they only follow a click, so each is at most the click probability;
      follow reads the user's affinity to the author and the author's quality;
    * see_less = seen * sigmoid(base + 5 (0.35 - affinity) + 2.5 objectionable ...)
      and report (4 objectionable): higher for low affinity and objectionable items.

    ``seen`` is the position bias (:func:`attention`): every head needs the
    user to look, so every probability falls with position.

    >>> p = head_probabilities([0.1, 0.9], 0.5, 0.5, 0.5, 0.5, 0, 0, 1.0,
    ...                        [BASE_LOGITS[h] for h in ENGAGEMENT_HEADS])
    >>> bool(p[1, 0] > p[0, 0]), bool(p[1, 6] < p[0, 6])     # click up, see_less down
    (True, True)
    """
    a, q, aa, aq, fresh, obj, boost, seen, noise = np.broadcast_arrays(*(
        np.atleast_1d(np.asarray(x, dtype=np.float64))
        for x in (affinity, quality, author_affinity, author_quality, freshness,
                  objectionable, boost, seen, noise)))
    b = dict(zip(ENGAGEMENT_HEADS, base))
    da = a - NEUTRAL_AFFINITY
    dq = q - 0.5
    click = _sigmoid(b["click"] + 5.0 * da + 1.5 * dq + (fresh - 0.5) + boost - obj + noise)
    given_click = {
        "like": _sigmoid(b["like"] + 3.0 * da + 2.0 * dq + noise / 2),
        "save": _sigmoid(b["save"] + 2.5 * da + 2.5 * dq),
        "share": _sigmoid(b["share"] + 2.0 * da + 1.5 * dq + boost / 2),
        "comment": _sigmoid(b["comment"] + 2.0 * da + dq),
        "follow": _sigmoid(b["follow"] + 3.0 * (aa - NEUTRAL_AFFINITY) + 3.0 * (aq - 0.5)),
        "long_dwell": _sigmoid(b["long_dwell"] + 3.0 * da + 2.0 * dq),
    }
    see_less = _sigmoid(b["see_less"] - 5.0 * da - dq + 2.5 * obj - noise / 2)
    report = _sigmoid(b["report"] - 2.0 * da + 4.0 * obj)
    cols = {"click": click, "see_less": see_less, "report": report,
            **{h: click * p for h, p in given_click.items()}}
    return np.clip(np.stack([seen * cols[h] for h in ENGAGEMENT_HEADS], axis=1), 0.0, 1.0)


def sample_engagements(probs: Mapping[str, float], rng: np.random.Generator) -> list[str]:
    """Draw the heads that fire for one impression, honouring the conditional
    structure: after-click heads fire only with a click, with probability
    P(head) / P(click), so every head's marginal rate is ``probs[head]``.

    Always draws one number per head, so the random stream stays aligned.

    >>> sample_engagements({"click": 1.0, "like": 1.0, "see_less": 0.0}, np.random.default_rng(0))
    ['click', 'like']
    """
    u = rng.random(len(ENGAGEMENT_HEADS))
    draw = dict(zip(ENGAGEMENT_HEADS, u))
    p_click = float(probs.get("click", 0.0))
    clicked = draw["click"] < p_click
    fired = []
    for head in ENGAGEMENT_HEADS:
        p = float(probs.get(head, 0.0))
        if head == "click":
            hit = clicked
        elif head in AFTER_CLICK:
            hit = clicked and draw[head] < p / p_click
        else:
            hit = draw[head] < p
        if hit:
            fired.append(head)
    return fired


def expected_value(probs: Mapping[str, float], weights: Optional[Mapping[str, float]] = None) -> float:
    """True expected value of one impression under the system's value model.

    >>> round(expected_value({"click": 0.5, "see_less": 0.1}), 6)
    0.1
    """
    return value_score(probs, weights if weights is not None else weights_for(SURFACE))


def expected_values(matrix: np.ndarray, weights: Optional[Mapping[str, float]] = None) -> np.ndarray:
    """:func:`expected_value` for every row of a [n, ENGAGEMENT_HEADS] matrix.

    >>> expected_values(np.eye(len(ENGAGEMENT_HEADS))[:2]).tolist()
    [1.0, 2.0]
    """
    weights = weights if weights is not None else weights_for(SURFACE)
    w = np.array([weights.get(h, 0.0) for h in ENGAGEMENT_HEADS])
    return np.asarray(matrix, dtype=np.float64) @ w


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class World:
    """Users, authors and a growing catalogue; call :meth:`step` as time passes.

    >>> w = World(WorldConfig(n_users=4, n_authors=2, items_per_author=3, items_per_minute=60))
    >>> w.n_items, w.step(5.0), w.n_items
    (6, 5, 11)
    """

    def __init__(self, config: WorldConfig = WorldConfig()):
        self.config = c = config
        self.weights = weights_for(SURFACE)
        # Separate streams: creating items never shifts the samples, and vice versa.
        init = np.random.default_rng([c.seed, 1])
        self._create_rng = np.random.default_rng([c.seed, 2])
        self.rng = np.random.default_rng([c.seed, 3])
        self.policy_rng = np.random.default_rng([c.seed, 4])
        alpha = np.full(c.topics, c.interest_concentration)
        self.interests = init.dirichlet(alpha, c.n_users)
        self.drift_target = init.dirichlet(alpha, c.n_users)
        self.shifted_interests = init.dirichlet(alpha, c.n_users)
        self.shifted = init.random(c.n_users) < c.shift_share
        self.activity = init.lognormal(0.0, 0.75, c.n_users)
        means = np.array([BASE_LOGITS[h] for h in ENGAGEMENT_HEADS])
        self.base = means + init.normal(0.0, 0.4, (c.n_users, len(ENGAGEMENT_HEADS)))
        self.user_noise = _unit(init.normal(size=(c.n_users, _NOISE_DIM)))
        self.author_topics = init.dirichlet(alpha, c.n_authors)
        self.author_quality = init.beta(2.0, 2.0, c.n_authors)
        self.author_output = init.lognormal(0.0, 0.5, c.n_authors)
        # Items: arrays grown by _create; the initial catalogue was made over the last day.
        self.item_topics = np.zeros((0, c.topics))
        self.item_quality = np.zeros(0)
        self.item_author = np.zeros(0, dtype=np.int64)
        self.item_objectionable = np.zeros(0, dtype=bool)
        self.item_created = np.zeros(0)
        self.item_noise = np.zeros((0, _NOISE_DIM))
        n0 = c.n_authors * c.items_per_author
        authors = np.repeat(np.arange(c.n_authors), c.items_per_author)
        self._create(authors, np.sort(init.uniform(-86400.0, 0.0, n0)), init)
        self.burst_item = int(init.integers(n0)) if n0 else None
        self._created_new = 0
        self.t = 0.0
        #: Observed positive engagements per item (what a popularity ranker can know).
        self.engagement_counts = np.zeros(n0)
        self.seen: dict[int, set] = defaultdict(set)

    # -- catalogue -----------------------------------------------------------------

    @property
    def n_items(self) -> int:
        return len(self.item_created)

    def _create(self, authors: np.ndarray, created: np.ndarray, rng: np.random.Generator) -> None:
        n = len(authors)
        near = self.author_topics[authors] * 20.0 + 0.05  # close to the author's topic mix
        topics = np.stack([rng.dirichlet(a) for a in near]) if n else np.zeros((0, self.config.topics))
        self.item_topics = np.vstack([self.item_topics, _unit(topics)])
        self.item_quality = np.r_[self.item_quality, rng.beta(2.0, 2.0, n)]
        self.item_author = np.r_[self.item_author, authors]
        self.item_objectionable = np.r_[self.item_objectionable,
                                        rng.random(n) < self.config.objectionable_share]
        self.item_created = np.r_[self.item_created, created]
        self.item_noise = np.vstack([self.item_noise, _unit(rng.normal(size=(n, _NOISE_DIM)))])
        if hasattr(self, "engagement_counts"):
            self.engagement_counts = np.r_[self.engagement_counts, np.zeros(n)]

    def step(self, t: float) -> int:
        """Advance to simulated second ``t``: create the items due by then.

        Drift, the shift and the burst are functions of ``t`` (see
        :meth:`interest_at`, :meth:`boost_at`), so they hold whatever the
        step sizes.  Returns how many items were created.
        """
        c = self.config
        self.t = max(self.t, t)
        due = int(math.floor(c.items_per_minute * self.t / 60.0 + 1e-9)) if c.items_per_minute > 0 else 0
        n = due - self._created_new
        if n <= 0:
            return 0
        p = self.author_output / self.author_output.sum()
        # One item at a time, so the draws do not depend on how time was stepped.
        for j in range(self._created_new + 1, due + 1):
            author = self._create_rng.choice(c.n_authors, p=p)
            self._create(np.array([author]), np.array([j * 60.0 / c.items_per_minute]),
                         self._create_rng)
        self._created_new = due
        return n

    def live_items(self, t: Optional[float] = None) -> np.ndarray:
        """Items created by ``t`` and not yet deleted (older than the lifetime)."""
        t = self.t if t is None else t
        age = t - self.item_created
        return np.flatnonzero((age >= 0) & (age < self.config.item_lifetime_s))

    def candidates(self, user: int, t: Optional[float] = None) -> np.ndarray:
        """The live catalogue minus what ``user`` has already been shown."""
        live = self.live_items(t)
        seen = self.seen.get(user)
        if not seen:
            return live
        return live[~np.isin(live, np.fromiter(seen, dtype=np.int64, count=len(seen)))]

    # -- drift and burst -----------------------------------------------------------

    def interest_at(self, user: int, t: float) -> np.ndarray:
        """The user's unit interest vector at ``t``: gradual drift toward a target,
        and a jump to new interests at ``shift_at`` for the shifted users."""
        c = self.config
        shifted = c.shift_at is not None and t >= c.shift_at and self.shifted[user]
        start = self.shifted_interests[user] if shifted else self.interests[user]
        w = 1.0 - math.exp(-c.drift_per_minute * max(t, 0.0) / 60.0)
        return _unit((1.0 - w) * start + w * self.drift_target[user])

    def boost_at(self, items: np.ndarray, t: float) -> np.ndarray:
        """Extra click logit of each item: the viral burst, decaying after it starts."""
        c = self.config
        out = np.zeros(len(items))
        if c.burst_at is None or self.burst_item is None or t < c.burst_at:
            return out
        out[np.asarray(items) == self.burst_item] = c.burst_boost * 0.5 ** (
            (t - c.burst_at) / c.burst_half_life_s)
        return out

    # -- true probabilities --------------------------------------------------------

    def probability_matrix(self, user: int, items, positions, t: float) -> np.ndarray:
        """True marginal probabilities, [len(items), ENGAGEMENT_HEADS], at ``t``."""
        c = self.config
        items = np.asarray(items, dtype=np.int64)
        interest = self.interest_at(user, t)
        authors = self.item_author[items]
        age = np.maximum(t - self.item_created[items], 0.0)
        return head_probabilities(
            affinity=self.item_topics[items] @ interest,
            quality=self.item_quality[items],
            author_affinity=_unit(self.author_topics[authors]) @ interest,
            author_quality=self.author_quality[authors],
            freshness=0.5 ** (age / c.freshness_half_life_s),
            objectionable=self.item_objectionable[items].astype(np.float64),
            boost=self.boost_at(items, t),
            seen=attention(positions, c.position_decay),
            base=self.base[user],
            noise=c.noise * (self.item_noise[items] @ self.user_noise[user]))

    def true_probabilities(self, user: int, item: int, position: int, t: float) -> dict[str, float]:
        """True probability of every head for ``user`` shown ``item`` at ``position``
        at time ``t`` (see :func:`head_probabilities` for the structure)."""
        row = self.probability_matrix(user, [item], [position], t)[0]
        return {h: float(p) for h, p in zip(ENGAGEMENT_HEADS, row)}

    # -- events --------------------------------------------------------------------

    def events_for(self, user: int, served: Sequence[int], request_id: str, t: float, *,
                   ts: Optional[float] = None, surface: str = SURFACE) -> list[EngagementEvent]:
        """Impressions of ``served`` (in order, with position and request id), then
        the engagements sampled from the true probabilities.

        A click brings a ``dwell`` event: ``dwell_ms`` >= LONG_DWELL_MS when the
        long_dwell head fired, shorter otherwise.  Marks the items as seen by
        the user and counts positives for :func:`models.policies.popularity_policy`.

        >>> w = World(WorldConfig(n_users=2, n_authors=2, items_per_author=2))
        >>> evs = w.events_for(0, [1, 3], "r1", t=0.0)
        >>> [(e.event_type, e.item_id, e.position) for e in evs[:2]]
        [('impression', 'sim-i1', 0), ('impression', 'sim-i3', 1)]
        """
        ts = self.config.epoch + t if ts is None else ts
        tag = self.config.tag
        uid = user_id(user, tag)
        served = [int(i) for i in served]

        def event(item: int, kind: str, pos: int, at: float, dwell_ms=None) -> EngagementEvent:
            return EngagementEvent(
                event_id=f"{request_id}-{pos}-{kind}", user_id=uid, item_id=item_id(item, tag),
                event_type=kind, surface=surface, ts=at,
                author_id=author_id(int(self.item_author[item]), tag), request_id=request_id,
                position=pos, dwell_ms=dwell_ms)

        out = [event(item, "impression", pos, ts) for pos, item in enumerate(served)]
        if served:
            probs = self.probability_matrix(user, served, np.arange(len(served)), t)
        for pos, item in enumerate(served):
            fired = sample_engagements(dict(zip(ENGAGEMENT_HEADS, probs[pos])), self.rng)
            at = ts + 1.0 + 0.1 * pos  # engagements follow their impression
            for head in fired:
                if head != "long_dwell":
                    out.append(event(item, head, pos, at))
            if "click" in fired:
                dwell = (LONG_DWELL_MS + int(self.rng.exponential(20_000))
                         if "long_dwell" in fired else int(self.rng.uniform(500, LONG_DWELL_MS - 1)))
                out.append(event(item, "dwell", pos, at, dwell_ms=dwell))
            self.engagement_counts[item] += sum(h in POSITIVE_HEADS for h in fired)
        self.seen[user].update(served)
        return out

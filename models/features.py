"""Training examples and the tensors the learned models read.

An :class:`Example` is one impression and what followed it, together with the
features serving could see at that moment (so training and serving read the
same inputs).  It travels as JSON on a Kafka topic (:meth:`Example.to_dict`).
:func:`collate` hashes ids and turns a list of examples into a :class:`Batch`.

>>> ex = Example("u1", "i1", "a1", "explore", ts=1.0, labels=labels_from_events(["like"], None),
...              user_recent=["i0"], user_authors={"a1": 2})
>>> batch = collate([ex], FeatureConfig(hash_size=1024))
>>> batch.size, batch.labels[0, HEADS.index("like")].item(), batch.interaction[0, 1].item()
(1, 1.0, 1.0)
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from models.sources import SOURCES

from models.labels import HEADS, LONG_DWELL_MS  # noqa: E402  (one definition of the heads)
#: A view at least this long counts as a long dwell.
#: Positive engagements remembered per user (``Example.user_recent``).
MAX_RECENT = 20
#: Retrieval sources whose scores the ranker reads, in a fixed order.
SOURCE_NAMES = tuple(SOURCES)

ITEM_SIDE = ("log_pos", "log_imp", "log_see_less", "log_report", "pos_rate", "see_less_rate",
             "report_rate", "log_age_h")
POSITION = ("log_position", "position_known")
INTERACTION = ("log_author_count", "author_known", "author_share", "log_user_positives",
               "log_recent", "log_author_imp", "author_click_rate", "author_pos_rate",
               "author_neg_rate", "author_click_lift", "log_user_imp", "user_click_rate",
               "user_pos_rate", "user_neg_rate") + tuple(f"source:{s}" for s in SOURCE_NAMES) + (
               "tower_dot",)
#: Column of the two-tower dot product in ``Batch.interaction``.
TOWER_DOT = len(INTERACTION) - 1


@dataclass
class Example:
    """One impression and what followed, plus the serving-time features.

    ``labels`` maps head -> 0/1; a head missing from it has no label for this
    example (the data cannot tell) and is masked out of the loss.
    """
    user_id: str
    item_id: str
    author_id: Optional[str]
    surface: str
    ts: float
    position: Optional[int] = None
    labels: dict = field(default_factory=dict)
    #: The user's last <= MAX_RECENT positive items before this impression, oldest first.
    user_recent: list = field(default_factory=list)
    #: Author -> how many of the user's positives were on that author's items.
    user_authors: dict = field(default_factory=dict)
    #: The item's counters so far: pos, imp, see_less, report.
    item_counts: dict = field(default_factory=dict)
    #: Seconds since the item's first event (0 if unknown).
    item_age_s: float = 0.0
    #: Retrieval source -> normalised score (empty if the item was not retrieved).
    source_scores: dict = field(default_factory=dict)
    #: The request that showed the item; groups items for first-stage distillation.
    request_id: Optional[str] = None
    #: This user's [impressions, clicks, deeper positives, negatives] on the item's author
    #: (:meth:`~models.history.UserHistory.author_stats`), and over all authors.
    user_author: list = field(default_factory=list)
    user_totals: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-safe dict (see :meth:`from_dict`).

        >>> Example.from_dict(Example("u", "i", None, "home", 2.0).to_dict()).surface
        'home'
        """
        return asdict(self)

    @classmethod
    def from_record(cls, d: dict) -> "Example":
        """A training example from a label-join record: serving's own prediction
        (``predicted``) rides along for the stability monitor and is not a feature."""
        return cls.from_dict({k: v for k, v in d.items() if k != "predicted"})

    @classmethod
    def from_dict(cls, d: dict) -> "Example":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown example fields: {sorted(unknown)}")
        bad = set(d.get("labels") or {}) - set(HEADS)
        if bad:
            raise ValueError(f"unknown heads in labels: {sorted(bad)}")
        return cls(
            user_id=str(d["user_id"]), item_id=str(d["item_id"]),
            author_id=None if d.get("author_id") is None else str(d["author_id"]),
            surface=str(d["surface"]), ts=float(d["ts"]),
            position=None if d.get("position") is None else int(d["position"]),
            labels={k: int(v) for k, v in (d.get("labels") or {}).items()},
            user_recent=[str(i) for i in d.get("user_recent") or []][-MAX_RECENT:],
            user_authors={str(k): int(v) for k, v in (d.get("user_authors") or {}).items()},
            item_counts={str(k): int(v) for k, v in (d.get("item_counts") or {}).items()},
            item_age_s=float(d.get("item_age_s") or 0.0),
            source_scores={str(k): float(v) for k, v in (d.get("source_scores") or {}).items()},
            request_id=None if d.get("request_id") is None else str(d["request_id"]),
            user_author=_counts(d.get("user_author")), user_totals=_counts(d.get("user_totals")))


def _counts(value) -> list:
    counts = [float(x) for x in value or []][:4]
    return counts + [0] * (4 - len(counts)) if counts else []


def labels_from_events(event_types: Iterable[str], dwell_ms: Optional[int]) -> dict[str, int]:
    """Every head's label from the events that followed one impression.

    A head is 1 when its event happened (``click`` means an explicit click);
    ``long_dwell`` when the longest dwell reached :data:`LONG_DWELL_MS`.

    >>> labels_from_events(["impression", "click", "like"], 12_000)
    {'click': 1, 'like': 1, 'save': 0, 'share': 0, 'comment': 0, 'follow': 0, 'see_less': 0, 'long_dwell': 1}
    """
    seen = set(event_types)
    labels = {head: int(head in seen) for head in HEADS}
    labels["long_dwell"] = int(dwell_ms is not None and dwell_ms >= LONG_DWELL_MS)
    return labels


@functools.lru_cache(maxsize=1 << 20)
def hash_id(value: str, size: int, salt: str) -> int:
    """A bucket in ``[0, size)`` for ``value``, the same in every process and run.

    The salt keeps features apart: a user and an item with the same id land
    in unrelated buckets.

    >>> hash_id("42", 1000, "item") == hash_id("42", 1000, "item")
    True
    >>> 0 <= hash_id("42", 1000, "user") < 1000
    True
    """
    # Cached: serving hashes the same users' recent items for every candidate.
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8, person=salt.encode("utf-8")[:16])
    return int.from_bytes(digest.digest(), "little") % size


class CollisionCounter:
    """How many distinct ids share a hash bucket, per feature.

    >>> c = CollisionCounter()
    >>> for v, b in [("x", 1), ("y", 1), ("z", 2), ("x", 1)]:
    ...     c.add("item", v, b)
    >>> c.report()["item"]
    {'ids': 3, 'buckets': 2, 'collisions': 1, 'ids_sharing_share': 0.6667}
    """

    def __init__(self):
        self._ids: dict[str, dict[str, int]] = {}

    def add(self, feature: str, value: str, bucket: int) -> None:
        self._ids.setdefault(feature, {})[value] = bucket

    def observe(self, feature: str, value: str, size: int, salt: Optional[str] = None) -> int:
        """Hash ``value`` (salt defaults to the feature name), remember it, return its bucket."""
        bucket = hash_id(value, size, feature if salt is None else salt)
        self.add(feature, value, bucket)
        return bucket

    def report(self) -> dict:
        """Per feature: ids seen, buckets used, ids beyond one per bucket, and the
        share of ids that share their bucket with another id."""
        out = {}
        for feature, ids in self._ids.items():
            per_bucket: dict[int, int] = {}
            for bucket in ids.values():
                per_bucket[bucket] = per_bucket.get(bucket, 0) + 1
            sharing = sum(n for n in per_bucket.values() if n > 1)
            out[feature] = {"ids": len(ids), "buckets": len(per_bucket),
                            "collisions": len(ids) - len(per_bucket),
                            "ids_sharing_share": round(sharing / len(ids), 4) if ids else 0.0}
        return out


@dataclass(frozen=True)
class FeatureConfig:
    """Hash table sizes.  Model configs carry the same fields, so either may be
    passed to :func:`collate`."""
    hash_size: int = 2 ** 16
    author_size: int = 2 ** 12
    surface_size: int = 64


@dataclass
class Batch:
    """Tensors for a list of examples (B rows)."""
    user_ids: torch.Tensor        # [B] long
    item_ids: torch.Tensor        # [B] long
    author_ids: torch.Tensor      # [B] long
    surface_ids: torch.Tensor     # [B] long
    recent_ids: torch.Tensor      # [N] long, all rows' recent items concatenated
    recent_offsets: torch.Tensor  # [B] long, where each row's recent items start
    item_side: torch.Tensor       # [B, len(ITEM_SIDE)]
    position: torch.Tensor        # [B, len(POSITION)]
    interaction: torch.Tensor     # [B, len(INTERACTION)]; last column is the tower dot
    labels: torch.Tensor          # [B, len(HEADS)]
    label_mask: torch.Tensor      # [B, len(HEADS)]; 1 where the label is known
    request_ids: list = field(default_factory=list)
    surfaces: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.user_ids.shape[0])

    def take(self, rows: Sequence[int]) -> "Batch":
        """The batch of only ``rows`` (in that order), e.g. the served items of a
        request whose candidates were all scored.

        >>> b = collate([Example("u", f"i{n}", None, "explore", 0.0) for n in range(3)],
        ...             FeatureConfig(hash_size=64))
        >>> torch.equal(b.take([2, 0]).item_ids, b.item_ids[[2, 0]])
        True
        """
        index = torch.tensor(list(rows), dtype=torch.long)
        starts = self.recent_offsets.tolist() + [len(self.recent_ids)]
        recent = [self.recent_ids[starts[r]:starts[r + 1]] for r in index.tolist()]
        lengths = torch.tensor([len(x) for x in recent], dtype=torch.long)
        offsets = torch.cumsum(lengths, 0) - lengths
        tensors = {name: getattr(self, name)[index] for name in TENSOR_FIELDS
                   if name not in ("recent_ids", "recent_offsets")}
        return Batch(**tensors, recent_ids=torch.cat(recent) if recent else self.recent_ids[:0],
                     recent_offsets=offsets,
                     request_ids=[self.request_ids[r] for r in index.tolist()],
                     surfaces=[self.surfaces[r] for r in index.tolist()])

    def at_positions(self, positions: Sequence[Optional[int]]) -> "Batch":
        """A copy with every row shown at ``positions`` (one per row)."""
        return Batch(**{**self.__dict__, "position": position_tensor(positions)})

    def with_tower_dot(self, dots: torch.Tensor) -> "Batch":
        """A copy whose interaction features hold the two-tower dot products."""
        interaction = self.interaction.clone()
        interaction[:, TOWER_DOT] = dots.detach().to(interaction.dtype)
        return Batch(**{**self.__dict__, "interaction": interaction})


def position_tensor(positions: Sequence[Optional[int]]) -> torch.Tensor:
    """The :data:`POSITION` features of rows shown at ``positions`` (None: not known)."""
    return torch.tensor([[math.log1p(p or 0), float(p is not None)] for p in positions],
                        dtype=torch.float32)


#: The :class:`Batch` fields that hold tensors.
TENSOR_FIELDS = ("user_ids", "item_ids", "author_ids", "surface_ids", "recent_ids",
                 "recent_offsets", "item_side", "position", "interaction", "labels", "label_mask")


def rate(hits: float, trials: float, prior: float = 0.1, strength: float = 10.0) -> float:
    """A smoothed ratio: pulls little-seen items towards ``prior``.

    >>> rate(0, 0), round(rate(50, 100), 3)
    (0.1, 0.464)
    """
    return (hits + prior * strength) / (trials + strength)


#: Prior click, deeper-positive and negative rates per impression of a user nobody knows.
USER_PRIOR = (0.15, 0.1, 0.02)


@dataclass
class ItemRow:
    """The item-side fields of one candidate: what :func:`collate_for_user` reads per row.

    ``user_author`` is the request's user's counts on this item's author (as in
    :attr:`Example.user_author`), so it varies by row even though the user does not.
    """
    item_id: str
    author_id: Optional[str]
    item_counts: dict = field(default_factory=dict)
    item_age_s: float = 0.0
    source_scores: dict = field(default_factory=dict)
    user_author: list = field(default_factory=list)


#: The item counters the item-side features read, in :class:`ItemColumns` order.
COUNT_KEYS = ("pos", "imp", "see_less", "report")


def _padded4(counts) -> list:
    return (list(counts) + [0, 0, 0, 0])[:4]


def source_row(scores: dict) -> list[float]:
    """Retrieval sources' scores in :data:`SOURCE_NAMES` order (0 where a source did not propose)."""
    return [float(scores.get(s, 0.0)) for s in SOURCE_NAMES]


@dataclass
class ItemColumns:
    """Many rows' item-side fields as columns (what :class:`ItemRow` holds per row).

    ``counts`` is [n, 4] in :data:`COUNT_KEYS` order, ``sources`` [n, len(SOURCE_NAMES)],
    ``user_author`` [n, 4] (the user's counts on each row's author).
    """
    item_ids: list
    author_ids: list
    counts: np.ndarray
    ages: np.ndarray
    sources: np.ndarray
    user_author: np.ndarray

    @classmethod
    def of(cls, rows) -> "ItemColumns":
        """From :class:`ItemRow` or :class:`Example` rows (both name the fields alike)."""
        return cls([r.item_id for r in rows], [r.author_id for r in rows],
                   _array([[r.item_counts.get(k, 0) for k in COUNT_KEYS] for r in rows], 4),
                   np.array([r.item_age_s for r in rows], dtype=np.float64),
                   _array([source_row(r.source_scores) for r in rows], len(SOURCE_NAMES)),
                   _array([_padded4(r.user_author) for r in rows], 4))


def _array(rows: list, width: int) -> np.ndarray:
    return np.array(rows, dtype=np.float64).reshape(-1, width)


def _rates(hits, trials, prior, strength):
    """:func:`rate` over arrays."""
    return (hits + prior * strength) / (trials + strength)


def item_side_matrix(counts: np.ndarray, ages: np.ndarray) -> np.ndarray:
    """The item-side features (:data:`ITEM_SIDE`) of many items: ``counts`` [n, 4] in
    :data:`COUNT_KEYS` order and ``ages`` [n] in seconds -> [n, 8].

    Counts as logs, and engagement rates smoothed towards typical ones so a
    little-seen item is not judged by two impressions.

    >>> [round(float(x), 3) for x in item_side_matrix(np.array([[3, 9, 1, 0]]), np.array([7200.0]))[0]]
    [1.386, 2.303, 0.693, 0.0, 0.316, 0.079, 0.005, 1.099]
    """
    pos, imp, see_less, report = counts.T
    # Engagements can arrive without a logged impression; never let a rate exceed 1.
    trials = np.maximum(imp, pos + see_less + report)
    return np.stack([np.log1p(pos), np.log1p(imp), np.log1p(see_less), np.log1p(report),
                     _rates(pos, trials, 0.3, 10.0), _rates(see_less, trials, 0.05, 10.0),
                     _rates(report, trials, 0.01, 10.0),
                     np.log1p(np.maximum(ages, 0.0) / 3600.0)], axis=1)


def engagement_rate_matrix(user_author: np.ndarray, user_totals: np.ndarray) -> np.ndarray:
    """The user's own engagement rates on each row's author and overall, smoothed:
    ``user_author`` [n, 4] and ``user_totals`` [4] or [n, 4] -> [n, 9].

    Overall rates shrink towards :data:`USER_PRIOR`; the author's rates shrink
    towards the user's overall ones, so an author the user was shown twice is
    judged mostly by the user's habits and an author shown twenty times by
    what the user did with it.

    >>> m = engagement_rate_matrix(np.array([[10, 5, 2, 0]]), np.array([100, 15, 8, 2]))
    >>> [round(float(x), 3) for x in m[0]]
    [2.398, 0.419, 0.173, 0.005, 1.028, 4.615, 0.15, 0.082, 0.02]
    """
    n = len(user_author)
    totals = np.broadcast_to(np.asarray(user_totals, dtype=np.float64), (n, 4))
    u_imp = totals[:, 0]
    u_rates = [_rates(totals[:, j], u_imp, p, 10.0) for j, p in zip((1, 2, 3), USER_PRIOR)]
    a_imp = user_author[:, 0]
    a_rates = [_rates(user_author[:, j], np.maximum(a_imp, user_author[:, j]), u, 3.0)
               for j, u in zip((1, 2, 3), u_rates)]
    return np.stack([np.log1p(a_imp)] + a_rates + [np.log(a_rates[0] / u_rates[0]),
                                                   np.log1p(u_imp)] + u_rates, axis=1)


def interaction_matrix(author_counts: np.ndarray, positives: np.ndarray, recent: np.ndarray,
                       user_author: np.ndarray, user_totals: np.ndarray,
                       sources: np.ndarray) -> np.ndarray:
    """What neither tower can compute alone (:data:`INTERACTION`): the user's affinity
    for each row's author, how retrieval scored the item; the tower dot is filled in
    later (0 here).  ``author_counts`` [n] are the user's recent positives on the row's
    author, ``positives`` [n] all of them, ``recent`` [n] how many recent items the
    user has; the rest as :func:`engagement_rate_matrix` and :class:`ItemColumns`.

    >>> m = interaction_matrix(np.array([2.0, 0.0]), np.array([4.0, 4.0]), np.array([3.0, 3.0]),
    ...                        np.zeros((2, 4)), np.zeros(4), np.zeros((2, len(SOURCE_NAMES))))
    >>> m.shape == (2, len(INTERACTION)), [round(float(x), 3) for x in m[:, 2]]
    (True, [0.5, 0.0])
    """
    n = len(author_counts)
    share = np.divide(author_counts, positives, out=np.zeros(n), where=positives > 0)
    return np.concatenate([
        np.stack([np.log1p(author_counts), (author_counts > 0).astype(np.float64), share,
                  np.log1p(positives), np.log1p(recent)], axis=1),
        engagement_rate_matrix(user_author, user_totals), sources, np.zeros((n, 1))], axis=1)


def collate_for_user(user: Example, items, config,
                     positions: Optional[Sequence[Optional[int]]] = None) -> Batch:
    """The :class:`Batch` of ``user`` shown each of ``items``, without an Example per row.

    Serving scores hundreds of candidates for one user: the user's fields are
    hashed and turned into features once, and the item-side features are
    computed a column at a time (``items`` is an :class:`ItemColumns`, or a list
    of :class:`ItemRow`).  The result equals ``collate([user with each row's
    item fields], config)``; ``positions`` (one per row) replaces
    ``user.position`` where given.  No labels: rows are masked.

    >>> cfg = FeatureConfig(hash_size=1024)
    >>> user = Example("u1", "", None, "explore", ts=5.0, user_recent=["i0"],
    ...                user_authors={"a1": 2}, user_totals=[10, 3, 1, 0])
    >>> rows = [ItemRow("i1", "a1", {"pos": 1, "imp": 4}, 60.0, {}, [4, 2, 1, 0]),
    ...         ItemRow("i2", None)]
    >>> fast = collate_for_user(user, rows, cfg, positions=[0, 1])
    >>> slow = collate([Example("u1", r.item_id, r.author_id, "explore", 5.0, position=p,
    ...                         user_recent=["i0"], user_authors={"a1": 2},
    ...                         item_counts=r.item_counts, item_age_s=r.item_age_s,
    ...                         user_author=r.user_author, user_totals=[10, 3, 1, 0])
    ...                 for r, p in zip(rows, [0, 1])], cfg)
    >>> all(torch.allclose(getattr(fast, f), getattr(slow, f)) for f in TENSOR_FIELDS)
    True
    """
    cols = items if isinstance(items, ItemColumns) else ItemColumns.of(items)
    n, hs = len(cols.item_ids), config.hash_size
    if not n:
        raise ValueError("cannot collate an empty list of items")
    recent = [hash_id(i, hs, "item") for i in user.user_recent[-MAX_RECENT:]]
    authors = user.user_authors
    interaction = interaction_matrix(
        np.array([authors.get(a, 0) if a is not None else 0 for a in cols.author_ids],
                 dtype=np.float64),
        np.full(n, float(sum(authors.values()))), np.full(n, float(len(user.user_recent))),
        cols.user_author, np.array(_padded4(user.user_totals), dtype=np.float64), cols.sources)
    if positions is None:
        positions = [user.position] * n
    long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return Batch(
        user_ids=torch.full((n,), hash_id(user.user_id, hs, "user"), dtype=torch.long),
        item_ids=long([hash_id(i, hs, "item") for i in cols.item_ids]),
        author_ids=long([hash_id(a or "", config.author_size, "author") for a in cols.author_ids]),
        surface_ids=torch.full((n,), hash_id(user.surface, config.surface_size, "surface"),
                               dtype=torch.long),
        recent_ids=long(recent).repeat(n), recent_offsets=torch.arange(n) * len(recent),
        item_side=torch.from_numpy(item_side_matrix(cols.counts, cols.ages).astype(np.float32)),
        position=position_tensor(positions),
        interaction=torch.from_numpy(interaction.astype(np.float32)),
        labels=torch.zeros((n, len(HEADS))), label_mask=torch.zeros((n, len(HEADS))),
        request_ids=[user.request_id] * n, surfaces=[user.surface] * n)


def collate(examples: Sequence[Example], config) -> Batch:
    """Hash and stack ``examples``; ``config`` is a :class:`FeatureConfig` or any
    model config with ``hash_size``, ``author_size`` and ``surface_size``."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    hs = config.hash_size
    recent, offsets = [], []
    labels, mask = [], []
    for ex in examples:
        offsets.append(len(recent))
        # Same salt as item ids, so a recent item and a candidate share a bucket space.
        recent.extend(hash_id(i, hs, "item") for i in ex.user_recent[-MAX_RECENT:])
        labels.append([float(ex.labels.get(h, 0)) for h in HEADS])
        mask.append([float(h in ex.labels) for h in HEADS])
    cols = ItemColumns.of(examples)
    long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return Batch(
        user_ids=long([hash_id(e.user_id, hs, "user") for e in examples]),
        item_ids=long([hash_id(e.item_id, hs, "item") for e in examples]),
        author_ids=long([hash_id(e.author_id or "", config.author_size, "author")
                         for e in examples]),
        surface_ids=long([hash_id(e.surface, config.surface_size, "surface") for e in examples]),
        recent_ids=long(recent), recent_offsets=long(offsets),
        item_side=torch.from_numpy(item_side_matrix(cols.counts, cols.ages).astype(np.float32)),
        position=position_tensor([e.position for e in examples]),
        interaction=torch.from_numpy(interaction_matrix(
            np.array([e.user_authors.get(e.author_id, 0) if e.author_id is not None else 0
                      for e in examples], dtype=np.float64),
            np.array([sum(e.user_authors.values()) for e in examples], dtype=np.float64),
            np.array([len(e.user_recent) for e in examples], dtype=np.float64),
            cols.user_author, _array([_padded4(e.user_totals) for e in examples], 4),
            cols.sources).astype(np.float32)),
        labels=torch.tensor(labels, dtype=torch.float32),
        label_mask=torch.tensor(mask, dtype=torch.float32),
        request_ids=[e.request_id for e in examples], surfaces=[e.surface for e in examples])

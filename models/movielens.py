"""MovieLens star ratings as engagements: one definition for the replay and the benchmarks.

A user who rates a movie watched it, so every rating is an engaged impression.
A good rating (4-5 stars) is a click and then a like; 3 stars is a click and no
more; 1-2 stars is a see_less.  The live replay (:mod:`streams.replay`) emits
these events after the rating's impression, and the label join turns them into
labels by the same rule as :func:`rating_labels` (a head is 1 when its event
happened), so offline figures describe the model that is deployed.

>>> rating_engagements(5), rating_labels(5)
(('click', 'like'), {'click': 1, 'like': 1, 'see_less': 0})
"""
from __future__ import annotations

import random
from typing import Iterable

#: The heads a rating speaks for; save, share, comment, follow and long dwell have
#: no signal in MovieLens (masked out of training, not reported).
RATED_HEADS = ("click", "like", "see_less")


def rating_engagements(rating: int) -> tuple[str, ...]:
    """The engagement events a star rating stands for, in the order they happen.

    >>> [rating_engagements(r) for r in (1, 2, 3, 4, 5)]
    [('see_less',), ('see_less',), ('click',), ('click', 'like'), ('click', 'like')]
    """
    if rating >= 4:
        return ("click", "like")
    return ("click",) if rating == 3 else ("see_less",)


def rating_labels(rating: int) -> dict[str, int]:
    """The labels of the rating's impression, for the heads MovieLens speaks for.

    >>> [rating_labels(r)["click"] for r in (2, 3, 4)], rating_labels(1)
    ([0, 1, 1], {'click': 0, 'like': 0, 'see_less': 1})
    """
    happened = rating_engagements(rating)
    return {head: int(head in happened) for head in RATED_HEADS}


#: Shown-but-ignored impressions the replay adds per rating (see :class:`IgnoredImpressions`).
IGNORED_PER_RATING = 2


def rated_by_user(pairs: Iterable[tuple]) -> dict:
    """Every movie each user rated, from ``(user, movie)`` pairs: what
    :class:`IgnoredImpressions` must never draw for that user.

    >>> rated_by_user([(1, 10), (1, 11), (2, 10)])
    {1: {10, 11}, 2: {10}}
    """
    rated: dict = {}
    for user, movie in pairs:
        rated.setdefault(user, set()).add(movie)
    return rated


class IgnoredImpressions:
    """Movies a user was shown and passed over, for a log that has none.

    MovieLens records only what users rated, so every impression made from it is
    an engaged one and a model trained on it learns that everything is clicked.
    A real feed shows many items per engagement.  This draws them: movies the
    user never rated (in the whole data set, so none is a later like), not shown
    to that user before, chosen in proportion to the likes so far, as a
    popularity-led surface would have shown them.  Seeded: the same calls give
    the same draws.

    >>> ignored = IgnoredImpressions({"u1": {"m1"}}, seed=0)
    >>> ignored.draw("u1", 2)                      # nothing liked yet: nothing to show
    []
    >>> for movie in ("m1", "m2", "m2", "m3"):
    ...     ignored.liked(movie)
    >>> shown = ignored.draw("u1", 2)
    >>> sorted(shown), ignored.draw("u1", 2)      # m1 rated by u1; m2, m3 shown once
    (['m2', 'm3'], [])
    """

    def __init__(self, rated: dict, seed: int = 0, tries: int = 20):
        self.rated = rated
        self.tries = tries
        self._rng = random.Random(seed)
        self._likes: list = []
        self._shown: dict = {}

    def liked(self, movie) -> None:
        """Count a like: later draws favour it in proportion to its likes."""
        self._likes.append(movie)

    def draw(self, user, n: int) -> list:
        """Up to ``n`` distinct movies to show ``user`` now as ignored impressions."""
        if not self._likes or n <= 0:
            return []
        rated = self.rated.get(user, ())
        shown = self._shown.setdefault(user, set())
        out = []
        for _ in range(n * self.tries):
            movie = self._likes[self._rng.randrange(len(self._likes))]
            if movie not in rated and movie not in shown:
                shown.add(movie)
                out.append(movie)
                if len(out) == n:
                    break
        return out

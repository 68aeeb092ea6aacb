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

"""Item quality rules: which items may seed retrieval, and which are objectionable.

Counts come from the stream (``item_stats``): positives, impressions,
see_less and report per item.  Rules are plain functions so they are easy to
read, test and change.

>>> poor_seed_reason({"pos": 10, "report": 4, "see_less": 0, "imp": 50})
'reported 4 times'
>>> poor_seed_reason({"pos": 10, "report": 0, "see_less": 1, "imp": 50}) is None
True
"""
from __future__ import annotations

from typing import Optional

#: An item reported this often, or this large a share of its engagements, is objectionable.
OBJECTIONABLE_REPORTS = 3
OBJECTIONABLE_REPORT_SHARE = 0.2
#: An item that many users said see_less to makes a poor seed.
POOR_SEED_SEE_LESS_SHARE = 0.3
POOR_SEED_MIN_SIGNALS = 5


def is_objectionable(q: Optional[dict]) -> bool:
    """Flagged by hand (``flagged``) or reported by many users."""
    if not q:
        return False
    if q.get("flagged"):
        return True
    reports = q.get("report", 0)
    return reports >= OBJECTIONABLE_REPORTS and reports >= OBJECTIONABLE_REPORT_SHARE * (
        q.get("pos", 0) + reports)


def poor_seed_reason(q: Optional[dict]) -> Optional[str]:
    """Why an item should not seed "more like this", or ``None`` if it may."""
    if not q:
        return None
    if is_objectionable(q):
        return f"reported {q.get('report', 0)} times" if not q.get("flagged") else "flagged"
    negative = q.get("see_less", 0)
    signals = negative + q.get("pos", 0)
    if signals >= POOR_SEED_MIN_SIGNALS and negative >= POOR_SEED_SEE_LESS_SHARE * signals:
        return f"see_less from {negative} of {signals} engaged users"
    return None

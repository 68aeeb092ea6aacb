"""Tables shared by more than one agent.

``user_history`` is written by :mod:`streams.ingest` and read by
:mod:`streams.serving`; both run on the user's partition, since events and
requests are keyed by user id with the same partition count.
``pending_labels`` is written by ingest and by the label clock in
:mod:`streams.labels`, on the same partitions.
"""
from __future__ import annotations

from streams.app import app
from streams.settings import settings

user_history = app.Table("user_history", default=None, partitions=settings.partitions)
#: user -> impressions waiting for their engagements (see streams.labels).
pending_labels = app.Table("pending_labels", default=None, partitions=settings.partitions)

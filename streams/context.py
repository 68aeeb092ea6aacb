"""Write Faust tables from batches.

A Faust table routes a write to the changelog partition (and RocksDB
partition) of the *current* stream event.  A batch from ``take_events`` mixes
partitions, so before writing a key we make an event from that key's own
partition the current one.
"""
from __future__ import annotations

import weakref

from faust import streams as faust_streams


def use_event(event) -> None:
    faust_streams._current_event.set(weakref.ref(event))

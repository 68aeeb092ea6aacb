"""Keep Python's full garbage collections off the serving path.

A worker holds a large, long-lived heap (item profiles, neighbour lists, user
histories, the model), and serving allocates hundreds of objects per request.
CPython then runs a full (generation 2) collection every few seconds, and each
one walks the whole heap with the event loop stopped: measured in
bench/serve.py at 50 requests/s with a model live, about 190 ms every 2.7 s,
finding almost no garbage (0 to 178 objects).  Those pauses were the
round-trip tail.

:func:`freeze` collects the young generations (where cyclic garbage is found)
and moves every surviving object to the permanent generation, which the
collector no longer walks; the timer repeats it so what the worker keeps later
is frozen too.  Frozen objects are still freed by reference counting; only a
reference cycle that forms among them after they were frozen is not reclaimed,
and full collections here find next to none.

>>> import gc
>>> freeze() > 0, gc.get_freeze_count() > 0
(True, True)
>>> gc.unfreeze()    # back to normal collection
"""
from __future__ import annotations

import gc

#: Seconds between freezes: what the worker allocated and kept since is walked by
#: full collections until the next one.
FREEZE_INTERVAL_S = 10.0


def freeze() -> int:
    """Collect generations 0 and 1, then freeze what survives; returns how many
    objects are frozen in all."""
    gc.collect(1)
    gc.freeze()
    return gc.get_freeze_count()

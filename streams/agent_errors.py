"""One error guard for the agents: count, log with context, apply the agent's policy.

An agent loop hands each unit of work (a batch, or one event) to
:func:`guarded` with the policy it states; the guard never lets an
``Exception`` out, so one bad input cannot stop the agent for every other
input.  Cancellation (a rebalance, the worker stopping) is not an
``Exception`` and goes through.

Policies (:class:`Policy`):

- ``ONE_BY_ONE``: retry each message of the failed batch alone; the messages
  that fail alone go to the dead-letter topic with the reason, the rest are
  applied.  For work whose input must not be lost (ingest, item_stats): a
  re-drive (``streamrec deadletters redrive``) brings the parked ones back.
- ``DEAD_LETTER``: every message of the failed work goes to the dead-letter
  topic with the reason.
- ``DROP``: count and log only, for work that is redone anyway: a label clock
  tick (the next tick closes the same windows), a request (its client's
  deadline ends it), a training batch (training must never stop serving; the
  next batch trains on).

Counters: ``<agent>_errors`` for each failed unit of work and
``<agent>_messages_failed`` for each message dead-lettered after failing alone.
"""
from __future__ import annotations

import enum
import logging
from typing import Awaitable, Callable, Optional, Sequence

from streams import metrics
from streams.deadletters import send_dead_letter

log = logging.getLogger(__name__)


class Policy(enum.Enum):
    ONE_BY_ONE = "retry one by one, dead-letter what fails alone"
    DEAD_LETTER = "dead-lettered"
    DROP = "dropped"


def failure_reason(agent: str, exc: BaseException) -> str:
    """The reason a dead letter carries.

    >>> failure_reason("ingest", KeyError("user_id"))
    "ingest failed: KeyError('user_id')"
    """
    return f"{agent} failed: {exc!r}"


def describe(events: Sequence) -> str:
    """Where the failed work came from, for the log: topic/partition and offsets.

    >>> from types import SimpleNamespace as NS
    >>> msg = lambda p, o: NS(value=b"", message=NS(topic="events", partition=p, offset=o))
    >>> describe([msg(0, 5), msg(0, 9), msg(2, 1)])
    '3 messages: events/0@5-9, events/2@1'
    >>> describe([msg(1, 7)]), describe([])
    ('1 message: events/1@7', 'no input message')
    """
    if not events:
        return "no input message"  # work of the agent's own, e.g. item_stats' publish
    offsets: dict[str, list[int]] = {}
    for event in events:
        msg = event.message
        offsets.setdefault(f"{msg.topic}/{msg.partition}", []).append(msg.offset)
    spans = [f"{tp}@{min(o)}" + (f"-{max(o)}" if max(o) != min(o) else "")
             for tp, o in offsets.items()]
    return f"{len(events)} message{'s' if len(events) != 1 else ''}: {', '.join(spans)}"


async def guarded(agent: str, work: Callable[[list], Awaitable[None]], events: Sequence,
                  policy: Policy, before_retry: Optional[Callable[[list], None]] = None) -> bool:
    """Run ``work(events)``; on an exception count it, log it and apply ``policy``.

    ``before_retry(events)`` runs before a ``ONE_BY_ONE`` retry (ingest notes that
    the failed attempt may have written part of the batch).  Returns whether
    ``work(events)`` itself succeeded.
    """
    events = list(events)
    try:
        await work(events)
        return True
    except Exception as exc:
        metrics.counters[f"{agent}_errors"] += 1
        log.exception("%s failed on %s; %s", agent, describe(events), policy.value)
        if policy is Policy.DEAD_LETTER:
            await dead_letter(agent, events, exc)
        elif policy is Policy.ONE_BY_ONE:
            if before_retry is not None:
                before_retry(events)
            for event in events:
                try:
                    await work([event])
                except Exception as alone:
                    # One line each: hostile input can fail thousands alone.
                    log.warning("%s failed on %s alone (%r); dead-lettered", agent,
                                describe([event]), alone)
                    await dead_letter(agent, [event], alone)
        return False


async def dead_letter(agent: str, events: Sequence, exc: BaseException) -> None:
    # send_dead_letter never raises: a broker that refuses it is counted there.
    for event in events:
        metrics.counters[f"{agent}_messages_failed"] += 1
        await send_dead_letter(event.value, failure_reason(agent, exc), event.message)

"""Ask for recommendations over the request/reply topics and wait for the answer.

Each client picks one partition of ``rec.replies``, names it in its requests'
``reply_partition``, and reads only that partition, from its end, with no
consumer group (no rebalances, no offsets to commit).  Replies are matched to
waiting callers by ``request_id`` (a UUID), so clients sharing a partition
never see each other's answers.

Every request ends by its deadline: with the reply (which may be the worker's
fallback, or an ``error`` for a refused request) or with
:class:`RecommendationTimeout`.  A reply that comes later, or a second reply
to the same request (a redelivered request answered again after a worker
crash), is dropped and counted in :attr:`RecommendationClient.counts`.

>>> with RecommendationClient("127.0.0.1:9092") as c:      # doctest: +SKIP
...     reply = c.recommend("42", "explore", k=10, timeout=1.0)
"""
from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter, OrderedDict
from concurrent.futures import Future
from typing import Callable, Optional, Sequence

from confluent_kafka import Consumer, Producer, TopicPartition

from schemas.requests import RecommendationReply, RecommendationRequest, decode_reply
from schemas.topics import REPLIES, REQUESTS
from streams.kafka_config import client_config


class RecommendationTimeout(TimeoutError):
    pass


class PendingReplies:
    """Requests waiting for their reply, each with a deadline, and what happened to
    the last ``remember`` finished ones, so that a reply arriving after its
    request is over is recognised: ``late_replies`` (the deadline had passed) or
    ``duplicate_replies`` (it had been answered); ``other_replies`` are another
    client's on the same partition.  No Kafka here: the client's reader thread
    calls :meth:`reply`, its deadline thread :meth:`expire`.

    >>> pending = PendingReplies(remember=100)
    >>> a, b = pending.add("a", deadline=10.0, timeout=1.0), pending.add("b", 10.0, 1.0)
    >>> pending.reply("a", b'{"request_id": "a"}'); pending.reply("a", b'{"request_id": "a"}')
    >>> pending.expire(now=10.0); pending.reply("b", b'{}'); pending.reply("c", b'{}')
    >>> a.result(), type(b.exception()).__name__
    ('{"request_id": "a"}', 'RecommendationTimeout')
    >>> sorted(pending.counts.items())  # doctest: +NORMALIZE_WHITESPACE
    [('answered', 1), ('duplicate_replies', 1), ('expired', 1), ('late_replies', 1),
     ('other_replies', 1), ('sent', 2)]
    """

    def __init__(self, remember: int = 100_000, decode: Callable[[bytes], object] = bytes.decode):
        self.remember = remember
        self.decode = decode
        #: request_id -> (future, monotonic deadline, timeout): every request waits here.
        self._waiting: dict[str, tuple[Future, float, float]] = {}
        #: request_id -> "answered" | "expired", oldest first.
        self._finished: OrderedDict[str, str] = OrderedDict()
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, request_id: str, deadline: float, timeout: float) -> Future:
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        with self._lock:
            self._waiting[request_id] = (fut, deadline, timeout)
            self.counts["sent"] += 1
        return fut

    def forget(self, request_id: str) -> None:
        """The request was never sent."""
        with self._lock:
            if self._waiting.pop(request_id, None) is not None:
                self.counts["sent"] -= 1

    def _finish(self, request_id: str, outcome: str) -> None:
        self._finished[request_id] = outcome
        self.counts[outcome] += 1
        if len(self._finished) > self.remember:
            self._finished.popitem(last=False)

    def reply(self, request_id: str, raw: bytes) -> None:
        with self._lock:
            entry = self._waiting.pop(request_id, None)
            if entry is None:
                outcome = self._finished.get(request_id)
                kind = {"answered": "duplicate", "expired": "late"}.get(outcome, "other")
                self.counts[f"{kind}_replies"] += 1
                return
            self._finish(request_id, "answered")
        try:
            value = self.decode(raw)
        except Exception as exc:  # a malformed reply fails only its own future
            entry[0].set_exception(exc)
        else:
            entry[0].set_result(value)

    def expire(self, now: float) -> None:
        """Fail the futures of requests whose deadline (monotonic) has passed."""
        with self._lock:
            expired = [(rid, entry) for rid, entry in self._waiting.items() if entry[1] <= now]
            for rid, _ in expired:
                del self._waiting[rid]
                self._finish(rid, "expired")
        for rid, (fut, _, timeout) in expired:
            fut.set_exception(RecommendationTimeout(
                f"no reply to request {rid} within {timeout * 1000:.0f} ms"))

    def fail_all(self, reason: str) -> None:
        with self._lock:
            waiting = list(self._waiting.values())
            self._waiting.clear()
        for fut, _, _ in waiting:
            fut.set_exception(RecommendationTimeout(reason))


class RecommendationClient:
    def __init__(self, bootstrap: str, *, reply_partition: Optional[int] = None,
                 fetch_wait_ms: int = 2):
        self._producer = Producer(client_config(bootstrap, {"linger.ms": 0,
                                   "partitioner": "murmur2_random", "acks": 1}))
        self._consumer = Consumer(client_config(bootstrap, {"group.id": "streamrec-client",
                                   "enable.auto.commit": False,
                                   "fetch.wait.max.ms": fetch_wait_ms}))
        partitions = self._consumer.list_topics(REPLIES, timeout=10).topics[REPLIES].partitions
        if not partitions:
            raise RuntimeError(f"topic {REPLIES!r} does not exist: run 'streamrec topics create'")
        self.reply_partition = (reply_partition if reply_partition is not None
                                else random.choice(sorted(partitions)))
        tp = TopicPartition(REPLIES, self.reply_partition)
        # Start at the current end, resolved now, so no reply sent after this is missed.
        tp.offset = self._consumer.get_watermark_offsets(tp, timeout=10)[1]
        self._consumer.assign([tp])
        self._pending = PendingReplies(decode=decode_reply)
        #: sent, answered, expired, late_replies, duplicate_replies, other_replies.
        self.counts = self._pending.counts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_replies, daemon=True,
                                        name="reply-reader")
        self._thread.start()
        # Deadlines are kept by a thread of their own: a Kafka call that blocks (the
        # broker gone, say) must not hold a request past its deadline.
        self._timer = threading.Thread(target=self._expire_requests, daemon=True,
                                       name="reply-deadlines")
        self._timer.start()

    def _read_replies(self) -> None:
        while not self._stop.is_set():
            try:
                # poll() returns as soon as one reply arrives (consume(n, timeout) would
                # wait for n messages or the whole timeout); then drain what is buffered.
                first = self._consumer.poll(0.01)
                batch = [first] + self._consumer.consume(100, timeout=0) if first is not None else []
                for msg in batch:
                    if msg.error() or msg.value() is None:
                        continue
                    self._pending.reply((msg.key() or b"").decode(errors="replace"), msg.value())
            except Exception:  # the reader must outlive anything the broker sends
                self.counts["reader_errors"] += 1
                time.sleep(0.1)

    def _expire_requests(self) -> None:
        while not self._stop.wait(0.01):
            self._pending.expire(time.monotonic())

    def request(self, req: RecommendationRequest, timeout: float) -> RecommendationReply:
        """Send ``req`` and wait for its reply; raises :class:`RecommendationTimeout`."""
        # The deadline thread fails the future at the deadline; the extra second only
        # guards against that thread being gone.
        return self.submit_request(req, timeout).result(timeout + 1.0)

    def _new_request(self, user_id, surface: str, k: int, timeout: float,
                     exclude: Sequence[str], context: Optional[dict]) -> RecommendationRequest:
        now = time.time()
        return RecommendationRequest(
            request_id=uuid.uuid4().hex, user_id=str(user_id), surface=surface, k=k,
            deadline=now + timeout, exclude=tuple(str(x) for x in exclude),
            context=context or {}, reply_partition=self.reply_partition, sent_at=now)

    def recommend(self, user_id, surface: str = "explore", k: int = 10, *,
                  timeout: float = 1.0, exclude: Sequence[str] = (),
                  context: Optional[dict] = None) -> RecommendationReply:
        """Send a request whose deadline is ``timeout`` from now and wait for its reply."""
        return self.request(self._new_request(user_id, surface, k, timeout, exclude, context),
                            timeout)

    def submit_request(self, req: RecommendationRequest, timeout: float) -> "Future[RecommendationReply]":
        """Send ``req`` without waiting; the future resolves to its reply.

        The future fails with :class:`RecommendationTimeout` about ``timeout``
        seconds after sending (checked every ~10 ms).
        Callbacks added to it run on the client's reader or deadline thread: keep
        them short.
        """
        fut = self._pending.add(req.request_id, time.monotonic() + timeout, timeout)
        try:
            self._producer.produce(REQUESTS, key=req.user_id.encode(), value=req.to_json())
        except BaseException:
            self._pending.forget(req.request_id)
            raise
        self._producer.poll(0)
        return fut

    def submit(self, user_id, surface: str = "explore", k: int = 10, *,
               timeout: float = 1.0, exclude: Sequence[str] = (),
               context: Optional[dict] = None) -> "Future[RecommendationReply]":
        """Like :meth:`recommend` but non-blocking: returns a
        :class:`concurrent.futures.Future` for the reply."""
        return self.submit_request(
            self._new_request(user_id, surface, k, timeout, exclude, context), timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._timer.join(timeout=2)
        self._pending.fail_all("client closed before the reply arrived")
        self._producer.flush(5)
        self._consumer.close()

    def __enter__(self) -> "RecommendationClient":
        return self

    def __exit__(self, *_) -> None:
        self.close()

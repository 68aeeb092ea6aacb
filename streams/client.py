"""Ask for recommendations over the request/reply topics and wait for the answer.

Each client picks one partition of ``rec.replies``, names it in its requests'
``reply_partition``, and reads only that partition, from its end, with no
consumer group (no rebalances, no offsets to commit).  Replies are matched to
waiting callers by ``request_id`` (a UUID), so clients sharing a partition
never see each other's answers.

>>> with RecommendationClient("127.0.0.1:9092") as c:      # doctest: +SKIP
...     reply = c.recommend("42", "explore", k=10, timeout=1.0)
"""
from __future__ import annotations

import random
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Optional, Sequence

from confluent_kafka import Consumer, Producer, TopicPartition

from schemas.requests import RecommendationReply, RecommendationRequest, decode_reply
from schemas.topics import REPLIES, REQUESTS


class RecommendationTimeout(TimeoutError):
    pass


class RecommendationClient:
    def __init__(self, bootstrap: str, *, reply_partition: Optional[int] = None,
                 fetch_wait_ms: int = 2):
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0,
                                   "partitioner": "murmur2_random", "acks": 1})
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "streamrec-client",
                                   "enable.auto.commit": False,
                                   "fetch.wait.max.ms": fetch_wait_ms})
        partitions = self._consumer.list_topics(REPLIES, timeout=10).topics[REPLIES].partitions
        if not partitions:
            raise RuntimeError(f"topic {REPLIES!r} does not exist: run 'streamrec topics create'")
        self.reply_partition = (reply_partition if reply_partition is not None
                                else random.choice(sorted(partitions)))
        tp = TopicPartition(REPLIES, self.reply_partition)
        # Start at the current end, resolved now, so no reply sent after this is missed.
        tp.offset = self._consumer.get_watermark_offsets(tp, timeout=10)[1]
        self._consumer.assign([tp])
        #: request_id -> (future, monotonic deadline, timeout): every request waits here.
        self._futures: dict[str, tuple[Future, float, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_replies, daemon=True,
                                        name="reply-reader")
        self._thread.start()

    def _read_replies(self) -> None:
        next_sweep = 0.0
        while not self._stop.is_set():
            # poll() returns as soon as one reply arrives (consume(n, timeout) would
            # wait for n messages or the whole timeout); then drain what is buffered.
            first = self._consumer.poll(0.01)
            batch = [first] + self._consumer.consume(100, timeout=0) if first is not None else []
            for msg in batch:
                if msg.error() or msg.value() is None:
                    continue
                request_id = (msg.key() or b"").decode()
                with self._lock:
                    pending = self._futures.pop(request_id, None)
                if pending is not None:
                    self._resolve(pending[0], msg.value())
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + 0.01
                self._expire(now)

    @staticmethod
    def _resolve(fut: Future, raw: bytes) -> None:
        try:
            reply = decode_reply(raw)
        except Exception as exc:  # a malformed reply fails only its own future
            fut.set_exception(exc)
        else:
            fut.set_result(reply)

    def _expire(self, now: float) -> None:
        """Fail the futures of requests whose timeout has passed."""
        with self._lock:
            if not self._futures:
                return
            expired = [(rid, entry) for rid, entry in self._futures.items() if entry[1] <= now]
            for rid, _ in expired:
                del self._futures[rid]
        for rid, (fut, _, timeout) in expired:
            fut.set_exception(RecommendationTimeout(
                f"no reply to request {rid} within {timeout * 1000:.0f} ms"))

    def request(self, req: RecommendationRequest, timeout: float) -> RecommendationReply:
        """Send ``req`` and wait for its reply; raises :class:`RecommendationTimeout`."""
        # The reader thread fails the future at the deadline; the extra second only
        # guards against a reader that is gone.
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
        seconds after sending (checked every ~10 ms by the reply reader).
        Callbacks added to it run on the reply-reader thread: keep them short.
        """
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        with self._lock:
            self._futures[req.request_id] = (fut, time.monotonic() + timeout, timeout)
        try:
            self._producer.produce(REQUESTS, key=req.user_id.encode(), value=req.to_json())
        except BaseException:
            with self._lock:
                self._futures.pop(req.request_id, None)
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
        with self._lock:
            pending = list(self._futures.values())
            self._futures.clear()
        for fut, _, _ in pending:
            fut.set_exception(RecommendationTimeout("client closed before the reply arrived"))
        self._producer.flush(5)
        self._consumer.close()

    def __enter__(self) -> "RecommendationClient":
        return self

    def __exit__(self, *_) -> None:
        self.close()

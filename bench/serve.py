"""Serving latency: the worker's request/reply round trip against a bare Kafka echo.

    ~/.cache/streamrec/venv/bin/python bench/serve.py                  # 100 req/s for 20 s
    ~/.cache/streamrec/venv/bin/python bench/serve.py --rate 200 --duration 10 --fetch-wait-ms 1

Steps: start a broker on its own port (wiped), create the catalogue topics and
two scratch topics (``bench.echo.requests`` / ``bench.echo.replies``), replay
the first ``--replay`` MovieLens ratings into ``events``, then

1. echo baseline (no worker running yet): a confluent-kafka consumer thread
   reads the scratch request topic and writes every message unchanged to the
   scratch reply topic (fetch.wait.max.ms=1, linger.ms=0); a client with the
   same settings as :class:`streams.client.RecommendationClient` sends the same
   request bytes at the same rate and matches echoes by key;
2. worker: start it, wait until it has ingested the replay, then send
   recommendation requests for random known users with
   :meth:`RecommendationClient.submit`.

Load is open-loop: request i is sent at ``t0 + i / rate`` whatever is still in
flight.  Round trip = submit() to the reply reaching the client's reader
thread.  Prints one JSON object on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import random
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (CpuMeter, Harness, add_common_args, load_events, log,  # noqa: E402
                          produce_events, ratio, run, summary)

DEFAULT_PORT = 19592
ECHO_REQUESTS = "bench.echo.requests"
ECHO_REPLIES = "bench.echo.replies"


# --------------------------------------------------------------------------
# open-loop load
# --------------------------------------------------------------------------

def paced_load(submit: Callable[[str], Future], users: list, rate: float, duration: float,
               rng: random.Random, timeout: float) -> dict:
    """Send ``rate * duration`` requests at fixed times; wait for all to finish.

    Returns the raw records: ``rtt_ms`` per completed future, the futures'
    outcomes, and how late the sender was against its schedule.
    """
    total = int(rate * duration)
    done: list = [None] * total        # (rtt_ms, future)
    lags = []
    futures = []
    t0 = time.perf_counter() + 0.01
    for i in range(total):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t_send = time.perf_counter()
        lags.append((t_send - due) * 1000.0)
        fut = submit(rng.choice(users))

        def _done(f, i=i, t_send=t_send):
            done[i] = ((time.perf_counter() - t_send) * 1000.0, f)

        fut.add_done_callback(_done)
        futures.append(fut)
    send_seconds = time.perf_counter() - t0
    wait_deadline = time.monotonic() + timeout + 5.0
    for fut in futures:
        try:
            fut.exception(timeout=max(0.0, wait_deadline - time.monotonic()))
        except Exception:
            pass
    # callbacks run right after the future resolves, on the reader thread
    settle = time.monotonic() + 1.0
    while any(d is None for d in done) and time.monotonic() < settle:
        time.sleep(0.01)
    return {"done": done, "sent": total, "send_seconds": send_seconds, "lag_ms": lags}


def load_summary(raw: dict, rate: float) -> dict:
    lags = sorted(raw["lag_ms"])
    return {"sent": raw["sent"], "target_rate": rate,
            "achieved_rate": round(raw["sent"] / raw["send_seconds"], 1) if raw["send_seconds"] else None,
            "send_lag_ms": {"p50": round(lags[int(0.5 * (len(lags) - 1))], 3) if lags else None,
                            "p99": round(lags[int(0.99 * (len(lags) - 1))], 3) if lags else None,
                            "max": round(lags[-1], 3) if lags else None}}


# --------------------------------------------------------------------------
# bare Kafka echo
# --------------------------------------------------------------------------

class EchoServer:
    """Copies every message of ``ECHO_REQUESTS`` to one partition of ``ECHO_REPLIES``."""

    def __init__(self, bootstrap: str, reply_partition: int):
        from confluent_kafka import Consumer, Producer, TopicPartition
        self.reply_partition = reply_partition
        self.consumer = Consumer({"bootstrap.servers": bootstrap,
                                  "group.id": f"bench-echo-{uuid.uuid4().hex[:8]}",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 1})
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "acks": 1})
        parts = self.consumer.list_topics(ECHO_REQUESTS, timeout=10).topics[ECHO_REQUESTS].partitions
        tps = []
        for p in sorted(parts):
            tp = TopicPartition(ECHO_REQUESTS, p)
            tp.offset = self.consumer.get_watermark_offsets(tp, timeout=10)[1]
            tps.append(tp)
        self.consumer.assign(tps)
        self.echoed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo-server", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # poll(), not consume(n, timeout): consume() waits for n messages or the
        # whole timeout, which would add up to 50 ms to every echo
        while not self._stop.is_set():
            msg = self.consumer.poll(0.05)
            if msg is not None:
                if msg.error():
                    continue
                # the request id travels in a header: the echo parses nothing
                self.producer.produce(ECHO_REPLIES, key=msg.key(), value=msg.value(),
                                      headers=msg.headers(), partition=self.reply_partition)
                self.echoed += 1
            self.producer.poll(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.producer.flush(5)
        self.consumer.close()


class EchoClient:
    """The client side of the echo: RecommendationClient's Kafka settings and reply matching.

    It reads replies exactly like RecommendationClient's reply reader: ``poll()``
    for the first reply, then whatever else is already buffered.
    """

    def __init__(self, bootstrap: str, reply_partition: int, fetch_wait_ms: int):
        from confluent_kafka import Consumer, Producer, TopicPartition
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0,
                                   "partitioner": "murmur2_random", "acks": 1})
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-echo-client",
                                   "enable.auto.commit": False, "fetch.wait.max.ms": fetch_wait_ms})
        tp = TopicPartition(ECHO_REPLIES, reply_partition)
        tp.offset = self._consumer.get_watermark_offsets(tp, timeout=10)[1]
        self._consumer.assign([tp])
        self.reply_partition = reply_partition
        self._futures: dict = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="echo-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        from streams.client import RecommendationTimeout
        next_sweep = 0.0
        while not self._stop.is_set():
            first = self._consumer.poll(0.01)
            batch = [first] + self._consumer.consume(100, timeout=0) if first is not None else []
            for msg in batch:
                if msg.error() or msg.value() is None:
                    continue
                rid = next((v for k, v in (msg.headers() or ()) if k == "rid"), b"")
                with self._lock:
                    entry = self._futures.pop(rid.decode(), None)
                if entry is not None:
                    entry[0].set_result(msg.value())
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + 0.01
                with self._lock:
                    expired = [k for k, (_, dl) in self._futures.items() if dl <= now]
                    entries = [self._futures.pop(k) for k in expired]
                for fut, _ in entries:
                    fut.set_exception(RecommendationTimeout("no echo in time"))

    def submit(self, user_id: str, timeout: float) -> Future:
        from schemas.requests import RecommendationRequest
        now = time.time()
        req = RecommendationRequest(request_id=uuid.uuid4().hex, user_id=str(user_id),
                                    surface="explore", k=10, deadline=now + timeout,
                                    reply_partition=self.reply_partition, sent_at=now)
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        with self._lock:
            self._futures[req.request_id] = (fut, time.monotonic() + timeout)
        self._producer.produce(ECHO_REQUESTS, key=req.user_id.encode(), value=req.to_json(),
                               headers=[("rid", req.request_id.encode())])
        self._producer.poll(0)
        return fut

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._producer.flush(5)
        self._consumer.close()


def run_echo(h: Harness, users: list, args, rng: random.Random) -> dict:
    server = EchoServer(h.bootstrap, reply_partition=0)
    client = EchoClient(h.bootstrap, reply_partition=0, fetch_wait_ms=args.client_fetch_wait_ms)
    try:
        submit = lambda u: client.submit(u, args.timeout)  # noqa: E731
        if args.warmup > 0:
            log(f"echo: warm-up {args.warmup}s")
            paced_load(submit, users, args.rate, args.warmup, rng, args.timeout)
        log(f"echo: {args.rate}/s for {args.duration}s")
        cpu = CpuMeter(bench=None, broker=h.broker_pid).start()
        raw = paced_load(submit, users, args.rate, args.duration, rng, args.timeout)
        usage = cpu.stop()
    finally:
        client.close()
        server.close()
    rtts, timeouts, other = [], 0, Counter()
    for d in raw["done"]:
        if d is None:
            other["unresolved"] += 1
            continue
        rtt, fut = d
        exc = fut.exception()
        if exc is None:
            rtts.append(rtt)
        elif isinstance(exc, TimeoutError):
            timeouts += 1
        else:
            other[type(exc).__name__] += 1
    return {"load": load_summary(raw, args.rate), "replies": len(rtts), "timeouts": timeouts,
            "failures": dict(other), "rtt_ms": summary(rtts), "cpu": usage}


# --------------------------------------------------------------------------
# the worker
# --------------------------------------------------------------------------

def run_worker(h: Harness, w, users: list, args, rng: random.Random) -> dict:
    from streams.client import RecommendationClient
    client = RecommendationClient(h.bootstrap, fetch_wait_ms=args.client_fetch_wait_ms)
    try:
        # a first answer proves the path works (and warms it)
        for attempt in range(20):
            try:
                reply = client.recommend(users[0], "explore", k=args.k, timeout=args.timeout)
                log(f"first reply: {len(reply.items)} items, fallback={reply.fallback}, "
                    f"error={reply.error}, stages={reply.stage_counts}")
                break
            except TimeoutError:
                log(f"no reply yet (attempt {attempt + 1})")
        else:
            raise RuntimeError("the worker never answered a request:\n" + w.tail(30))
        submit = lambda u: client.submit(u, "explore", k=args.k, timeout=args.timeout)  # noqa: E731
        if args.warmup > 0:
            log(f"worker: warm-up {args.warmup}s")
            paced_load(submit, users, args.rate, args.warmup, rng, args.timeout)
        before = w.stats()["counters"]
        log(f"worker: {args.rate}/s for {args.duration}s")
        cpu = CpuMeter(bench=None, worker=w.proc.pid, broker=h.broker_pid).start()
        raw = paced_load(submit, users, args.rate, args.duration, rng, args.timeout)
        usage = cpu.stop()
        after = w.stats()
    finally:
        client.close()
    rtts, server_ms, timeouts, errors = [], [], 0, Counter()
    fallbacks, reasons, stage_sums, stage_n, n_items = 0, Counter(), Counter(), Counter(), []
    other = Counter()
    for d in raw["done"]:
        if d is None:
            other["unresolved"] += 1
            continue
        rtt, fut = d
        exc = fut.exception()
        if exc is not None:
            if isinstance(exc, TimeoutError):
                timeouts += 1
            else:
                other[type(exc).__name__] += 1
            continue
        reply = fut.result()
        if reply.error:
            errors[reply.error[:80]] += 1
            continue
        rtts.append(rtt)
        server_ms.append(reply.server_latency_ms)
        n_items.append(len(reply.items))
        if reply.fallback:
            fallbacks += 1
            reasons[reply.fallback_reason or "?"] += 1
        for stage, count in (reply.stage_counts or {}).items():
            stage_sums[stage] += count
            stage_n[stage] += 1
    counters = after.get("counters", {})
    delta = {k: counters.get(k, 0) - before.get(k, 0) for k in counters
             if counters.get(k, 0) != before.get(k, 0)}
    return {"load": load_summary(raw, args.rate), "replies": len(rtts), "timeouts": timeouts,
            "error_replies": sum(errors.values()), "errors": dict(errors.most_common(5)),
            "failures": dict(other),
            "fallbacks": fallbacks, "fallback_reasons": dict(reasons),
            "rtt_ms": summary(rtts), "server_latency_ms": summary(server_ms),
            "items_per_reply_mean": round(sum(n_items) / len(n_items), 2) if n_items else None,
            "stage_counts_mean": {s: round(stage_sums[s] / stage_n[s], 1) for s in stage_sums},
            "cpu": usage, "worker_counters_delta": delta,
            "worker_serve_latency_ms": after.get("serve_latency_ms")}


def wait_quiet(w, quiet_s: float, timeout: float) -> float:
    """Wait until the worker's counters (but periodic ones) stop changing for ``quiet_s``.

    After the replay, item-side agents may still be working through
    ``item.deltas``; serving latency is measured once that backlog is gone.
    """
    periodic = {"trending_snapshots"}
    t0 = time.monotonic()
    last, since = None, time.monotonic()
    while time.monotonic() - t0 < timeout:
        c = {k: v for k, v in w.stats()["counters"].items() if k not in periodic}
        if c != last:
            last, since = c, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(0.2)
    else:
        log(f"counters still changing after {timeout:.0f}s: {last}")
    return round(time.monotonic() - t0, 2)


def main(args: argparse.Namespace) -> dict:
    from schemas.topics import TopicSpec
    rng = random.Random(args.seed)
    result: dict = {"bench": "serve"}
    with Harness(args, "serve") as h:
        h.create_topics([TopicSpec(ECHO_REQUESTS, h.partitions, "user_id", "bench echo", 3600_000),
                         TopicSpec(ECHO_REPLIES, h.partitions, "request_id", "bench echo", 3600_000)])
        log(f"loading the first {args.replay} MovieLens ratings")
        events = load_events(args.dataset, args.replay, args.time_scale)
        users = sorted({ev.user_id for ev in events}, key=int)
        produced = produce_events(h.bootstrap, events, args.per_message)
        log(f"produced {produced['events']} events for {len(users)} users in {produced['seconds']}s")
        result["config"] = {
            "rate": args.rate, "duration_s": args.duration, "warmup_s": args.warmup,
            "timeout_s": args.timeout, "k": args.k, "replay_events": len(events),
            "users": len(users), "partitions": h.partitions,
            "worker_fetch_wait_ms": args.fetch_wait_ms,
            "client_fetch_wait_ms": args.client_fetch_wait_ms,
            "echo_fetch_wait_ms": 1, "bootstrap": h.bootstrap, "own_broker": h.own_broker,
            "app_id": h.app_id}
        if not args.no_echo:
            echo = run_echo(h, users, args, rng)
            log(f"echo: rtt p50 {echo['rtt_ms'].get('p50')} ms, p99 {echo['rtt_ms'].get('p99')} ms, "
                f"timeouts {echo['timeouts']}")
            result["echo"] = echo
        w = h.start_worker()
        n = len(events)
        log(f"waiting for the worker to ingest {n} events")
        t0 = time.monotonic()
        w.wait_for("events_ingested", n, timeout=args.ingest_timeout)
        log(f"ingested in {time.monotonic() - t0:.1f}s; waiting for counters to stay still "
            f"for {args.settle}s")
        result["settle_s"] = wait_quiet(w, args.settle, args.ingest_timeout)
        log(f"quiet after {result['settle_s']}s more")
        worker = run_worker(h, w, users, args, rng)
        log(f"worker: rtt p50 {worker['rtt_ms'].get('p50')} ms, p99 {worker['rtt_ms'].get('p99')} ms, "
            f"server p50 {worker['server_latency_ms'].get('p50')} ms, timeouts {worker['timeouts']}, "
            f"fallbacks {worker['fallbacks']}")
        result["worker"] = worker
        if "echo" in result:
            e, wr = result["echo"]["rtt_ms"], worker["rtt_ms"]
            result["ratio_worker_over_echo"] = {"p50": ratio(wr.get("p50"), e.get("p50")),
                                                "p99": ratio(wr.get("p99"), e.get("p99"))}
        sent = worker["load"]["sent"]
        if worker["timeouts"] > 0.01 * sent:
            result["worker_log_tail"] = h.worker_log_tail(30).splitlines()
    return result


def parser() -> argparse.ArgumentParser:
    from streams.client import RecommendationClient
    import inspect
    client_wait = inspect.signature(RecommendationClient).parameters["fetch_wait_ms"].default
    ap = argparse.ArgumentParser(prog="bench/serve.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replay", type=int, default=20000,
                    help="MovieLens ratings to replay first (default %(default)s)")
    ap.add_argument("--per-message", type=int, default=20, metavar="K",
                    help="events per message for the replay (default %(default)s; speed only)")
    ap.add_argument("--rate", type=float, default=100.0, help="requests/s (default %(default)s)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of measured load")
    ap.add_argument("--warmup", type=float, default=2.0,
                    help="seconds of load before each measurement, discarded")
    ap.add_argument("--timeout", type=float, default=2.0, help="per-request timeout, seconds")
    ap.add_argument("-k", type=int, default=10, help="items per request")
    ap.add_argument("--client-fetch-wait-ms", type=int, default=client_wait,
                    help="fetch.wait.max.ms of the clients' reply consumers "
                         "(default: RecommendationClient's, %(default)s)")
    ap.add_argument("--ingest-timeout", type=float, default=180.0,
                    help="seconds to wait for the worker to ingest the replay")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds to wait after ingest before serving")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-echo", action="store_true", help="skip the bare Kafka echo baseline")
    add_common_args(ap, DEFAULT_PORT)
    return ap


if __name__ == "__main__":
    sys.exit(run(main, parser()))

"""Serving latency: the worker's request/reply round trip against a bare Kafka echo.

    ~/.cache/streamrec/venv/bin/python bench/serve.py                  # 50 req/s for 20 s, 3 cases
    ~/.cache/streamrec/venv/bin/python bench/serve.py --no-model       # echo + retrieval/blend only
    ~/.cache/streamrec/venv/bin/python bench/serve.py --rate 200 --duration 10 --fetch-wait-ms 1

Steps: start a broker on its own port (wiped), create the catalogue topics and
two scratch topics (``bench.echo.requests`` / ``bench.echo.replies``), replay
the first ``--replay`` MovieLens ratings into ``events`` (engagements only: no
impressions, so no labelled examples and no model yet), then

1. echo baseline (no worker running yet): a confluent-kafka consumer thread
   reads the scratch request topic and writes every message unchanged to the
   scratch reply topic (fetch.wait.max.ms=1, linger.ms=0); a client with the
   same settings as :class:`streams.client.RecommendationClient` sends the same
   request bytes at the same rate and matches echoes by key;
2. worker, retrieval + blend only: start it, wait until it has ingested the
   replay, check that no model version is live, then send recommendation
   requests for random known users with :meth:`RecommendationClient.submit`;
3. worker, all stages (skipped with ``--no-model``): replay the next
   ``--train-replay`` ratings *with* impressions (the label join turns them into
   ``training.examples``; the worker runs with ``STREAMREC_LABEL_WINDOW_S=5`` and
   ``STREAMREC_LABEL_WALL_WINDOW_S=5`` so windows close quickly), wait until the
   worker's ``training_examples`` counter stops growing, run
   :func:`streams.trainer.bootstrap` (``--bootstrap-epochs``, default 1) in this
   process, wait until ``/stats/`` shows that version live, warm up, and measure
   again at the same rate for the same users.  The worker's online trainer agent
   stays on (it fine-tunes on every example it receives and publishes a version
   every ``STREAMREC_PUBLISH_INTERVAL_S``); how much it trained during each
   measurement is in ``worker_counters_delta.examples_trained``.

Load is open-loop: request i is sent at ``t0 + i / rate`` whatever is still in
flight.  Round trip = submit() to the reply reaching the client's reader
thread.  Prints one JSON object on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import os
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

from bench.common import (CpuMeter, Harness, add_common_args, log,  # noqa: E402
                          percentile, produce_events, ratio, run, summary)

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
            "send_lag_ms": {"p50": round(percentile(lags, 50), 3) if lags else None,
                            "p99": round(percentile(lags, 99), 3) if lags else None,
                            "max": round(lags[-1], 3) if lags else None}}


class MachineMeter:
    """Busy CPU of the whole machine (from /proc/stat) between start and stop.

    Other people's processes share this machine: ``other_cores`` is what the
    machine was busy with beyond the processes :class:`CpuMeter` measured.
    """

    @staticmethod
    def _read() -> Optional[tuple]:
        try:
            f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = f[3] + (f[4] if len(f) > 4 else 0)
        return sum(f) - idle, sum(f)

    def start(self) -> "MachineMeter":
        self._t, self._a = time.monotonic(), self._read()
        return self

    def stop(self, measured: Optional[dict] = None) -> dict:
        b, wall = self._read(), time.monotonic() - self._t
        if self._a is None or b is None or wall <= 0:
            return {}
        from bench.common import _TICK
        busy = (b[0] - self._a[0]) / _TICK / wall
        ours = sum(v for k, v in (measured or {}).items() if k.endswith("_cores") and v)
        return {"machine_busy_cores": round(busy, 2), "other_cores": round(max(0.0, busy - ours), 2),
                "machine_cores": os.cpu_count()}


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
        machine = MachineMeter().start()
        raw = paced_load(submit, users, args.rate, args.duration, rng, args.timeout)
        usage = cpu.stop()
        usage.update(machine.stop(usage))
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
            "failures": dict(other), "rtt_ms": summary(rtts), "cpu": usage,
            "loadavg_1m_after": round(os.getloadavg()[0], 2)}


# --------------------------------------------------------------------------
# the worker
# --------------------------------------------------------------------------

def run_worker(h: Harness, w, users: list, args, rng: random.Random, *, label: str = "worker",
               warmup: Optional[float] = None) -> dict:
    """Warm up, then measure the worker at ``args.rate`` for ``args.duration``."""
    from streams.client import RecommendationClient
    warmup = args.warmup if warmup is None else warmup
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
        if warmup > 0:
            log(f"{label}: warm-up {warmup}s")
            paced_load(submit, users, args.rate, warmup, rng, args.timeout)
        before_stats = w.stats()
        before = before_stats["counters"]
        log(f"{label}: {args.rate}/s for {args.duration}s")
        cpu = CpuMeter(bench=None, worker=w.proc.pid, broker=h.broker_pid).start()
        machine = MachineMeter().start()
        raw = paced_load(submit, users, args.rate, args.duration, rng, args.timeout)
        usage = cpu.stop()
        usage.update(machine.stop(usage))
        after = w.stats()
    finally:
        client.close()
    rtts, server_ms, timeouts, errors = [], [], 0, Counter()
    fallbacks, reasons, stage_sums, stage_n, n_items = 0, Counter(), Counter(), Counter(), []
    versions = Counter()
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
        mv = reply.model_versions or {}
        versions[",".join(f"{m}={v}" for m, v in sorted(mv.items())) or "(none)"] += 1
    counters = after.get("counters", {})
    delta = {k: counters.get(k, 0) - before.get(k, 0) for k in counters
             if counters.get(k, 0) != before.get(k, 0)}
    mean_server = sum(server_ms) / len(server_ms) if server_ms else None
    return {"load": load_summary(raw, args.rate), "replies": len(rtts), "timeouts": timeouts,
            "error_replies": sum(errors.values()), "errors": dict(errors.most_common(5)),
            "failures": dict(other),
            "fallbacks": fallbacks, "fallback_reasons": dict(reasons),
            "rtt_ms": summary(rtts), "server_latency_ms": summary(server_ms),
            # rate x mean server time: above 1 the serving agent (one coroutine on one
            # event loop) cannot keep up and requests queue in Kafka, which
            # server_latency_ms (measured from the agent picking a request up) does not see
            "serve_utilisation": round(args.rate * mean_server / 1000.0, 2) if mean_server else None,
            "worker_requests_served": delta.get("requests_served", 0),
            "worker_fallbacks_incl_late": delta.get("fallbacks", 0),
            "items_per_reply_mean": round(sum(n_items) / len(n_items), 2) if n_items else None,
            "stage_counts_mean": {s: round(stage_sums[s] / stage_n[s], 1) for s in stage_sums},
            "reply_model_versions": dict(versions.most_common(5)),
            "live_model": {"before": before_stats.get("shared_view", {}).get("live_model"),
                           "after": after.get("shared_view", {}).get("live_model")},
            "cpu": usage, "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "worker_counters_delta": delta,
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


def replay_events(dataset: Optional[str], first: int, more: int, time_scale: float) -> tuple:
    """The first ``first`` ratings as engagements, the next ``more`` with impressions.

    Both come from one :func:`streams.replay.to_events` pass over ``first + more``
    ratings, so event times stay in dataset order across the two replays (an
    impression of the second replay is never behind the first one's watermark).
    """
    from streams.replay import find_dataset, load_authors, load_ratings, to_events
    path = find_dataset(dataset)
    ratings = load_ratings(path)[:first + more]
    events = list(to_events(ratings, load_authors(path), end_at=time.time(),
                            time_scale=time_scale, impressions=True))
    # Each rating starts with its impression and brings one or two engagements:
    # cut where the rating after the first ``first`` begins.
    starts = [n for n, ev in enumerate(events) if ev.event_type == "impression"]
    cut = starts[first] if first < len(starts) else len(events)
    head = [ev for ev in events[:cut] if ev.event_type != "impression"]
    return head, events[cut:]


def wait_counter_still(w, name: str, quiet_s: float, timeout: float) -> tuple:
    """Wait until counter ``name`` is above zero and has not moved for ``quiet_s``."""
    t0 = time.monotonic()
    last, since = None, time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = w.counter(name)
        if value != last:
            last, since = value, time.monotonic()
        elif value and time.monotonic() - since >= quiet_s:
            return value, round(time.monotonic() - t0, 2)
        time.sleep(0.5)
    raise TimeoutError(f"counter {name} still moving (or zero) after {timeout:.0f}s: {last}")


def wait_live(w, want: str, timeout: float) -> float:
    t0 = time.monotonic()
    live = None
    while time.monotonic() - t0 < timeout:
        live = w.stats().get("shared_view", {}).get("live_model")
        if live == want:
            return round(time.monotonic() - t0, 2)
        time.sleep(0.25)
    raise TimeoutError(f"{want} not live after {timeout:.0f}s (live: {live})")


def with_ratios(result: dict, key: str) -> None:
    if "echo" not in result or key not in result:
        return
    e, wr = result["echo"]["rtt_ms"], result[key]["rtt_ms"]
    result.setdefault("ratios_over_echo", {})[key] = {
        q: ratio(wr.get(q), e.get(q)) for q in ("p50", "p95", "p99")}


def log_phase(label: str, r: dict) -> None:
    log(f"{label}: rtt p50 {r['rtt_ms'].get('p50')} ms, p95 {r['rtt_ms'].get('p95')} ms, "
        f"p99 {r['rtt_ms'].get('p99')} ms, server p50 {r['server_latency_ms'].get('p50')} ms, "
        f"timeouts {r['timeouts']}, fallbacks {r['fallbacks']}, "
        f"worker cores {r['cpu'].get('worker_cores')}")


def error_lines(w, limit: int = 20) -> list:
    """The worker log's ERROR records, each with its exception's last line, and counts."""
    try:
        lines = w.log_file.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    found: Counter = Counter()
    first: dict = {}
    for i, line in enumerate(lines):
        if "[ERROR]" not in line and "[CRITICAL]" not in line:
            continue
        exc = None
        for nxt in lines[i + 1:]:
            if nxt.startswith("[") or nxt.startswith("%"):
                break
            if nxt.strip() and not nxt.startswith((" ", "Traceback", "The above exception",
                                                   "During handling")):
                exc = nxt.strip()
        msg = line.split("] ", 3)[-1].strip()
        key = f"{msg} -> {exc}" if exc else msg
        found[key] += 1
        first.setdefault(key, line.split("]", 1)[0].lstrip("["))
    return [{"first_at": first[k], "count": n, "line": k[:400]} for k, n in found.most_common(limit)]


def summary_table(result: dict) -> dict:
    """One small row per case: the numbers asked for, side by side."""
    rows = {}
    for key in ("echo", "worker", "worker_model"):
        r = result.get(key)
        if not r:
            continue
        row = {q: r["rtt_ms"].get(q) for q in ("p50", "p95", "p99")}
        if key != "echo":
            sl = r["server_latency_ms"]
            row.update({"server_p50": sl.get("p50"), "server_p99": sl.get("p99"),
                        "timeouts": r["timeouts"], "fallbacks": r["fallbacks"],
                        "stage_counts_mean": r["stage_counts_mean"],
                        "ratio_over_echo": result.get("ratios_over_echo", {}).get(key)})
        else:
            row["timeouts"] = r["timeouts"]
        row["worker_cores"] = r["cpu"].get("worker_cores")
        row["broker_cores"] = r["cpu"].get("broker_cores")
        row["bench_cores"] = r["cpu"].get("bench_cores")
        row["other_processes_cores"] = r["cpu"].get("other_cores")
        if key != "echo":
            row["serve_utilisation"] = r.get("serve_utilisation")
        rows[key] = row
    return rows


def main(args: argparse.Namespace) -> dict:
    from schemas.topics import TopicSpec
    rng = random.Random(args.seed)
    result: dict = {"bench": "serve"}
    # Quick label windows, so the impressions of case 3 become examples in seconds
    # (--worker-env given later wins).
    args.worker_env = ["STREAMREC_LABEL_WINDOW_S=5", "STREAMREC_LABEL_WALL_WINDOW_S=5"] + \
        list(args.worker_env)
    with Harness(args, "serve") as h:
        h.create_topics([TopicSpec(ECHO_REQUESTS, h.partitions, "user_id", "bench echo", 3600_000),
                         TopicSpec(ECHO_REPLIES, h.partitions, "request_id", "bench echo", 3600_000)])
        more = 0 if args.no_model else args.train_replay
        log(f"loading the first {args.replay + more} MovieLens ratings")
        events, train_events = replay_events(args.dataset, args.replay, more, args.time_scale)
        users = sorted({ev.user_id for ev in events}, key=int)
        produced = produce_events(h.bootstrap, events, args.per_message)
        log(f"produced {produced['events']} events for {len(users)} users in {produced['seconds']}s")
        worker_env = h.worker_env()
        result["config"] = {
            "rate": args.rate, "duration_s": args.duration, "warmup_s": args.warmup,
            "model_warmup_s": args.model_warmup,
            "timeout_s": args.timeout, "k": args.k, "replay_events": len(events),
            "train_replay_ratings": more, "train_replay_events": len(train_events),
            "bootstrap_epochs": args.bootstrap_epochs,
            "users": len(users), "partitions": h.partitions,
            "worker_fetch_wait_ms": args.fetch_wait_ms,
            "client_fetch_wait_ms": args.client_fetch_wait_ms,
            "echo_fetch_wait_ms": 1, "bootstrap": h.bootstrap, "own_broker": h.own_broker,
            "app_id": h.app_id,
            "worker_env": {k: v for k, v in worker_env.items() if k != "STREAMREC_APP_ID"},
            "cpus": os.cpu_count()}
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
        live = w.stats().get("shared_view", {}).get("live_model")
        if live is not None:
            raise RuntimeError(f"case 2 needs no live model, but {live} is live "
                               "(a broker with examples or versions from an earlier run?)")
        worker = run_worker(h, w, users, args, rng, label="worker (retrieval + blend)")
        log_phase("worker (retrieval + blend)", worker)
        result["worker"] = worker
        with_ratios(result, "worker")
        result["ratio_worker_over_echo"] = result.get("ratios_over_echo", {}).get("worker")

        if not args.no_model:
            result["model_setup"] = setup_model(h, w, n, train_events, args)
            model = run_worker(h, w, users, args, rng, label="worker (all stages)",
                               warmup=args.model_warmup)
            log_phase("worker (all stages)", model)
            result["worker_model"] = model
            with_ratios(result, "worker_model")
            setup_delta = result["model_setup"]["worker_counters_delta"]
            meas_delta = model["worker_counters_delta"]
            result["online_training"] = {
                "enabled": True,
                "examples_trained_before_measurement": setup_delta.get("examples_trained", 0),
                "examples_trained_during_measurement": meas_delta.get("examples_trained", 0),
                "versions_published_by_worker": (setup_delta.get("model_versions_published", 0)
                                                 + meas_delta.get("model_versions_published", 0)),
                "trainer_errors": (setup_delta.get("trainer_errors", 0)
                                   + meas_delta.get("trainer_errors", 0)),
                "note": "the worker's online trainer agent stays on (continuous fine-tuning: "
                        "it trains on every training example it consumes and publishes a "
                        "version every STREAMREC_PUBLISH_INTERVAL_S); it competes with "
                        "serving for the worker's CPU whenever examples arrive"
                        + ("" if meas_delta.get("examples_trained", 0) else
                           "; no new examples arrived during the measurement (the bench's "
                           "requests produce no impressions/engagements), so it was idle "
                           "then: its load fell in model_setup"),
                "publish_interval_s": float(worker_env.get("STREAMREC_PUBLISH_INTERVAL_S",
                                                           os.environ.get(
                                                               "STREAMREC_PUBLISH_INTERVAL_S",
                                                               60)))}
        result["summary"] = summary_table(result)
        timeouts = sum(result.get(k, {}).get("timeouts", 0) for k in ("worker", "worker_model"))
        errs = error_lines(w)
        if errs:
            result["worker_log_errors"] = errs
        if timeouts > 0 or errs:
            result["worker_log_tail"] = h.worker_log_tail(30).splitlines()
        result["worker_final_counters"] = w.stats().get("counters")
    return result


def setup_model(h: Harness, w, ingested_before: int, train_events: list, args) -> dict:
    """Case 3's preparation: impressions -> examples -> bootstrap -> live version."""
    from streams.trainer import bootstrap
    out: dict = {}
    cpu = CpuMeter(bench=None, worker=w.proc.pid, broker=h.broker_pid).start()
    machine = MachineMeter().start()
    before = w.stats()["counters"]
    produced = produce_events(h.bootstrap, train_events, args.per_message)
    log(f"model: produced {produced['events']} events (with impressions) in {produced['seconds']}s")
    out["train_replay"] = produced
    t0 = time.monotonic()
    w.wait_for("events_ingested", ingested_before + len(train_events),
               timeout=args.ingest_timeout)
    out["ingest_s"] = round(time.monotonic() - t0, 2)
    log(f"model: ingested in {out['ingest_s']}s; waiting for training_examples to stop growing "
        f"for {args.examples_quiet}s")
    examples, waited = wait_counter_still(w, "training_examples", args.examples_quiet,
                                          args.ingest_timeout)
    out["training_examples"] = examples
    out["examples_wait_s"] = waited
    log(f"model: {examples} training examples (still for {args.examples_quiet}s after "
        f"{waited}s); bootstrap, epochs={args.bootstrap_epochs}")
    t0 = time.monotonic()
    record = bootstrap(h.bootstrap, epochs=args.bootstrap_epochs, progress=False)
    out["bootstrap_s"] = round(time.monotonic() - t0, 2)
    want = f"{record['model']}:{record['version']}"
    out["bootstrap"] = {"version": want, "examples_seen": record["lineage"]["examples_seen"],
                        "step": record["lineage"]["step"], "metrics": record["metrics"]}
    log(f"model: bootstrap published {want} in {out['bootstrap_s']}s "
        f"({record['lineage']['examples_seen']} examples seen); waiting for it to be live")
    out["live_wait_s"] = wait_live(w, want, args.model_timeout)
    stats = w.stats()
    out["cpu"] = cpu.stop()
    out["cpu"].update(machine.stop(out["cpu"]))
    out["live_model"] = stats["shared_view"].get("live_model")
    out["model_versions_loaded"] = stats["shared_view"].get("model_versions_loaded")
    after = stats["counters"]
    out["worker_counters_delta"] = {k: after.get(k, 0) - before.get(k, 0) for k in after
                                    if after.get(k, 0) != before.get(k, 0)}
    log(f"model: {want} live after {out['live_wait_s']}s; versions loaded "
        f"{out['model_versions_loaded']}")
    return out


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
    ap.add_argument("--rate", type=float, default=50.0, help="requests/s (default %(default)s)")
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
    g = ap.add_argument_group("case 3: all stages (a live model)")
    g.add_argument("--no-model", action="store_true",
                   help="skip case 3 (bootstrap a model and measure with every stage on)")
    g.add_argument("--train-replay", type=int, default=10000,
                   help="ratings after --replay to replay with impressions, for labelled "
                        "examples (default %(default)s)")
    g.add_argument("--bootstrap-epochs", type=int, default=1,
                   help="epochs of streams.trainer.bootstrap (default %(default)s)")
    g.add_argument("--examples-quiet", type=float, default=8.0,
                   help="seconds training_examples must stay unchanged before bootstrap "
                        "(default %(default)s; above the 5 s wall label window)")
    g.add_argument("--model-timeout", type=float, default=120.0,
                   help="seconds to wait for the bootstrapped version to be live")
    g.add_argument("--model-warmup", type=float, default=5.0,
                   help="seconds of load after the version is live, discarded (default %(default)s)")
    add_common_args(ap, DEFAULT_PORT)
    return ap


if __name__ == "__main__":
    sys.exit(run(main, parser()))

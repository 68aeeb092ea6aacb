"""Shared harness for the streamrec benchmarks (bench/ingest.py, bench/serve.py).

A benchmark run owns everything it measures: a local Kafka broker on its own
port with a wiped data dir (unless ``--bootstrap`` names an existing broker),
the catalogue's topics, and a Faust worker (:class:`streams.local.WorkerProcess`)
with its own temp data dir and web port.  Progress goes to stderr; the result
is ONE JSON object on stdout (see :func:`run`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------

# The worker's own percentile, so a bench's p99 and the worker's mean the same
# thing; streams.metrics imports no Faust app.
from streams.metrics import percentile  # noqa: E402


def summary(values: Iterable[float], digits: int = 2) -> dict:
    vals = sorted(values)
    if not vals:
        return {"n": 0}
    r = lambda x: round(x, digits)  # noqa: E731
    return {"n": len(vals), "mean": r(sum(vals) / len(vals)), "min": r(vals[0]),
            "p50": r(percentile(vals, 50)), "p95": r(percentile(vals, 95)),
            "p99": r(percentile(vals, 99)), "max": r(vals[-1])}


def ratio(a, b, digits: int = 3):
    if a is None or b is None or not b:
        return None
    return round(a / b, digits)


# --------------------------------------------------------------------------
# CPU accounting
# --------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: Optional[int]) -> Optional[float]:
    """user+system CPU seconds of a live process (all its threads), or None."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return None


class CpuMeter:
    """CPU used by some processes between :meth:`start` and :meth:`stop`."""

    def __init__(self, **pids: Optional[int]):
        self.pids = pids
        self._t = 0.0
        self._c: dict = {}
        self.result: dict = {}

    def start(self) -> "CpuMeter":
        self._t = time.monotonic()
        self._c = {name: self._read(name, pid) for name, pid in self.pids.items()}
        return self

    @staticmethod
    def _read(name: str, pid: Optional[int]) -> Optional[float]:
        if name == "bench":
            t = os.times()
            return t.user + t.system
        return cpu_seconds(pid)

    def stop(self) -> dict:
        wall = time.monotonic() - self._t
        out = {"wall_s": round(wall, 2)}
        for name, pid in self.pids.items():
            a, b = self._c.get(name), self._read(name, pid)
            if a is None or b is None:
                continue
            out[f"{name}_cpu_s"] = round(b - a, 2)
            out[f"{name}_cores"] = round((b - a) / wall, 2) if wall > 0 else None
        self.result = out
        return out


# --------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_common_args(ap: argparse.ArgumentParser, default_port: int) -> None:
    from streams.settings import settings
    g = ap.add_argument_group("environment")
    g.add_argument("--bootstrap", help="use this existing broker instead of starting one "
                   "(its topics are created if missing; nothing is wiped)")
    g.add_argument("--port", type=int, default=default_port,
                   help=f"port of the broker this bench starts (default {default_port}; "
                        "the controller uses port+1)")
    g.add_argument("--partitions", type=int, default=settings.partitions,
                   help="partitions of keyed topics, passed to the worker as "
                        "STREAMREC_PARTITIONS (default from settings: %(default)s)")
    g.add_argument("--fetch-wait-ms", type=int, default=settings.fetch_wait_ms,
                   help="worker consumer fetch wait, passed as STREAMREC_FETCH_WAIT_MS "
                        "(default from settings: %(default)s)")
    g.add_argument("--app-id", default=None,
                   help="worker app id / consumer group (default: settings' app id on a "
                        "fresh broker, a unique bench-* id with --bootstrap)")
    g.add_argument("--web-port", type=int, default=0, help="worker web port (default: a free one)")
    g.add_argument("--dataset", help="MovieLens-100k folder (default ../shared/datasets/movielens-100k)")
    g.add_argument("--time-scale", type=float, default=5000.0,
                   help="replay time compression, as `streamrec replay` (default %(default)s)")
    g.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the worker (repeatable)")
    g.add_argument("--keep", action="store_true",
                   help="keep the worker's temp dir (its log) and the broker data afterwards")


# --------------------------------------------------------------------------
# the environment: broker + topics + worker
# --------------------------------------------------------------------------

class Harness:
    """Broker (own or existing), catalogue topics, and a worker on demand.

    >>> with Harness(args, "ingest") as h:      # doctest: +SKIP
    ...     h.create_topics(); w = h.start_worker()
    """

    def __init__(self, args: argparse.Namespace, name: str):
        from streams.settings import settings
        self.args = args
        self.name = name
        self.own_broker = not args.bootstrap
        self.bootstrap = args.bootstrap
        self.broker_pid: Optional[int] = None
        self.app_id = args.app_id or (settings.app_id if self.own_broker
                                      else f"bench-{name}-{uuid.uuid4().hex[:8]}")
        self.partitions = args.partitions
        self.tmp = Path(tempfile.mkdtemp(prefix=f"streamrec-bench-{name}-"))
        self.worker = None
        self.failed = False

    # -- broker ------------------------------------------------------------
    def __enter__(self) -> "Harness":
        if self.own_broker:
            from streams import broker
            log(f"starting broker on port {self.args.port} (wiped; STREAMREC_HOME={broker.home()})")
            info = broker.start(port=self.args.port, wipe=True, timeout=90)
            self.bootstrap = info.bootstrap
            self.broker_pid = info.pid
        else:
            from streams.producer import check_broker
            check_broker(self.bootstrap)
            log(f"using existing broker {self.bootstrap}")
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.failed = True
        self.stop_worker()
        if self.own_broker:
            from streams import broker
            log("stopping broker")
            try:
                broker.stop(port=self.args.port, wipe=not self.args.keep)
            except Exception as exc:  # never mask the real error
                log(f"broker stop failed: {exc}")
        if self.args.keep or self.failed:
            log(f"kept worker dir {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- topics ------------------------------------------------------------
    def create_topics(self, extra: Iterable = ()) -> dict:
        from schemas.topics import catalogue
        from streams.admin import create_topics
        specs = catalogue(self.partitions, self.app_id) + list(extra)
        res = create_topics(self.bootstrap, specs)
        self.wait_for_leaders([s.name for s in specs])
        log(f"topics: created {len(res['created'])}, existing {len(res['existing'])}")
        return res

    def wait_for_leaders(self, names: list, timeout: float = 30.0) -> None:
        """Wait until every partition of ``names`` has a leader (fresh topics take a moment)."""
        from confluent_kafka.admin import AdminClient
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        deadline = time.monotonic() + timeout
        while True:
            md = admin.list_topics(timeout=10).topics
            missing = [n for n in names if n not in md or md[n].error is not None
                       or not md[n].partitions
                       or any(p.leader < 0 or p.error is not None
                              for p in md[n].partitions.values())]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics without leaders after {timeout:.0f}s: {missing}")
            time.sleep(0.2)

    def topic_message_count(self, topic: str) -> int:
        """Messages currently in ``topic`` (sum of high - low watermarks)."""
        from confluent_kafka import Consumer, TopicPartition
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "bench-watermarks"})
        try:
            parts = c.list_topics(topic, timeout=10).topics[topic].partitions
            total = 0
            for p in parts:
                for attempt in range(50):  # leadership of a fresh topic may still be settling
                    try:
                        lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                        break
                    except Exception:
                        if attempt == 49:
                            raise
                        time.sleep(0.2)
                total += hi - lo
            return total
        finally:
            c.close()

    # -- worker ------------------------------------------------------------
    def worker_env(self) -> dict:
        env = {"STREAMREC_PARTITIONS": str(self.partitions),
               "STREAMREC_FETCH_WAIT_MS": str(self.args.fetch_wait_ms),
               "STREAMREC_APP_ID": self.app_id}
        for item in self.args.worker_env:
            k, _, v = item.partition("=")
            env[k] = v
        return env

    def new_worker(self):
        from streams.local import WorkerProcess
        port = self.args.web_port or free_port()
        self.worker = WorkerProcess(self.bootstrap, self.tmp / "worker", web_port=port,
                                    env=self.worker_env())
        return self.worker

    def start_worker_async(self, timeout: float = 120.0) -> "tuple[object, threading.Thread, list]":
        """Start a worker on a thread (so the caller can poll its counters meanwhile).

        Returns ``(worker, thread, errors)``; ``errors`` gets the exception if start fails.
        """
        w = self.new_worker()
        errors: list = []

        def _run():
            try:
                w.start(timeout=timeout)
            except BaseException as exc:  # surfaced by the caller
                errors.append(exc)

        t = threading.Thread(target=_run, name="worker-start", daemon=True)
        t.start()
        return w, t, errors

    def start_worker(self, timeout: float = 120.0):
        w = self.new_worker()
        log(f"starting worker (web port {w.web_port}, log {w.log_file})")
        t0 = time.monotonic()
        w.start(timeout=timeout)
        log(f"worker ready in {time.monotonic() - t0:.1f}s")
        return w

    def stop_worker(self) -> None:
        if self.worker is not None:
            log("stopping worker")
            try:
                self.worker.stop()
            except Exception as exc:
                log(f"worker stop failed: {exc}")
            self.worker = None

    def worker_log_tail(self, lines: int = 30) -> str:
        return self.worker.tail(lines) if self.worker else ""


# --------------------------------------------------------------------------
# events
# --------------------------------------------------------------------------

def load_events(dataset: Optional[str], limit: int = 0, time_scale: float = 5000.0) -> list:
    """MovieLens ratings as engagement events in time order (as ``streamrec replay``)."""
    from streams.replay import find_dataset, load_authors, load_ratings, to_events
    path = find_dataset(dataset)
    ratings = load_ratings(path)
    if limit:
        ratings = ratings[:limit]
    return list(to_events(ratings, load_authors(path), end_at=time.time(), time_scale=time_scale))


def user_batches(events: list, per_message: int) -> list:
    """Group time-ordered events into per-user batches of up to ``per_message``.

    A user's batch is emitted when it is full, so batches stay roughly in time
    order; what is left over is emitted at the end.
    """
    pending: dict = {}
    out = []
    for ev in events:
        batch = pending.setdefault(ev.user_id, [])
        batch.append(ev)
        if len(batch) >= per_message:
            out.append(batch)
            del pending[ev.user_id]
    out.extend(pending.values())
    return out


def produce_events(bootstrap: str, events: list, per_message: int = 1) -> dict:
    """Send ``events`` to ``events`` with :class:`streams.producer.EventProducer`.

    ``per_message`` 1 sends one event per message; K > 1 one JSON array of up to
    K events of one user per message.
    """
    from streams.producer import EventProducer
    t0 = time.monotonic()
    with EventProducer(bootstrap) as producer:
        if per_message <= 1:
            for ev in events:
                producer.send(ev)
            messages = len(events)
        else:
            batches = user_batches(events, per_message)
            for batch in batches:
                producer.send_user_batch(batch)
            messages = len(batches)
    elapsed = time.monotonic() - t0
    return {"events": len(events), "messages": messages, "seconds": round(elapsed, 2),
            "events_per_s": round(len(events) / elapsed, 1) if elapsed else None}


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------

def run(main: Callable[[argparse.Namespace], dict], ap: argparse.ArgumentParser,
        argv=None) -> int:
    """Parse options, run ``main(args)`` and print its result as one JSON line."""
    args = ap.parse_args(argv)
    try:
        result = main(args)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception as exc:
        import traceback
        traceback.print_exc()
        result = {"bench": ap.prog, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result, default=str))
    sys.stdout.flush()
    return 0 if not result.get("error") else 1

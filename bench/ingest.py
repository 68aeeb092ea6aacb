"""Ingest throughput: the worker's events/s against a bare Kafka consumer's.

    ~/.cache/streamrec/venv/bin/python bench/ingest.py                 # all 100k ratings
    ~/.cache/streamrec/venv/bin/python bench/ingest.py --limit 20000 --per-message 20

Steps: start a broker on its own port (wiped), create the catalogue topics,
pre-load the MovieLens replay into ``events`` (one event per message, or one
JSON array of up to K events of one user per message with ``--per-message K``),
read the whole topic with a bare confluent-kafka consumer in a new group
(the "raw" rate), then with a Faust agent that does nothing but count its
batches (``bench/noop_agent.py``: the same app settings and batching as the
worker, a group of its own; the "noop_agent" rate, Faust's own cost per
message), then start the worker and time until its ``events_ingested``
counter reaches N (validate + user-history table + item deltas).

``--profile DIR`` samples the worker with py-spy while it ingests (100 Hz,
from its first event until the item side has applied every delta) and adds the
top functions by own time and by total time to the JSON; the raw stacks stay
in ``DIR/worker.pyspy.txt`` (collapsed, one stack a line).

Rates are measured from the first message/event seen to the last, so process
and group start-up are reported apart (``time_to_first_*``).  Prints one JSON
object on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (CpuMeter, Harness, add_common_args, cpu_seconds, load_events,  # noqa: E402
                          log, produce_events, ratio, run)

DEFAULT_PORT = 19492


def raw_consume(bootstrap: str, topic: str, messages: int, events: int, *, decode: bool,
                timeout: float) -> dict:
    """Read ``messages`` messages of ``topic`` from the beginning in a new consumer group."""
    import orjson
    from confluent_kafka import Consumer
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    cpu = CpuMeter(bench=None).start()
    t_sub = time.monotonic()
    c.subscribe([topic])
    n = nbytes = 0
    n_first = 0
    t_first = t_last = None
    deadline = t_sub + timeout
    try:
        while n < messages and time.monotonic() < deadline:
            for msg in c.consume(500, timeout=0.2):
                if msg.error():
                    continue
                value = msg.value()
                if decode:
                    orjson.loads(value)
                n += 1
                nbytes += len(value)
            if n and t_first is None:
                # end of the first consume() that returned data; like the worker's
                # rate, the steady rate counts what came after it
                t_first, n_first = time.monotonic(), n
            if n:
                t_last = time.monotonic()
    finally:
        c.close()
    usage = cpu.stop()
    span = (t_last - t_first) if t_first and t_last and t_last > t_first else None
    total = (t_last - t_sub) if t_last else None
    per_msg = events / messages if messages else 1.0  # every message carries its events
    out = {
        "messages": n, "bytes": nbytes, "complete": n >= messages,
        "time_to_first_message_s": round(t_first - t_sub, 3) if t_first else None,
        "first_batch_messages": n_first,
        "seconds": round(span, 3) if span else None,
        "events_per_s": round((n - n_first) * per_msg / span, 1) if span else None,
        "messages_per_s": round((n - n_first) / span, 1) if span else None,
        "mb_per_s": round(nbytes / total / 1e6, 2) if total else None,
        # from subscribe(): includes the group join
        "total_seconds": round(total, 3) if total else None,
        "end_to_end_events_per_s": round(n * per_msg / total, 1) if total else None,
        "decode_json": decode,
        "cpu_s": usage.get("bench_cpu_s"),
    }
    return out


def noop_agent(h: Harness, messages: int, events: int, timeout: float) -> dict:
    """Read ``messages`` messages of ``events`` with a no-op Faust agent (bench/noop_agent.py)."""
    from schemas.topics import EVENTS
    env = {**os.environ, **h.worker_env(), "STREAMREC_BOOTSTRAP": h.bootstrap}
    script = Path(__file__).resolve().parent / "noop_agent.py"
    result = h.tmp / "noop_agent.json"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script), "--messages", str(messages), "--out", str(result),
         "--topic", EVENTS,
         "--events-per-message", str(events / messages if messages else 1.0)],
        env=env, capture_output=True, timeout=timeout, cwd=script.parents[1])
    if not result.exists():
        raise RuntimeError(f"no-op agent exited {proc.returncode} without a result:\n"
                           + (proc.stdout + proc.stderr).decode()[-3000:])
    import orjson
    out = orjson.loads(result.read_bytes())
    out["total_seconds"] = round(time.monotonic() - t0, 2)
    return out


class Profiler:
    """py-spy sampling one process into collapsed stacks (``--format raw``)."""

    def __init__(self, out_dir: Path, rate: int = 100):
        self.path = Path(out_dir) / "worker.pyspy.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rate = rate
        self.proc = None

    def start(self, pid: int) -> None:
        exe = Path(sys.executable).with_name("py-spy")
        self.proc = subprocess.Popen(
            [str(exe), "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw",
             "--output", str(self.path), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> dict:
        if self.proc is None:
            return {}
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return summarise_profile(self.path) if self.path.exists() else {
            "error": (self.proc.stderr.read() or b"").decode()[-500:]}


def summarise_profile(path: Path, top: int = 25) -> dict:
    """Top frames of a collapsed-stack file: own samples and total (inclusive) samples.

    Only the thread running the event loop is counted (the stacks under
    ``run_forever``/``run_until_complete``): the agents run there; Faust's
    consumer thread and librdkafka's threads work beside it.
    """
    own: Counter = Counter()
    total: Counter = Counter()
    samples = loop_samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        if not any("run_until_complete" in f or "run_forever" in f for f in frames):
            continue
        loop_samples += n
        names = [_frame_name(f) for f in frames if not f.startswith(("process ", "thread "))]
        own[names[-1]] += n
        for name in set(names):
            total[name] += n
    return {"samples": samples, "event_loop_samples": loop_samples,
            "own": [[k, v] for k, v in own.most_common(top)],
            "total": [[k, v] for k, v in total.most_common(top * 2)]}


def _frame_name(frame: str) -> str:
    """``func (path/to/module.py:12)`` -> ``func (module.py)``: lines merged."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    parts = Path(file).parts
    return f"{name} ({'/'.join(parts[-2:])})"


def worker_ingest(h: Harness, n_events: int, timeout: float, poll_s: float,
                  profiler: "Profiler | None" = None) -> dict:
    """Start the worker and time its ``events_ingested`` counter from 0 to ``n_events``."""
    t_spawn = time.monotonic()
    w, starter, errors = h.start_worker_async(timeout=timeout)
    log(f"starting worker (web port {w.web_port}, log {w.log_file}); "
        f"waiting for events_ingested >= {n_events}")
    samples = []  # (t since spawn, events_ingested)
    t_ready = t_first = c_first = cpu_first = t_done = None
    broker_cpu_first = None
    counters: dict = {}
    deadline = t_spawn + timeout
    last_log = 0.0
    while time.monotonic() < deadline:
        if errors:
            raise RuntimeError(f"worker failed to start: {errors[0]}")
        if w.proc is not None and w.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {w.proc.returncode}:\n{w.tail()}")
        try:
            stats = w.stats()
        except OSError:
            time.sleep(poll_s)
            continue
        now = time.monotonic()
        counters = stats.get("counters", {})
        count = counters.get("events_ingested", 0)
        samples.append((round(now - t_spawn, 3), count))
        if t_ready is None and not starter.is_alive() and not errors:
            t_ready = now
        if count and t_first is None:
            t_first, c_first = now, count
            cpu_first = cpu_seconds(w.proc.pid if w.proc else None)
            broker_cpu_first = cpu_seconds(h.broker_pid)
            log(f"first events ingested after {t_first - t_spawn:.1f}s ({count})")
            if profiler is not None and w.proc is not None:
                profiler.start(w.proc.pid)  # the steady state, not imports and start-up
        if count >= n_events:
            t_done = now
            break
        if now - last_log > 5:
            last_log = now
            log(f"events_ingested {count}/{n_events}")
        time.sleep(poll_s)
    cpu_done = cpu_seconds(w.proc.pid if w.proc else None)
    broker_cpu_done = cpu_seconds(h.broker_pid)
    # The item side (trending, co-engagement) runs behind ingest: time until it
    # has applied every delta ingest sent, i.e. until the whole pipeline is done.
    t_drained = None
    stats_timeouts = 0
    while t_done is not None and time.monotonic() < deadline:
        try:
            c = w.stats().get("counters", {})
        except OSError:  # a worker busy applying a large batch answers late
            stats_timeouts += 1
            continue
        if c.get("item_deltas_applied", 0) >= c.get("item_deltas_sent", 0):
            t_drained, counters = time.monotonic(), c
            break
        time.sleep(poll_s)
    profile = profiler.stop() if profiler is not None else None
    starter.join(timeout=5)
    if t_ready is None and not starter.is_alive() and not errors:
        t_ready = time.monotonic()
    count = counters.get("events_ingested", 0)
    if t_done is None:
        log(f"TIMEOUT: events_ingested {count}/{n_events} after {timeout:.0f}s")
    span = (t_done - t_first) if t_done and t_first and t_done > t_first else None
    out = {
        "events": count, "complete": t_done is not None,
        "time_to_ready_s": round(t_ready - t_spawn, 2) if t_ready else None,
        "time_to_first_event_s": round(t_first - t_spawn, 2) if t_first else None,
        "first_sample_events": c_first,
        # from the first poll that saw events to the poll that saw all of them
        "seconds": round(span, 2) if span else None,
        "events_per_s": round((count - c_first) / span, 1) if span else None,
        # from spawning the worker process: includes imports, rebalance, recovery
        "end_to_end_seconds": round(t_done - t_spawn, 2) if t_done else None,
        "end_to_end_events_per_s": round(count / (t_done - t_spawn), 1) if t_done else None,
        "counters": counters,
        # events / seconds from the first event until item deltas were all applied
        "pipeline_seconds": round(t_drained - t_first, 2) if t_drained and t_first else None,
        # /stats/ calls that timed out (10 s) while the pipeline drained: the event
        # loop was held that long by one batch
        "stats_timeouts_draining": stats_timeouts,
        "pipeline_events_per_s": (round(count / (t_drained - t_first), 1)
                                  if t_drained and t_first else None),
    }
    if span and cpu_first is not None and cpu_done is not None:
        out["cpu_s"] = round(cpu_done - cpu_first, 2)
        out["cpu_cores"] = round((cpu_done - cpu_first) / span, 2)
    if span and broker_cpu_first is not None and broker_cpu_done is not None:
        out["broker_cpu_cores"] = round((broker_cpu_done - broker_cpu_first) / span, 2)
    if profile is not None:
        out["profile"] = profile
    # a coarse timeline: about 20 points
    step = max(1, len(samples) // 20)
    out["timeline"] = samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else [])
    return out


def main(args: argparse.Namespace) -> dict:
    from schemas.topics import EVENTS
    result = {"bench": "ingest"}
    with Harness(args, "ingest") as h:
        h.create_topics()
        existing = h.topic_message_count(EVENTS)
        if existing:
            raise RuntimeError(f"topic {EVENTS!r} on {h.bootstrap} already holds {existing} "
                               f"messages; the bench needs it empty (use its own broker)")
        log("loading MovieLens events")
        events = load_events(args.dataset, args.limit, args.time_scale)
        n = len(events)
        log(f"producing {n} events ({'1 event' if args.per_message <= 1 else f'up to {args.per_message} events'} "
            f"per message)")
        produced = produce_events(h.bootstrap, events, args.per_message)
        log(f"produced {produced['messages']} messages in {produced['seconds']}s")
        del events
        result.update({
            "config": {"events": n, "per_message": args.per_message, "messages": produced["messages"],
                       "partitions": h.partitions, "fetch_wait_ms": args.fetch_wait_ms,
                       "app_id": h.app_id, "bootstrap": h.bootstrap,
                       "own_broker": h.own_broker},
            "produce": produced,
        })
        if not args.no_raw:
            log("raw consumer: reading the events topic from the beginning")
            raw = raw_consume(h.bootstrap, EVENTS, produced["messages"], n,
                              decode=args.raw_decode, timeout=args.timeout)
            log(f"raw: {raw['messages_per_s']} msg/s, {raw['events_per_s']} events/s")
            result["raw"] = raw
        if not args.no_noop:
            log("no-op Faust agent: reading the events topic from the beginning")
            noop = noop_agent(h, produced["messages"], n, args.timeout)
            log(f"no-op agent: {noop['messages_per_s']} msg/s, {noop['events_per_s']} events/s")
            result["noop_agent"] = noop
        profiler = Profiler(Path(args.profile)) if args.profile else None
        worker = worker_ingest(h, n, args.timeout, args.poll, profiler)
        log(f"worker: {worker['events_per_s']} events/s "
            f"(first event after {worker['time_to_first_event_s']}s)")
        result["worker"] = worker
        if not worker["complete"]:
            result["error"] = f"worker ingested {worker['events']}/{n} events within {args.timeout}s"
            result["worker_log_tail"] = h.worker_log_tail(40).splitlines()
        raw_rate = result.get("raw", {}).get("events_per_s")
        result["ratio_worker_over_raw"] = ratio(worker["events_per_s"], raw_rate, 4)
        noop_rate = result.get("noop_agent", {}).get("events_per_s")
        result["ratio_worker_over_noop_agent"] = ratio(worker["events_per_s"], noop_rate, 3)
        result["ratio_pipeline_over_noop_agent"] = ratio(worker["pipeline_events_per_s"],
                                                         noop_rate, 3)
    return result


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/ingest.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=0,
                    help="only the first N ratings in time order (default: all 100k)")
    ap.add_argument("--per-message", type=int, default=1, metavar="K",
                    help="events per message: 1 = single events, K > 1 = one JSON array "
                         "of up to K events of one user (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="give up on the worker (and raw consumer) after this many seconds")
    ap.add_argument("--poll", type=float, default=0.1, help="stats poll interval, seconds")
    ap.add_argument("--no-raw", action="store_true", help="skip the bare-consumer baseline")
    ap.add_argument("--no-noop", action="store_true",
                    help="skip the no-op Faust agent baseline (bench/noop_agent.py)")
    ap.add_argument("--profile", metavar="DIR",
                    help="sample the worker with py-spy (pip install py-spy) while it ingests; "
                         "top functions go into the JSON, raw stacks into DIR")
    ap.add_argument("--raw-decode", action="store_true",
                    help="the bare consumer also JSON-decodes every message")
    add_common_args(ap, DEFAULT_PORT)
    return ap


if __name__ == "__main__":
    sys.exit(run(main, parser()))

"""Reliability drill: known input, crashes and outages, then what was stored against the truth.

Runs its own broker (wiped) and one or two workers, and meanwhile:

- produces synthetic events (``--users`` users, ``--items`` items) at ``--rate``
  events/s, some as one user's JSON array, then re-sends ``--duplicates`` of them
  unchanged (the dedupe must drop them);
- sends ``--malformed`` messages: garbage bytes, invalid objects, and arrays
  mixing valid events with invalid elements, each invalid element marked so its
  dead letter can be found;
- asks for recommendations at ``--request-rate`` requests/s with a
  ``--deadline`` s deadline, round robin over users (so over every partition);
- SIGKILLs a worker ``--kills`` times and restarts it at once (with
  ``--workers 2``, one of two is killed, the other takes its partitions over,
  and the killed one comes back after the takeover), and restarts the broker
  ``--broker-restarts`` times.

When the input is all consumed it reads what the system stored (the
``user_history`` and ``item_stats`` changelogs, ``events.dlq``) and prints one
JSON object: user history and item-side counts against the ground truth (only
messages the broker acknowledged count), dead letters against the bad elements
sent, requests answered by their deadline, later and twice, and for each kill
the time until every partition serves again (p50/p99).

    flock /tmp/streamrec-bench.lock python bench/drill.py --short
    flock /tmp/streamrec-bench.lock python bench/drill.py --workers 2

Progress goes to stderr (a bar on long runs); the result is the last line of stdout.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson  # noqa: E402

from bench.common import Harness, add_common_args, free_port, log, run, summary  # noqa: E402

EVENT_TYPES = {"impression": 50, "click": 14, "like": 14, "save": 4, "share": 3, "comment": 3,
               "follow": 2, "see_less": 6, "report": 2, "dwell": 2}
MARKER = re.compile(rb"drill-bad-(\d+)")


# --------------------------------------------------------------------------- input and truth

class Input:
    """The drill's messages, and the truth: what was sent."""

    def __init__(self, users: int, items: int, seed: int):
        self.rng = random.Random(seed)
        self.users, self.items = users, items
        self.run_id = uuid.uuid4().hex[:8]
        self.valid: dict[str, dict] = {}      # event id -> event, not refused
        self.bad_sent: set[int] = set()       # markers of invalid units, acknowledged
        self.messages = Counter()
        self.failed = 0
        self._bad = 0
        self._n = 0

    def event(self, user: Optional[int] = None) -> dict:
        self._n += 1
        item = self.rng.randrange(self.items)
        kind = self.rng.choices(list(EVENT_TYPES), weights=list(EVENT_TYPES.values()))[0]
        ev = {"event_id": f"drill-{self.run_id}-{self._n}",
              "user_id": str(self.rng.randrange(self.users) if user is None else user),
              "item_id": f"it{item}", "author_id": f"au{item % 40}", "event_type": kind,
              "surface": "explore", "ts": time.time()}
        if kind == "dwell":
            ev["dwell_ms"] = self.rng.randrange(100, 60_000)
        return ev

    def bad_element(self, user: str) -> tuple[int, dict]:
        self._bad += 1
        broken = self.rng.choice([{"event_type": "bogus"}, {"item_id": None}, {"ts": "yesterday"},
                                  {"surface": "Not A Surface"}])
        return self._bad, {**self.event(int(user)), "event_id": f"drill-bad-{self._bad}", **broken}

    def garbage(self) -> tuple[int, bytes]:
        self._bad += 1
        return self._bad, self.rng.choice([b"{not json drill-bad-%d" % self._bad,
                                           b"\xff\xfe drill-bad-%d" % self._bad,
                                           b'"drill-bad-%d"' % self._bad])

    def sent(self, kind: str, valid: list, bad: list) -> None:
        self.messages[kind] += 1
        for ev in valid:
            self.valid[ev["event_id"]] = ev
        self.bad_sent.update(bad)

    def not_delivered(self, kind: str, valid: list, bad: list) -> None:
        """A message the broker never acknowledged is not part of the truth (a
        re-sent duplicate's original still is).  A message that timed out while in
        flight may still have been written: then it shows as counted twice.

        >>> inp = Input(1, 1, 0)
        >>> ev = inp.event()
        >>> inp.sent("single", [ev], [7]); inp.not_delivered("single", [ev], [7])
        >>> len(inp.valid), inp.bad_sent, inp.messages["not_delivered"]
        (0, set(), 1)
        """
        self.messages["not_delivered"] += 1
        if kind != "duplicate":
            for ev in valid:
                self.valid.pop(ev["event_id"], None)
        self.bad_sent.difference_update(bad)


def produce(bootstrap: str, inp: Input, n_events: int, rate: float, duplicates: int,
            malformed: int, stop: threading.Event, progress: dict) -> None:
    """Send the events at ``rate``/s with the malformed messages spread among them,
    then the duplicates; returns when the broker has acknowledged them all.  The
    producer retries through broker restarts (idempotent, for up to 10 minutes), so
    the truth is what was sent; ``inp.failed`` says if any was not acknowledged."""
    from streams.producer import EventProducer
    producer = EventProducer(bootstrap, **{"message.timeout.ms": 600_000})

    def send(kind: str, key: str, value: bytes, valid: list, bad: list) -> None:
        def delivered(err, _msg) -> None:
            if err is not None:
                inp.not_delivered(kind, valid, bad)
        inp.sent(kind, valid, bad)
        producer.send_raw(key.encode(), value, on_delivery=delivered)

    sent_valid: list[dict] = []
    bad_every = max(1, n_events // max(1, malformed)) if malformed else 0
    t0 = time.monotonic()
    i = bad_sent = 0
    while i < n_events and not stop.is_set():
        user = str(inp.rng.randrange(inp.users))
        if bad_every and i % bad_every == 0 and bad_sent < malformed:
            bad_sent += 1
            shape = bad_sent % 3
            if shape == 0:
                marker, raw = inp.garbage()
                send("garbage", user, raw, [], [marker])
            elif shape == 1:
                marker, el = inp.bad_element(user)
                send("invalid", user, orjson.dumps(el), [], [marker])
            else:  # an array: valid events of the user with invalid elements among them
                good = [inp.event(int(user)) for _ in range(inp.rng.randrange(1, 4))]
                bad = [inp.bad_element(user) for _ in range(inp.rng.randrange(1, 3))]
                elements = good + [b for _, b in bad]
                inp.rng.shuffle(elements)
                send("mixed_array", user, orjson.dumps(elements), good, [m for m, _ in bad])
                sent_valid.extend(good)
                i += len(good)
            continue
        if inp.rng.random() < 0.2:  # one user's events as one array message
            evs = [inp.event(int(user)) for _ in range(inp.rng.randrange(2, 6))]
            send("array", user, orjson.dumps(evs), evs, [])
        else:
            evs = [inp.event(int(user))]
            send("single", user, orjson.dumps(evs[0]), evs, [])
        sent_valid.extend(evs)
        i += len(evs)
        progress["events"] = i
        ahead = i / rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
    for ev in inp.rng.sample(sent_valid, min(duplicates, len(sent_valid))):
        send("duplicate", ev["user_id"], orjson.dumps(ev), [ev], [])
        time.sleep(1.0 / rate)
    try:
        producer.flush(timeout=600)
    except Exception as exc:  # DeliveryError: the comparison below is then approximate
        log(f"not all events were acknowledged: {exc}")
    inp.failed = producer.failed
    progress["produced"] = True


# --------------------------------------------------------------------------- requests

class Requests:
    """Steady requests with a deadline; each one's outcome and when it came."""

    def __init__(self, bootstrap: str, users: int, rate: float, deadline: float, partitions: int):
        from schemas.topics import partition_for
        from streams.client import RecommendationClient
        self.client = RecommendationClient(bootstrap)
        self.rate, self.deadline = rate, deadline
        self.users = [str(u) for u in range(users)]
        self.partition = {u: partition_for(u, partitions) for u in self.users}
        #: (partition, sent, outcome, resolved): outcome "reply", "fallback", "error", "expired".
        self.log: list[list] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drill-requests", daemon=True)

    def start(self) -> "Requests":
        self._thread.start()
        return self

    def _run(self) -> None:
        i = 0
        t0 = time.monotonic()
        while not self._stop.is_set():
            user = self.users[i % len(self.users)]
            entry = [self.partition[user], time.time(), None, None]
            self.log.append(entry)
            try:
                fut = self.client.submit(user, "explore", 10, timeout=self.deadline)
            except Exception:
                entry[2], entry[3] = "not_sent", time.time()
            else:
                fut.add_done_callback(lambda f, e=entry: self._done(f, e))
            i += 1
            ahead = i / self.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)

    @staticmethod
    def _done(fut, entry: list) -> None:
        entry[3] = time.time()
        exc = fut.exception()
        if exc is not None:
            entry[2] = "expired" if isinstance(exc, TimeoutError) else "bad_reply"
            return
        reply = fut.result()
        entry[2] = "error" if reply.error else ("fallback" if reply.fallback else "reply")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        time.sleep(self.deadline + 1.5)  # let the last ones end
        self.client.close()

    def answered(self, entry: list) -> bool:
        return entry[2] in ("reply", "fallback") and entry[3] <= entry[1] + self.deadline

    def serving_again(self, since: float, until: float) -> Optional[float]:
        """Seconds from ``since`` until every partition answers again: per partition,
        the first answer to a request sent after the last one left unanswered in
        [since, until]; the slowest partition counts.  None if one never did."""
        worst = 0.0
        for p in sorted({e[0] for e in self.log}):
            window = [e for e in self.log if e[0] == p and since <= e[1] <= until
                      and e[2] is not None]
            missed = [e[1] for e in window if not self.answered(e)]
            after = [e[3] for e in window if self.answered(e) and e[1] >= max(missed, default=0)]
            if not after:
                return None
            worst = max(worst, min(after) - since)
        return worst

    def report(self) -> dict:
        done = [e for e in self.log if e[2] is not None]
        outcomes = Counter(e[2] for e in done)
        by_deadline = sum(self.answered(e) for e in done)
        unresolved = [e for e in self.log if e[3] is None or e[3] > e[1] + self.deadline + 1.0]
        c = self.client.counts
        return {"sent": len(self.log), "deadline_s": self.deadline,
                "answered_by_deadline": by_deadline,
                "fallbacks": outcomes["fallback"], "error_replies": outcomes["error"],
                "expired_at_deadline": outcomes["expired"],
                "no_answer_or_error_by_deadline_plus_1s": len(unresolved),
                "late_replies": c["late_replies"], "answered_twice": c["duplicate_replies"],
                "outcomes": dict(outcomes)}


# --------------------------------------------------------------------------- what was stored

def agent_inputs(app_id: str, partitions: int) -> list:
    """The topics the ingest and item-stats agents read (from the catalogue's map)."""
    from schemas.topics import catalogue
    return [t.name for t in catalogue(partitions, app_id) if not t.name.endswith("-changelog")
            and any(r.split(":")[0] in ("streams.ingest", "streams.item_stats")
                    for r in t.readers)]


def consumed(bootstrap: str, group: str, topics: list) -> int:
    """Messages of ``topics`` the group has not committed yet."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = [TopicPartition(t, p) for t in topics
               for p in c.list_topics(t, timeout=10).topics[t].partitions]
        behind = 0
        for tp in c.committed(tps, timeout=10):
            hi = c.get_watermark_offsets(tp, timeout=10)[1]
            behind += hi - max(tp.offset, 0)
        return behind
    finally:
        c.close()


def read_all(bootstrap: str, topic: str, timeout: float = 60.0, positions: bool = False) -> list:
    """Every (key, value) of ``topic`` up to its current end; with ``positions``,
    (partition, offset, key, value)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"drill-{uuid.uuid4().hex}",
                  "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        out, pos = [], {p: 0 for p in parts}
        deadline = time.time() + timeout
        while any(pos[p] < ends[p] for p in parts) and time.time() < deadline:
            for m in c.consume(1000, timeout=0.5):
                if m.error():
                    continue
                out.append((m.partition(), m.offset(), m.key(), m.value()) if positions
                           else (m.key(), m.value()))
                pos[m.partition()] = m.offset() + 1
        return out
    finally:
        c.close()


def dump(folder: str, bootstrap: str, inp: "Input", changelog) -> None:
    """Write the truth and every message of the topics the comparisons rest on
    (``events``, ``item.deltas`` and the two changelogs), one JSON line each
    (partition, offset, key, value), so a mismatch can be traced to the event, the
    delta part or the table write that went wrong."""
    from schemas.topics import EVENTS, ITEM_DELTAS
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "truth.json").write_bytes(orjson.dumps(inp.valid))
    for name, topic in (("events", EVENTS), ("item_deltas", ITEM_DELTAS),
                        ("item_stats", changelog("item_stats")),
                        ("user_history", changelog("user_history"))):
        with open(out / f"{name}.jsonl", "wb") as f:
            for p, o, k, v in read_all(bootstrap, topic, positions=True):
                f.write(orjson.dumps([p, o, None if k is None else k.decode("utf-8", "replace"),
                                      None if v is None else v.decode("utf-8", "replace")]) + b"\n")
    log(f"dumped the truth and the topics the comparisons read to {out}")


def latest(messages: list) -> dict:
    """A table's changelog as {key: latest value} (Faust writes keys as JSON too)."""
    state = {}
    for k, v in messages:
        state[orjson.loads(k)] = None if v is None else orjson.loads(v)
    return state


def compare_users(truth: dict, stored: dict, partitions: int = 0, started: float = 0.0) -> dict:
    """Each user's stored history (event ids, event count) against the events sent.

    With ``partitions``, lost events are also listed per user partition, as
    seconds since ``started`` (when they were made), to set beside the chaos times.

    >>> truth = {"e1": {"user_id": "u", "ts": 11.0}, "e2": {"user_id": "u", "ts": 12.0}}
    >>> compare_users(truth, {"u": {"ids": ["e1"], "n": 1}}, partitions=1, started=10.0)
    {'users': 1, 'events': 2, 'lost': 1, 'counted_twice': 0, 'lost_by_partition': {'0': [2.0]}}
    """
    from schemas.topics import partition_for
    per_user: dict[str, set] = defaultdict(set)
    for eid, ev in truth.items():
        per_user[ev["user_id"]].add(eid)
    lost = twice = 0
    by_partition: dict[str, list] = defaultdict(list)
    for user, ids in per_user.items():
        record = stored.get(user) or {}
        kept = set(record.get("ids", ())) & ids
        lost += len(ids) - len(kept)
        twice += max(0, int(record.get("n", 0)) - len(kept))
        if partitions:
            by_partition[str(partition_for(user, partitions))].extend(
                round(truth[e]["ts"] - started, 2) for e in ids - kept)
    out = {"users": len(per_user), "events": len(truth), "lost": lost, "counted_twice": twice}
    if partitions:
        out["lost_by_partition"] = {p: sorted(ts) for p, ts in sorted(by_partition.items()) if ts}
    return out


def compare_items(truth: dict, stored: dict) -> dict:
    """Each item's quality counts in ``item_stats`` against the events sent."""
    from models.item_state import QUALITY_KEYS
    want: dict[str, Counter] = defaultdict(Counter)
    for ev in truth.values():
        key = QUALITY_KEYS.get(ev["event_type"])
        if key is not None:
            want[ev["item_id"]][key] += 1
    too_many = too_few = 0
    items_off = 0
    for item in set(want) | {k for k in stored if k.startswith("it")}:
        have = Counter((stored.get(item) or {}).get("q") or {})
        diff = [have[k] - want[item][k] for k in set(have) | set(want[item])]
        too_many += sum(d for d in diff if d > 0)
        too_few += sum(-d for d in diff if d < 0)
        items_off += any(diff)
    return {"items": len(want), "counts": sum(sum(c.values()) for c in want.values()),
            "too_many": too_many, "too_few": too_few, "items_off": items_off}


def compare_dead_letters(inp: Input, records: list) -> dict:
    """Dead letters against the invalid units sent: each found once, no valid event among them."""
    from schemas.deadletter import element_of, original_bytes
    found: Counter = Counter()
    good, unreadable = 0, 0
    for rec in records:
        raw = original_bytes(rec)
        if raw is not None and rec.get("excerpt_of") == "message" and rec.get("index") is not None:
            raw = element_of(raw, rec["index"]) or raw
        marks = MARKER.findall(raw or b"")
        if len(marks) == 1:
            found[int(marks[0])] += 1
        elif raw is not None and any(eid in inp.valid for eid in re.findall(
                r'"event_id":"([^"]+)"', raw.decode("utf-8", "replace"))):
            good += 1
        else:
            unreadable += 1
    return {"bad_sent": len(inp.bad_sent), "dead_lettered": len(set(found) & inp.bad_sent),
            "missing": len(inp.bad_sent - set(found)), "records": len(records),
            "duplicate_records": sum(n - 1 for n in found.values()),
            "valid_events_dead_lettered": good, "records_without_marker": unreadable}


# --------------------------------------------------------------------------- chaos

class Workers:
    def __init__(self, h: Harness, n: int, web_port: int):
        from streams.local import WorkerProcess
        env = {**h.worker_env(), "STREAMREC_ONLINE_TRAINING": "0"}
        ports = [web_port + i if web_port else free_port() for i in range(n)]
        self.procs = [WorkerProcess(h.bootstrap, h.tmp / f"worker-{i}", web_port=port, env=env)
                      for i, port in enumerate(ports)]
        self.expected_exits = 0
        self.unexpected_exits = 0

    def start_all(self) -> None:
        threads = [threading.Thread(target=w.start, daemon=True) for w in self.procs]
        [t.start() for t in threads]
        [t.join(180) for t in threads]

    def kill(self, i: int) -> None:
        w = self.procs[i]
        os.killpg(w.proc.pid, signal.SIGKILL)
        w.proc.wait(10)

    def watch(self) -> None:
        """Count workers that died without being killed (input must never crash one)."""
        for w in self.procs:
            if w.proc is not None and w.proc.poll() not in (None, -signal.SIGKILL, 0, 70):
                self.unexpected_exits += 1
                log(f"worker exited by itself ({w.proc.returncode}): {w.tail(5)}")
                w.proc = None

    def stop_checks(self, h: Harness) -> dict:
        """Seconds a worker takes to stop on SIGTERM while it starts (joining its group)
        and while the broker is down."""
        from streams import broker
        w, out = self.procs[0], {}
        for state in ("starting", "broker_down"):
            starter = threading.Thread(target=self._start_quietly, args=(w,), daemon=True)
            starter.start()
            if state == "starting":
                time.sleep(2.5)  # imports done, joining the group
            else:
                starter.join(120)
                broker.stop(port=h.args.port)
            t0 = time.monotonic()
            w.stop(timeout=30)
            out[state] = round(time.monotonic() - t0, 2)
            starter.join(10)
        broker.start(port=h.args.port, timeout=90)
        return out

    @staticmethod
    def _start_quietly(w) -> None:
        try:
            w.start(timeout=120)
        except Exception:  # stopped while starting: the point of the check
            pass

    def stop_all(self) -> list:
        times = []
        for w in self.procs:
            t0 = time.monotonic()
            w.stop(timeout=30)
            times.append(round(time.monotonic() - t0, 2))
        return times


def progress_bar(state: dict, total_s: float, stop: threading.Event, enabled: bool) -> None:
    t0 = time.monotonic()
    while not stop.wait(1.0):
        if not enabled:
            continue
        done = min(1.0, (time.monotonic() - t0) / total_s)
        bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
        print(f"\r[{bar}] {done:4.0%} events {state.get('events', 0)} kills {state.get('kills', 0)}"
              f" broker restarts {state.get('broker_restarts', 0)} {state.get('phase', '')}   ",
              end="", file=sys.stderr, flush=True)
    if enabled:
        print(file=sys.stderr)


def ephemeral_ports() -> range:
    """The range the kernel picks client ports from (Linux; a guess elsewhere)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def main(args: argparse.Namespace) -> dict:
    if args.broker_restarts and not args.bootstrap and (
            args.port in ephemeral_ports() or args.port + 1 in ephemeral_ports()):
        # While the broker is down, clients reconnecting to 127.0.0.1:PORT can be given
        # PORT as their own port and connect to themselves; the broker then cannot bind.
        raise ValueError(f"--port {args.port} is in the kernel's client port range "
                         f"{ephemeral_ports()}: a restarted broker may find it taken; "
                         f"choose one below {ephemeral_ports().start - 1}")
    if args.short:
        args.events, args.rate, args.duplicates, args.malformed = 6000, 100.0, 300, 300
        args.kills, args.broker_restarts = 3, 1
    duration = args.events / args.rate
    result: dict = {"bench": "drill", "workers": args.workers, "events_planned": args.events,
                    "rate": args.rate, "kills": args.kills,
                    "broker_restarts": args.broker_restarts}
    with Harness(args, "drill") as h:
        h.create_topics()
        workers = Workers(h, args.workers, args.web_port)
        try:
            result.update(drill(args, h, workers, duration))
        finally:
            result["stop_s"] = {"serving": workers.stop_all()}
        result["stop_s"].update(workers.stop_checks(h))
    return result


def drill(args: argparse.Namespace, h: Harness, workers: Workers, duration: float) -> dict:
    from streams import broker
    from schemas.topics import changelog_name
    from streams.deadletters import read_records
    log(f"starting {args.workers} worker(s)")
    workers.start_all()
    inp = Input(args.users, args.items, args.seed)
    state: dict = {}
    stop = threading.Event()
    bar = threading.Thread(target=progress_bar, daemon=True,
                           args=(state, duration + 20, stop, not args.no_progress))
    bar.start()
    requests = Requests(h.bootstrap, args.users, args.request_rate, args.deadline,
                        h.partitions).start()
    time.sleep(2.0)
    started = time.time()
    producer = threading.Thread(target=produce, daemon=True, args=(
        h.bootstrap, inp, args.events, args.rate, args.duplicates, args.malformed,
        threading.Event(), state))
    producer.start()
    # Chaos spread over the run: kills, and broker restarts between them.
    plan = ["kill"] * args.kills
    for j in range(args.broker_restarts):
        plan.insert((j + 1) * len(plan) // (args.broker_restarts + 1) + j, "broker")
    gap = duration / (len(plan) + 1)
    kills, broker_outages, broker_back, returns = [], [], [], []
    t0 = time.monotonic()
    for n, what in enumerate(plan, 1):
        while time.monotonic() < t0 + n * gap:
            workers.watch()
            time.sleep(0.2)
        if what == "kill":
            victim = (n % args.workers)
            t_kill = time.time()
            workers.kill(victim)
            if args.workers == 1:
                workers.procs[victim].start(timeout=120)
            else:  # the other takes over; the killed one returns once it has
                deadline = time.time() + 30
                while requests.serving_again(t_kill, time.time()) is None and \
                        time.time() < deadline:
                    time.sleep(0.5)
                time.sleep(1.0)
                returns.append(time.time())
                workers.procs[victim].start(timeout=120)
            kills.append(t_kill)
            state["kills"] = len(kills)
        else:
            t_stop = time.time()
            broker.stop(port=h.args.port)
            time.sleep(2.0)
            broker.start(port=h.args.port, timeout=90)
            broker_back.append(time.time())
            broker_outages.append(t_stop)
            state["broker_restarts"] = len(broker_outages)
    state["phase"] = "draining"
    producer.join()
    deadline = time.monotonic() + args.drain_timeout
    behind = None
    while time.monotonic() < deadline:
        workers.watch()
        behind = consumed(h.bootstrap, h.app_id, agent_inputs(h.app_id, h.partitions))
        if behind == 0:
            break
        time.sleep(1.0)
    time.sleep(3.0)  # the last changelog writes and dead letters
    requests.stop()
    stop.set()
    bar.join()
    # Each outage is measured until the next disruption (less a deadline: requests
    # sent just before it may be cut off by it).
    ends = kills + broker_outages + returns + [time.time()]

    def until_next(t: float) -> float:
        return min([e for e in ends if e > t] + [t + 60]) - args.deadline

    serving = [requests.serving_again(k, until_next(k)) for k in kills]
    if args.dump:
        dump(args.dump, h.bootstrap, inp, lambda table: changelog_name(h.app_id, table))
    if args.requests_log:
        Path(args.requests_log).write_bytes(orjson.dumps({
            "requests": requests.log, "kills": kills, "broker_outages": broker_outages,
            "broker_back": broker_back, "returns": returns}))
    return {
        "events": {"inputs": agent_inputs(h.app_id, h.partitions),
                   "sent_valid": len(inp.valid), "messages": dict(inp.messages),
                   "not_acknowledged": inp.failed, "left_unconsumed": behind},
        "user_history": compare_users(inp.valid, latest(
            read_all(h.bootstrap, changelog_name(h.app_id, "user_history"))),
            h.partitions, started),
        "item_counts": compare_items(inp.valid, latest(
            read_all(h.bootstrap, changelog_name(h.app_id, "item_stats")))),
        "dead_letters": compare_dead_letters(inp, read_records(h.bootstrap)),
        "requests": requests.report(),
        "kill_to_serving_s": {
            "each": [None if s is None else round(s, 2) for s in serving],
            **{k: v for k, v in summary([s for s in serving if s is not None]).items()
               if k in ("p50", "p99", "max")},
            "never": sum(s is None for s in serving)},
        # From the broker's stop; "up_after_s": when it listened again.
        "broker_restart_to_serving_s": [
            {"serving_after_s": None if s is None else round(s, 2), "up_after_s": round(up - b, 2)}
            for s, b, up in ((requests.serving_again(b, until_next(b)), b, up)
                             for b, up in zip(broker_outages, broker_back))],
        "worker_exits_not_caused_by_the_drill": workers.unexpected_exits,
        # Seconds since the first event, to set beside lost_by_partition.
        "chaos_s": {name: [round(t - started, 2) for t in times] for name, times in
                    (("kills", kills), ("returns", returns), ("broker_stops", broker_outages),
                     ("broker_back", broker_back))},
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/drill.py", description=__doc__.split("\n\n")[0])
    add_common_args(ap, default_port=19892)
    ap.add_argument("--workers", type=int, choices=(1, 2), default=1)
    ap.add_argument("--short", action="store_true",
                    help="6,000 events, 300 duplicates, 300 malformed, 3 kills, 1 broker restart")
    ap.add_argument("--events", type=int, default=40_000)
    ap.add_argument("--rate", type=float, default=400.0, help="events per second")
    ap.add_argument("--users", type=int, default=400)
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--duplicates", type=int, default=2_000)
    ap.add_argument("--malformed", type=int, default=3_000, help="malformed messages")
    ap.add_argument("--request-rate", type=float, default=20.0)
    ap.add_argument("--deadline", type=float, default=2.0, help="seconds")
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--broker-restarts", type=int, default=2)
    ap.add_argument("--drain-timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--dump", metavar="DIR",
                    help="write the truth and the events, item.deltas, item_stats and "
                         "user_history changelog topics as JSON lines, to trace a count that "
                         "is off")
    ap.add_argument("--requests-log", metavar="PATH",
                    help="write each request (partition, sent, outcome, ended) and the chaos "
                         "times as JSON, to look into an outage")
    return ap


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))

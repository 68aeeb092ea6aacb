"""The cluster's figures: every worker publishes its own, every worker merges them all.

Every ``STATS_INTERVAL_S`` each worker sends its figures (counters, rates, a
latency histogram, consumer lag, the live model and its calibration, funnel
stage counts, dead-letter reasons) to the compacted ``cluster.stats`` topic,
keyed by worker id.  Every worker tails that topic in a group-less background
consumer (:class:`ClusterView`), so any worker's dashboard shows the whole
cluster: :func:`merge_cluster` sums and merges the latest figures of each
worker, and a worker whose latest figures are older than ``STALE_S`` is shown
as down.  The topic keeps an hour uncompacted, so a worker that starts reads
the last hour and its dashboard opens with history.

The merging is pure functions over plain dicts; the Faust glue (a sensor that
counts what is sent, the publishing timer, the broker lag poll) is at the end and
is put on the worker's app by :func:`install`, so importing this module makes no
Faust app (``streamrec dashboard`` merges the same figures without a worker).
"""
from __future__ import annotations

import logging
import math
import re
import socket
import threading
import time
from collections import Counter, deque
from typing import Optional

import orjson

from schemas.topics import EVENTS_DLQ, REPLIES, STATS
from streams import metrics
from streams.kafka_config import client_config

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 2.0
#: Figures older than this mark their worker down (three missed publications), so a
#: dead worker shows as down within 6-8 s.
STALE_S = 6.0
#: Rates are counter differences over this much of the worker's own history.
RATE_WINDOW_S = 10.0
HISTORY_S = 3600.0
#: Cluster history is merged into buckets of this many seconds.
HISTORY_STEP_S = 10.0
#: Stability figures kept per worker: the live version and this many recent others.
RECENT_VERSIONS = 3
TOP_REASONS = 5

RATE_COUNTERS = {"events": "events_ingested", "requests": "requests_served",
                 "fallbacks": "fallbacks", "dead_letters": "dead_letters",
                 "examples": "training_examples"}

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"\d+(\.\d+)?(e[+-]?\d+)?")


def reason_kind(reason: str) -> str:
    """A dead letter's reason with its particulars blanked, so reasons can be counted.

    >>> reason_kind("'ts' must be epoch seconds, got 1700000000000.0 (milliseconds?)")
    "'ts' must be epoch seconds, got N (milliseconds?)"
    >>> reason_kind("not valid JSON: unexpected character: line 1 column 2 (char 1)")
    'not valid JSON: unexpected character: line N column N (char N)'
    """
    quoted = _QUOTED.findall(reason)
    # Keep the first quoted word (usually the field's name), blank the rest (values).
    out = _QUOTED.sub(lambda m: m.group(0) if quoted and m.group(0) == quoted[0] else "'…'", reason)
    return _NUMBER.sub("N", out)[:120]


def rate(history: list, key, window_s: float = RATE_WINDOW_S) -> float:
    """Per-second increase of a counter over the last ``window_s`` of ``history``,
    a list of ``(time, {name: count})``; a restart (count going down) counts from 0.

    >>> rate([(0.0, {"x": 10}), (5.0, {"x": 20}), (10.0, {"x": 40})], "x")
    3.0
    >>> rate([(0.0, {"x": 10})], "x")
    0.0
    """
    if len(history) < 2:
        return 0.0
    t1, last = history[-1]
    first = history[0]
    for t, c in history:
        if t1 - t <= window_s:
            first = (t, c)
            break
    t0, c0 = first
    if t1 <= t0:
        return 0.0
    now, then = last.get(key, 0), c0.get(key, 0)
    return round(((now - then) if now >= then else now) / (t1 - t0), 3)


def version_order(model: str) -> tuple:
    """Sort key for ``"name:version"`` strings with numbers compared as numbers.

    >>> sorted(["mtml:v10", "mtml:v9"], key=version_order)
    ['mtml:v9', 'mtml:v10']
    """
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", model))


def recent_versions(report: dict, live: Optional[str], keep: int = RECENT_VERSIONS) -> dict:
    """The stability report cut to the live version and the ``keep`` newest others.

    >>> sorted(recent_versions({f"m:v{i}": {} for i in range(9)}, "m:v2", keep=2))
    ['m:v2', 'm:v7', 'm:v8']
    """
    others = sorted((m for m in report if m != live), key=version_order)[-keep:]
    return {m: report[m] for m in ([live] if live in report else []) + others}


def clean(value):
    """JSON-safe copy: NaN and infinities become None."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def history_point(figures: dict) -> dict:
    """What the cluster history keeps of one publication."""
    stability = figures.get("stability") or {}
    live = (figures.get("models") or {}).get("live")
    heads = (stability.get("report") or {}).get(live) or {}
    return {"rates": figures.get("rates", {}), "latency_hist": figures.get("latency_hist", {}),
            "group_lag": {g: sum(sum(p.values()) for p in t.values())
                          for g, t in (figures.get("group_lag") or {}).items()},
            "model": live if heads else None,
            "heads": {h: {"calibration": m.get("calibration"), "ne": m.get("ne"), "n": m.get("n")}
                      for h, m in heads.items() if m.get("n")}}


def _sum_rates(points: list) -> dict:
    out: dict = {}
    for p in points:
        for name, value in (p.get("rates") or {}).items():
            if isinstance(value, dict):
                sub = out.setdefault(name, {})
                for k, v in value.items():
                    sub[k] = round(sub.get(k, 0.0) + v, 3)
            else:
                out[name] = round(out.get(name, 0.0) + value, 3)
    return out


def latency_summary(hist: dict) -> dict:
    """p50 / p95 / p99 (ms) and the count of a merged latency histogram."""
    return {"n": sum(hist.values()),
            **{f"p{q}": (round(v, 2) if (v := metrics.histogram_percentile(hist, q)) else None)
               for q in (50, 95, 99)}}


def merge_cluster(latest: dict, now: float, stale_s: float = STALE_S) -> dict:
    """The cluster's figures from each worker's latest ``{worker_id: figures}``.

    Rates and latency come from the workers that are up; counters and dead-letter
    reasons add every worker's last figures (a dead worker's work still happened);
    lag, the registry and model stability come from the freshest worker that has them.

    >>> up = {"at": 100.0, "rates": {"requests": 2.0}, "counters": {"requests_served": 5}}
    >>> down = {"at": 80.0, "rates": {"requests": 9.0}, "counters": {"requests_served": 7}}
    >>> c = merge_cluster({"a": up, "b": down}, now=101.0)
    >>> [(w["id"], w["up"]) for w in c["workers"]], c["rates"]["requests"], c["counters"]
    ([('a', True), ('b', False)], 2.0, {'requests_served': 12})
    """
    workers, live_figures = [], []
    counters: Counter = Counter()
    reasons: Counter = Counter()
    stages: Counter = Counter()
    sources: Counter = Counter()
    replies = 0
    for wid, f in sorted(latest.items()):
        age = now - f.get("at", 0.0)
        up = age <= stale_s
        workers.append({"id": wid, "up": up, "age_s": round(age, 1),
                        "uptime_s": f.get("uptime_s"), "partitions": f.get("partitions", {}),
                        "requests_per_s": (f.get("rates") or {}).get("requests", 0.0) if up else 0.0,
                        "events_per_s": (f.get("rates") or {}).get("events", 0.0) if up else 0.0,
                        "web": f.get("web")})
        counters.update(f.get("counters", {}))
        reasons.update(f.get("dead_letter_reasons", {}))
        stages.update((f.get("funnel") or {}).get("stage_sums", {}))
        sources.update((f.get("funnel") or {}).get("sources", {}))
        replies += (f.get("funnel") or {}).get("replies", 0)
        if up:
            live_figures.append(f)
    rates = _sum_rates(live_figures)
    hist = metrics.merge_histograms(f.get("latency_hist", {}) for f in live_figures)
    fresh = sorted(latest.values(), key=lambda f: f.get("at", 0.0), reverse=True)

    def freshest(pick):
        return next((pick(f) for f in fresh if pick(f)), None)

    requests = rates.get("requests", 0.0)
    return {
        "at": now, "workers": workers, "workers_up": len(live_figures),
        "counters": dict(sorted(counters.items())), "rates": rates,
        "fallback_share": round(rates.get("fallbacks", 0.0) / requests, 4) if requests else None,
        "latency_ms": latency_summary(hist),
        "dead_letter_reasons": dict(reasons.most_common(TOP_REASONS)),
        "group_lag": freshest(lambda f: f.get("group_lag")) or {},
        "models": freshest(lambda f: (f.get("models") or {}).get("registry") and f["models"]) or {},
        "stability": freshest(lambda f: (f.get("stability") or {}).get("report")
                              and f["stability"]) or {},
        "funnel": {"replies": replies, "stage_mean": {s: round(n / replies, 1)
                                                      for s, n in stages.items()} if replies else {},
                   "sources": dict(sources.most_common()),
                   "config": freshest(lambda f: (f.get("funnel") or {}).get("config")) or {},
                   "trending": freshest(lambda f: (f.get("funnel") or {}).get("trending")) or []},
    }


def merge_history(history: dict, step_s: float = HISTORY_STEP_S, since: float = 0.0) -> list:
    """Cluster series from each worker's ``[(at, history_point)]``: one row per
    ``step_s`` bucket with rates summed over the workers seen in it, latency from
    their merged histograms, group lag and the live model's calibration per head.
    ``since`` keeps the buckets starting at or after it (the newest one is still filling).

    >>> h = {"a": [(100.0, {"rates": {"requests": 1.0}, "latency_hist": {"10": 1}}),
    ...            (104.0, {"rates": {"requests": 3.0}, "latency_hist": {"10": 2}})],
    ...      "b": [(101.0, {"rates": {"requests": 2.0}, "latency_hist": {"20": 1}})]}
    >>> [(r["t"], r["rates"]["requests"], r["latency_ms"]["n"]) for r in merge_history(h)]
    [(100.0, 5.0, 3)]
    """
    buckets: dict[float, dict[str, tuple]] = {}
    for wid, points in history.items():
        for at, point in points:
            t = math.floor(at / step_s) * step_s
            if t < since:
                continue
            prev = buckets.setdefault(t, {}).get(wid)
            if prev is None or at >= prev[0]:
                buckets[t][wid] = (at, point)
    rows = []
    for t in sorted(buckets):
        points = [p for _, p in buckets[t].values()]
        requests = _sum_rates(points).get("requests", 0.0)
        rates = _sum_rates(points)
        lag: dict = {}
        for p in points:
            for g, v in (p.get("group_lag") or {}).items():
                lag[g] = max(lag.get(g, 0), v)
        model = next((p for p in points if p.get("heads")), {})
        rows.append({"t": t, "rates": rates,
                     "fallback_share": (round(rates.get("fallbacks", 0.0) / requests, 4)
                                        if requests else None),
                     "latency_ms": latency_summary(metrics.merge_histograms(
                         p.get("latency_hist", {}) for p in points)),
                     "group_lag": lag, "model": model.get("model"), "heads": model.get("heads", {})})
    return rows


class ClusterView:
    """Every worker's figures from ``cluster.stats``: the latest per worker and the
    last hour of each, read by a group-less background consumer."""

    def __init__(self, bootstrap: str, topic: str = STATS):
        self.bootstrap = bootstrap
        self.topic = topic
        self.latest: dict[str, dict] = {}
        self.history: dict[str, deque] = {}
        self.messages = 0
        #: The reader's last client error (broker down, credentials refused), until a
        #: record arrives after it.
        self.error: Optional[str] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def apply(self, key: bytes, value: Optional[bytes]) -> None:
        wid = key.decode()
        with self._lock:
            if value is None:
                self.latest.pop(wid, None)
                self.history.pop(wid, None)
                return
            figures = orjson.loads(value)
            at = figures.get("at", 0.0)
            if at >= self.latest.get(wid, {}).get("at", 0.0):
                self.latest[wid] = figures
            series = self.history.setdefault(wid, deque())
            series.append((at, history_point(figures)))
            while series and series[0][0] < time.time() - HISTORY_S:
                series.popleft()
            self.messages += 1
            self.error = None

    def cluster(self, now: Optional[float] = None) -> dict:
        now = time.time() if now is None else now
        with self._lock:
            latest = {w: f for w, f in self.latest.items() if now - f.get("at", 0.0) <= HISTORY_S}
        return merge_cluster(latest, now)

    def series(self, since: float = 0.0) -> list:
        with self._lock:
            history = {w: list(s) for w, s in self.history.items()}
        return merge_history(history, since=since)

    def on_error(self, err) -> None:
        """librdkafka's error callback: kept to show beside the figures, which stop
        arriving (the workers then show as down)."""
        self.error = f"{err.name()}: {err.str()}"

    def check(self, timeout: float = 10.0) -> None:
        """Raise RuntimeError, saying what to do, when the broker has no such topic."""
        from confluent_kafka.admin import AdminClient
        meta = AdminClient(client_config(self.bootstrap)).list_topics(timeout=timeout)
        if self.topic not in meta.topics or meta.topics[self.topic].error is not None:
            raise RuntimeError(f"the broker at {self.bootstrap} has no topic {self.topic!r}, "
                               f"where workers publish their figures: create the topics "
                               f"('streamrec topics create') and start a worker")

    def start(self) -> "ClusterView":
        self._thread = threading.Thread(target=self._run, name="cluster-view", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
        consumer = Consumer(client_config(self.bootstrap, {"group.id": "streamrec-cluster-view",
                             "enable.auto.commit": False, "fetch.wait.max.ms": 100,
                             "error_cb": self.on_error}))
        try:
            parts = consumer.list_topics(self.topic, timeout=10).topics[self.topic].partitions
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
            while not self._stop.is_set():
                for m in consumer.consume(200, timeout=0.5):
                    if m.error():
                        continue
                    try:
                        self.apply(m.key() or b"?", m.value())
                    except Exception as exc:  # a bad record must not stop the view
                        log.warning("cluster view skipped a bad record: %s", exc)
        except Exception:
            log.exception("cluster view stopped")
        finally:
            consumer.close()


def broker_group_lag(admin, groups=None) -> dict:
    """Lag per consumer group, topic and partition from the broker's committed and end
    offsets (``admin`` a confluent-kafka AdminClient); groups with no commits are left out."""
    from confluent_kafka import ConsumerGroupTopicPartitions
    from confluent_kafka.admin import OffsetSpec
    if groups is None:
        groups = sorted(g.group_id for g in admin.list_consumer_groups().result(timeout=10).valid)
    committed = {}
    for group in groups:
        fut = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group]
        committed[group] = [tp for tp in fut.result(timeout=10).topic_partitions if tp.offset >= 0]
    wanted = {(tp.topic, tp.partition) for tps in committed.values() for tp in tps}
    if not wanted:
        return {}
    from confluent_kafka import TopicPartition
    ends = {(tp.topic, tp.partition): fut.result(timeout=10).offset for tp, fut in admin.list_offsets(
        {TopicPartition(t, p): OffsetSpec.latest() for t, p in wanted}).items()}
    out: dict = {}
    for group, tps in committed.items():
        for tp in tps:
            out.setdefault(group, {}).setdefault(tp.topic, {})[str(tp.partition)] = max(
                0, ends[(tp.topic, tp.partition)] - tp.offset)
    return out


# --------------------------------------------------------------------------- the worker's glue
# Nothing here touches the Faust app until streams.web calls install(app, view), so the
# module (its merging and ClusterView) is importable without one: `streamrec dashboard`
# (streams/dashboard_server.py) merges the same figures with no worker.

import faust  # noqa: E402  (the library only: no app is made by importing it)

from streams.settings import settings  # noqa: E402

WORKER_ID = f"{socket.gethostname()}:{settings.web_port}"
cluster_view = ClusterView(settings.bootstrap, STATS)
_local_history: deque = deque()
_group_lag: dict = {"lag": {}, "at": None}
#: The worker's Faust app and shared item view, once installed.
_worker: dict = {}


class FlowSensor(faust.Sensor):
    """Counts what only the sent messages say: dead-letter reasons and what each
    reply's funnel did (candidates per stage, which sources the served items came from)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dead_letter_reasons: Counter = Counter()
        self.stage_sums: Counter = Counter()
        self.sources: Counter = Counter()
        self.replies = 0

    def on_send_initiated(self, producer, topic, message, keysize, valsize):
        if topic not in (EVENTS_DLQ, REPLIES):
            return None
        try:
            value = orjson.loads(message.value)
            if topic == EVENTS_DLQ:
                self.dead_letter_reasons[reason_kind(str(value.get("reason")))] += 1
            elif not value.get("error"):
                self.replies += 1
                self.stage_sums.update(value.get("stage_counts") or {})
                for item in value.get("items") or []:
                    self.sources.update((item.get("sources") or [])[:1])
        except Exception:  # counting must never break a send
            pass
        return None


flow = FlowSensor()


def consumer_lag() -> dict:
    """Messages behind per topic and partition this worker consumes (end - read)."""
    monitor = _worker["app"].monitor
    lag: dict = {}
    for tp, end in dict(monitor.tp_end_offsets or {}).items():
        read = (monitor.tp_read_offsets or {}).get(tp)
        if read is not None:
            lag.setdefault(tp.topic, {})[tp.partition] = max(0, end - read - 1)
    return lag


def assigned_partitions() -> dict:
    out: dict = {}
    try:
        for tp in _worker["app"].consumer.assignment():
            out.setdefault(tp.topic, []).append(tp.partition)
    except Exception:  # not assigned yet, or the consumer is not running
        return {}
    return {t: sorted(p) for t, p in sorted(out.items())}


def model_figures() -> dict:
    view = _worker["view"]
    live = f"{view.scorer.model}:{view.scorer.version}" if view.scorer else None
    records = sorted(view.registry.values(), key=lambda r: version_order(
        f"{r.get('model')}:{r.get('version')}"))
    keep = [r for r in records if r.get("state") == "live"] + records[-RECENT_VERSIONS:]
    seen, registry = set(), []
    for r in keep:
        key = f"{r.get('model')}:{r.get('version')}"
        if key not in seen:
            seen.add(key)
            registry.append({"model": r.get("model"), "version": r.get("version"),
                             "tier": r.get("tier"), "state": r.get("state"),
                             "reason": (r.get("decision") or {}).get("reason")})
    return {"live": live, "registry": registry, "versions_total": len(records)}


def funnel_figures() -> dict:
    view = _worker["view"]
    config = view.funnel_config("explore")
    try:
        trending = [{"item": h[0], "score": round(h[1], 3)}
                    for h in view.trending("explore", 10, time.time())]
    except Exception:
        trending = []
    return {"replies": flow.replies, "stage_sums": dict(flow.stage_sums),
            "sources": dict(flow.sources),
            "config": {"surface": "explore",
                       "weights": {n: s.weight for n, s in config.sources.items()}},
            "trending": trending}


def local_figures(now: Optional[float] = None) -> dict:
    """This worker's figures, as published to ``cluster.stats`` and served on /metrics."""
    from streams.stability import latest as stability_latest
    now = time.time() if now is None else now
    monitor = _worker["app"].monitor
    counts = dict(metrics.counters)
    msgs_in = dict(monitor.messages_received_by_topic)
    msgs_out = dict(monitor.messages_sent_by_topic)
    _local_history.append((now, {**counts, **{f"in:{t}": n for t, n in msgs_in.items()},
                                 **{f"out:{t}": n for t, n in msgs_out.items()}}))
    while _local_history and _local_history[0][0] < now - 2 * RATE_WINDOW_S:
        _local_history.popleft()
    hist = list(_local_history)
    recent = metrics.recent_latencies(now)
    models = model_figures()
    report = stability_latest.get("report") or {}
    return clean({
        "worker": WORKER_ID, "at": now, "uptime_s": round(now - metrics.started_at, 1),
        "web": {"host": socket.gethostname(), "port": settings.web_port},
        "partitions": assigned_partitions(),
        "counters": counts, "messages_in": msgs_in, "messages_out": msgs_out,
        "rates": {**{name: rate(hist, c) for name, c in RATE_COUNTERS.items()},
                  "messages_in": {t: rate(hist, f"in:{t}") for t in msgs_in},
                  "messages_out": {t: rate(hist, f"out:{t}") for t in msgs_out}},
        "latency_hist": metrics.histogram(recent),
        "latency_ms": {"n": len(recent), **{f"p{q}": metrics.percentile(recent, q) if recent
                                            else None for q in (50, 95, 99)}},
        "lag": consumer_lag(), "group_lag": _group_lag["lag"], "group_lag_at": _group_lag["at"],
        "dead_letter_reasons": dict(flow.dead_letter_reasons),
        "models": models,
        "stability": {"at": stability_latest.get("at"),
                      "report": recent_versions(report, models["live"]),
                      "versions_total": len(report),
                      "alerts": stability_latest.get("alerts") or []},
        "funnel": funnel_figures(),
    })


def install(app, view) -> None:
    """Make ``app`` (the worker's Faust app, ``view`` its shared item view) count what it
    sends, tail every worker's figures and publish its own every ``STATS_INTERVAL_S``."""
    if _worker:
        return
    _worker.update(app=app, view=view)
    app.sensors.add(flow)
    stats_topic = app.topic(STATS)

    @app.task
    async def start_cluster_view() -> None:
        cluster_view.start()

    @app.timer(STATS_INTERVAL_S, name="publish_figures")
    async def publish_figures() -> None:
        try:
            value = orjson.dumps(local_figures(), option=orjson.OPT_NON_STR_KEYS)
        except Exception:  # an exception in a timer would stop the worker: figures are not worth it
            log.exception("could not build this worker's figures")
            return
        await stats_topic.send(key=WORKER_ID.encode(), value=value, partition=0)

    @app.timer(5.0, name="poll_group_lag")
    async def poll_group_lag() -> None:
        import asyncio
        from confluent_kafka.admin import AdminClient
        if "admin" not in _group_lag:
            _group_lag["admin"] = AdminClient(client_config(settings.bootstrap))
        try:
            lag = await asyncio.get_running_loop().run_in_executor(
                None, broker_group_lag, _group_lag["admin"])
            _group_lag.update(lag=lag, at=time.time())
        except Exception as exc:
            log.warning("could not read consumer group offsets: %s", exc)

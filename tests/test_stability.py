"""Stability at scale (models/stability.py, streams/stability.py): calibration and NE per
version, head and window, each window judged on its own sample, alerts that open once
per breach and clear with a time, and memory that stays bounded as versions come and go."""
from __future__ import annotations

import asyncio
import math
import random

import orjson
import pytest

from bench.stability import traced_size
from models.metrics import calibration, normalized_entropy
from models.stability import SLO, AlertBook, StabilityMonitor, Window, window_violations

HEADS = ("click", "like")


def feed(monitor, model, start, end, scale=1.0, every=2.0, per_tick=10, seed=0):
    """Examples from ``start`` to ``end`` (seconds), ``per_tick`` every ``every`` seconds,
    from a model that knows something: 28% of examples are clicked with probability 0.3,
    the rest with 0.02 (a 10% click rate); it predicts ``scale`` times the truth (1:
    calibrated, NE 0.75; 2: calibration 2, NE 0.93; 3: calibration 3, NE 1.69)."""
    rng = random.Random(seed)
    t = start
    while t < end:
        for _ in range(per_tick):
            q = 0.3 if rng.random() < 0.28 else 0.02
            label = 1 if rng.random() < q else 0
            monitor.update(model, {"click": label}, {"click": min(q * scale, 0.99)}, now=t)
        t += every


def judge(monitor, now, slo=SLO()):
    return window_violations(monitor.reports(now), lambda model: slo)


def report(book, monitor, now):
    """One report's violations into the alert book."""
    alerts, unjudged = judge(monitor, now)
    return book.update(alerts, now, unjudged)


# -- figures and windows ------------------------------------------------------------------

def test_figures_equal_the_batch_metrics_on_the_same_examples():
    rng = random.Random(7)
    m = StabilityMonitor(HEADS)
    labels, probs = [], []
    for i in range(2000):
        y, p = int(rng.random() < 0.2), rng.uniform(0.01, 0.6)
        labels.append(y)
        probs.append(p)
        # "like" is missing from every other example's labels: it must not count there.
        m.update("r:v1", {"click": y, **({"like": y} if i % 2 else {})},
                 {"click": p, "like": p}, now=100.0 + i * 0.1)
    got = m.reports(now=300.0)
    for window in ("5m", "1h"):
        click = got[window]["r:v1"]["click"]
        assert click["n"] == 2000
        assert click["calibration"] == pytest.approx(calibration(labels, probs), abs=1e-4)
        assert click["ne"] == pytest.approx(normalized_entropy(labels, probs), abs=1e-4)
        assert click["rate"] == pytest.approx(sum(labels) / 2000, abs=1e-4)
    assert got["5m"]["r:v1"]["like"]["n"] == 1000


def test_examples_leave_each_window_when_it_has_passed():
    m = StabilityMonitor(("click",))
    feed(m, "r:v1", 0.0, 60.0)
    assert [m.reports(now=60.0)[w]["r:v1"]["click"]["n"] for w in ("5m", "1h")] == [300, 300]
    # The 30 s slices of the first minute have all left the 5 minute window by 6 minutes.
    later = m.reports(now=360.0)
    assert later["5m"]["r:v1"]["click"]["n"] == 0
    assert later["5m"]["r:v1"]["click"]["calibration"] is None
    assert later["1h"]["r:v1"]["click"]["n"] == 300
    # And the hour's 5 minute slices by an hour and 5 minutes.
    assert m.reports(now=3900.0)["1h"]["r:v1"]["click"]["n"] == 0


def test_windows_must_share_a_slice_width():
    with pytest.raises(ValueError, match="whole multiple"):
        StabilityMonitor(HEADS, (Window("a", 300.0, 10), Window("b", 3600.0, 7)))
    with pytest.raises(ValueError):
        StabilityMonitor(HEADS, ())


# -- judging: two windows, each on its own sample -----------------------------------------

def test_each_window_is_judged_separately():
    # Twice too high for 50 minutes, then calibrated: the hour still breaks its SLO, the
    # last 5 minutes do not.
    recovered = StabilityMonitor(("click",))
    feed(recovered, "r:v1", 0.0, 3000.0, scale=2.0)
    feed(recovered, "r:v1", 3000.0, 3600.0, seed=1)
    alerts, _ = judge(recovered, 3599.0)
    assert {(a["window"], a["metric"]) for a in alerts} == {("1h", "calibration")}
    by_window = recovered.reports(now=3599.0)
    assert by_window["5m"]["r:v1"]["click"]["calibration"] == pytest.approx(1.0, abs=0.1)
    assert by_window["1h"]["r:v1"]["click"]["calibration"] == pytest.approx(1.83, abs=0.1)

    # Calibrated for 55 minutes, then three times too high: only the 5 minutes see it yet.
    broken = StabilityMonitor(("click",))
    feed(broken, "r:v1", 0.0, 3300.0)
    feed(broken, "r:v1", 3300.0, 3600.0, scale=3.0, seed=1)
    alerts, _ = judge(broken, 3599.0)
    assert {(a["window"], a["metric"]) for a in alerts} == {("5m", "calibration"),
                                                            ("5m", "normalized_entropy")}
    values = {a["metric"]: a["value"] for a in alerts}
    assert values["calibration"] == pytest.approx(3.0, abs=0.3)
    assert values["normalized_entropy"] == pytest.approx(1.69, abs=0.2)
    assert broken.reports(now=3599.0)["1h"]["r:v1"]["click"]["calibration"] == pytest.approx(
        1.17, abs=0.1)


def test_no_window_is_judged_before_its_minimum_sample():
    slo = SLO(min_examples=50, min_positives=5)
    m = StabilityMonitor(("click",))
    # 40 labels, all wildly off: too few to judge, in either window.
    for i in range(40):
        m.update("r:v1", {"click": i % 4 == 0}, {"click": 0.9}, now=float(i))
    alerts, unjudged = judge(m, 40.0, slo)
    assert alerts == []
    assert unjudged == {("r:v1", "click", "5m"), ("r:v1", "click", "1h")}
    # Enough labels but too few positives (3 of 200): still not judged.
    few = StabilityMonitor(("click",))
    for i in range(200):
        few.update("r:v1", {"click": int(i < 3)}, {"click": 0.9}, now=float(i))
    assert judge(few, 200.0, slo) == ([], {("r:v1", "click", "5m"), ("r:v1", "click", "1h")})
    # Ten more to the first and it is judged, in both windows.
    for i in range(40, 60):
        m.update("r:v1", {"click": i % 4 == 0}, {"click": 0.9}, now=float(i))
    alerts, unjudged = judge(m, 60.0, slo)
    assert {(a["window"], a["metric"], a["n"]) for a in alerts} >= {
        ("5m", "calibration", 60), ("1h", "calibration", 60)}
    assert unjudged == set()


# -- alerts: one per breach, opened and cleared -------------------------------------------

def test_a_persisting_breach_is_one_alert_cleared_with_a_time():
    m, book = StabilityMonitor(("click",)), AlertBook()
    opened, cleared, open_counts = [], [], []
    # Reports every 10 s over 30 minutes; three times too high for the first 10.
    for now in range(10, 1800, 10):
        feed(m, "r:v1", now - 10.0, float(now), 3.0 if now <= 600 else 1.0, seed=now)
        change = report(book, m, float(now))
        opened += change["opened"]
        cleared += [{**a, "known_at": float(now)} for a in change["cleared"]]
        open_counts.append(len(change["open"]))
    # One alert per window and metric, however many reports saw the breach.
    assert sorted((a["window"], a["metric"]) for a in opened) == [
        ("1h", "calibration"), ("1h", "normalized_entropy"),
        ("5m", "calibration"), ("5m", "normalized_entropy")]
    # Opened by the first report with the minimum sample: 50 labels and 5 positives.
    assert {a["opened_at"] for a in opened} <= {20.0, 30.0, 40.0, 50.0, 60.0}
    assert max(open_counts) == 4
    # The short window forgets the bad minutes about 5 minutes after they end; its alerts
    # clear then, once each, with the time of that report and how many reports had them.
    short = [a for a in cleared if a["window"] == "5m"]
    assert sorted(a["metric"] for a in short) == ["calibration", "normalized_entropy"]
    for a in short:
        assert 600.0 + 120.0 <= a["cleared_at"] <= 600.0 + 330.0
        # Known at the third report in a row without it.
        assert a["known_at"] == a["cleared_at"] + 20.0
        assert a["opened_at"] <= 60.0 and a["reports"] > 50
        assert a["seen_at"] == a["cleared_at"] - 10.0
    # The hour still holds the bad minutes: its calibration alert stays open.
    assert ("1h", "calibration") in {(a["window"], a["metric"]) for a in book.open()}
    assert all(a["window"] == "1h" for a in book.open())

    # A new breach later is a new alert, with its own opening time.
    feed(m, "r:v1", 1800.0, 1900.0, scale=3.0, seed=99, per_tick=40)
    change = report(book, m, 1900.0)
    new = {(a["window"], a["metric"]): a["opened_at"] for a in change["opened"]}
    assert new[("5m", "calibration")] == 1900.0 and set(new.values()) == {1900.0}
    # The hour's calibration alert never cleared, so it is not opened again.
    assert ("1h", "calibration") not in new


def test_alert_book_keeps_an_unjudged_alert_open_and_clears_a_gone_version():
    book = AlertBook(clear_after=1, keep_cleared=3)
    bad = {"model": "r:v1", "head": "click", "metric": "calibration", "window": "5m",
           "value": 3.0, "n": 400}
    assert [a["opened_at"] for a in book.update([bad], now=10.0)["opened"]] == [10.0]
    again = book.update([{**bad, "value": 3.2, "n": 500}], now=20.0)
    assert again["opened"] == [] and again["cleared"] == []
    assert again["open"] == [{**bad, "value": 3.2, "n": 500, "opened_at": 10.0,
                              "seen_at": 20.0, "reports": 2}]
    # Traffic stops: the window has too few labels to judge; not judged is not recovered.
    quiet = book.update([], now=30.0, unjudged={("r:v1", "click", "5m")})
    assert quiet["cleared"] == [] and len(quiet["open"]) == 1
    # Another window's thin sample does not hold this one.
    ended = book.update([], now=40.0, unjudged={("r:v1", "click", "1h")})
    assert [(a["opened_at"], a["cleared_at"], a["seen_at"]) for a in ended["cleared"]] == [
        (10.0, 40.0, 20.0)]
    assert book.open() == [] and len(book) == 0
    # Only the latest cleared alerts are kept.
    for t in range(5):
        book.update([{**bad, "model": f"r:v{t + 2}"}], now=100.0 + t)
        book.update([], now=100.5 + t)
    assert [a["model"] for a in book.cleared] == ["r:v4", "r:v5", "r:v6"]


def test_a_breach_that_flickers_is_one_alert_cleared_when_it_ended():
    book = AlertBook(clear_after=3)
    bad = {"model": "r:v1", "head": "click", "metric": "calibration", "window": "5m",
           "value": 1.3}
    # In and out of bounds report after report: one alert.
    pattern = [bad, None, bad, None, None, bad, None, None, None]
    changes = [book.update([v] if v else [], now=10.0 * (i + 1)) for i, v in enumerate(pattern)]
    assert [len(c["opened"]) for c in changes] == [1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert [len(c["cleared"]) for c in changes] == [0, 0, 0, 0, 0, 0, 0, 0, 1]
    ended = changes[-1]["cleared"][0]
    # It ended with the first of the three clean reports, and is known to have at the third.
    assert (ended["opened_at"], ended["seen_at"], ended["cleared_at"], ended["reports"]) == (
        10.0, 60.0, 70.0, 3)
    with pytest.raises(ValueError):
        AlertBook(clear_after=0)


# -- memory ------------------------------------------------------------------------------

def test_memory_is_bounded_for_retired_versions_and_busy_ones():
    from streams.stability import watch_filter
    m, book = StabilityMonitor(HEADS), AlertBook()
    records, sizes = [], {}
    for n in range(1, 301):
        # A version a minute: each new one goes live and retires the one before; each is
        # three times too high, so each opens alerts.
        for r in records:
            if r["state"] == "live":
                r["state"] = "retired"
        records.append({"model": "r", "version": f"v{n}", "state": "live", "created": n})
        now = 60.0 * n
        feed(m, f"r:v{n}", now - 60.0, now, scale=3.0, seed=n)
        m.retain(watch_filter(records))
        report(book, m, now)
        if n in (3, 300):
            sizes[n] = traced_size(m)
    assert len(m) == 1 and "r:v300" in m
    assert len(book) <= 2 * 2 * book.clear_after
    # The retired versions' alerts clear (after the book's clean reports): only the live
    # one's stay open.
    for k in range(1, book.clear_after + 1):
        report(book, m, 60.0 * 300 + k)
    assert {a["model"] for a in book.open()} == {"r:v300"}
    assert sizes[300] <= sizes[3] * 1.1

    # A version's memory does not grow with its examples.
    quiet, busy = StabilityMonitor(HEADS), StabilityMonitor(HEADS)
    feed(quiet, "r:v1", 0.0, 3600.0, every=60.0, per_tick=1)
    feed(busy, "r:v1", 0.0, 3600.0, every=0.5, per_tick=10)
    assert busy.reports(now=3599.0)["1h"]["r:v1"]["click"]["n"] == 72000
    assert quiet.reports(now=3599.0)["1h"]["r:v1"]["click"]["n"] == 60
    assert traced_size(busy) <= traced_size(quiet) * 1.1


# -- the glue: what the worker publishes ---------------------------------------------------

class FakeTopic:
    def __init__(self):
        self.sent = []

    async def send(self, key, value, partition):
        self.sent.append((key.decode(), orjson.loads(value)))


def test_publish_sends_an_alert_when_it_opens_and_when_it_clears(monkeypatch):
    from streams import stability
    monkeypatch.setattr(stability, "monitor", StabilityMonitor(HEADS))
    monkeypatch.setattr(stability, "book", AlertBook())
    monkeypatch.setattr(stability, "stability_topic", FakeTopic())
    monkeypatch.setattr(stability, "alerts_topic", FakeTopic())
    monkeypatch.setattr(stability, "AUTO_ROLLBACK", False)
    monkeypatch.setattr(stability, "latest", dict(stability.latest))
    records = [{"model": "r", "version": "v1", "state": "live", "tier": "TIER2", "created": 1}]
    for now in range(10, 910, 10):
        feed(stability.monitor, "r:v1", now - 10.0, float(now), 3.0 if now <= 300 else 1.0,
             seed=now)
        asyncio.run(stability.publish(records, float(now)))
    alerts = [(k, v) for k, v in stability.alerts_topic.sent if v["metric"] == "calibration"]
    short = [(state, v["opened_at"], v.get("cleared_at")) for k, v in alerts
             if v["window"] == "5m" for state in [v["state"]]]
    # 90 reports, one breach of the short window: one message when it opened, one when it
    # cleared, both naming when it opened.
    assert len(short) == 2 and short[0][0] == "open" and short[1][0] == "cleared"
    opened_at = short[0][1]
    # Opened as soon as the breach stood 3 standard errors beyond the band.
    assert opened_at <= 60.0 and short[1][1] == opened_at
    assert 300.0 + 120.0 <= short[1][2] <= 300.0 + 330.0
    assert all(k == "r:v1/click/calibration" for k, _ in alerts)
    assert all(v["tier"] == "TIER2" for _, v in alerts)
    # The hour's alert is still open, in what /stats/ and cluster.stats show.
    assert [(a["window"], a["opened_at"]) for a in stability.latest["alerts"]
            if a["metric"] == "calibration"] == [("1h", opened_at)]
    assert [a["window"] for a in stability.latest["cleared"]
            if a["metric"] == "calibration"] == ["5m"]
    # Figures per window, on the stability topic and in ``latest``; the short window's
    # stay where readers found them before.
    key, last = stability.stability_topic.sent[-1]
    assert key == "r:v1" and set(last["windows"]) == {"5m", "1h"}
    assert last["heads"] == last["windows"]["5m"] == stability.latest["report"]["r:v1"]
    assert last["windows"]["1h"]["click"]["n"] > last["heads"]["click"]["n"]
    assert not math.isnan(last["heads"]["click"]["calibration"])


def test_chance_alone_does_not_open_alerts_on_a_calibrated_model():
    from models.registry import slo_for
    tier0 = slo_for("TIER0")  # calibration 0.89-1.12, NE 0.95
    m = StabilityMonitor(("click",))
    books = {z: AlertBook() for z in (0.0, 3.0)}
    opened = {z: 0 for z in books}
    for now in range(10, 3610, 10):
        # One labelled example a second, calibrated: 30 positives in 5 minutes.
        feed(m, "r:v1", now - 10.0, float(now), every=2.0, per_tick=2, seed=now)
        reports = m.reports(float(now))
        for z, book in books.items():
            alerts, unjudged = window_violations(reports, lambda key: tier0, z=z)
            opened[z] += len(book.update(alerts, float(now), unjudged)["opened"])
    # On the minimum sample alone, chance takes the 5-minute calibration out of TIER0's
    # band again and again; 3 standard errors beyond the bound, never.
    assert opened[0.0] >= 10, opened
    assert opened[3.0] == 0, opened

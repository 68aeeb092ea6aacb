"""The cluster dashboard in headless Chromium against two workers.

Chromium runs its own ``--headless --dump-dom`` (the page after its scripts ran)
and ``--screenshot``; no driver is needed.  Screenshots are kept in
``var/browser-screenshots/`` (git-ignored) as the run's artefacts.  Without a
Chromium on PATH (Debian: ``apt-get install chromium``) every test here skips.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import orjson
import pytest

from streams.client import RecommendationClient
from streams.producer import EventProducer

from .conftest import WEB_PORT, new_event

pytestmark = pytest.mark.integration
CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                       "google-chrome")) if p), None)
SCREENSHOTS = Path(__file__).resolve().parents[2] / "var" / "browser-screenshots"
SECOND_WEB_PORT = int(os.environ.get("STREAMREC_TEST_WEB_PORT_2", str(WEB_PORT + 1)))
SUMMED = ("events_ingested", "events_applied", "requests_served", "dead_letters")

if CHROMIUM is None:
    pytest.skip("needs headless Chromium on PATH (Debian: apt-get install chromium); none found",
                allow_module_level=True)


def chromium(*args: str, timeout: float = 60.0) -> str:
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                          "--disable-dev-shm-usage", *args], capture_output=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"chromium failed ({out.returncode}): {out.stderr.decode()[-2000:]}")
    return out.stdout.decode()


def dump_dom(url: str, budget_ms: int = 3000) -> str:
    """The page's DOM after ``budget_ms`` of (virtual) time: its first poll has rendered."""
    return chromium(f"--virtual-time-budget={budget_ms}", "--dump-dom", url)


def screenshot(url: str, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    chromium("--virtual-time-budget=4000", "--window-size=1400,1700", "--hide-scrollbars",
             f"--screenshot={path}", url)
    return path


class Rows(HTMLParser):
    """Rows of the dashboard's tables, by their data- attributes."""

    def __init__(self, html: str):
        super().__init__()
        self.attrs: dict = {}
        self.workers: dict[str, str] = {}
        self.counters: dict[str, int] = {}
        self._counter = None
        self._cells: list = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-worker" in a:
            self.workers[a["data-worker"]] = a["data-up"]
        if tag == "tr" and "data-counter" in a:
            self._counter, self._cells = a["data-counter"], []
        if "id" in a:
            self.attrs[a["id"]] = a

    def handle_data(self, data):
        if self._counter is not None and data.strip():
            self._cells.append(data.strip())

    def handle_endtag(self, tag):
        if tag == "tr" and self._counter is not None:
            self.counters[self._counter] = int(self._cells[-1])
            self._counter = None


def stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats/", timeout=10) as r:
        return orjson.loads(r.read())


def summed_counters(ports) -> dict:
    out: dict = {}
    for port in ports:
        for k, v in stats(port)["counters"].items():
            out[k] = out.get(k, 0) + v
    return out


@pytest.fixture(scope="module")
def two_workers(kafka, worker, tmp_path_factory):
    from streams.local import WorkerProcess
    second = WorkerProcess(kafka, tmp_path_factory.mktemp("worker2"), web_port=SECOND_WEB_PORT,
                           env={"STREAMREC_ONLINE_TRAINING": "0"}).start()
    ids = {stats(worker.web_port)["worker"], stats(second.web_port)["worker"]}
    deadline = time.time() + 60
    while time.time() < deadline:  # both publish, and both have their partitions
        cluster = orjson.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{worker.web_port}/cluster/", timeout=10).read())
        up = {w["id"] for w in cluster["workers"] if w["up"] and w["partitions"].get("events")}
        if ids <= up:
            break
        time.sleep(1)
    else:
        raise TimeoutError(f"both workers never showed up with partitions: {cluster['workers']}")
    yield worker, second
    second.stop()
    # A killed member keeps its partitions until its session expires: the tests after
    # these need the first worker to own every partition again.
    from streams.settings import settings
    first_id, deadline = stats(worker.web_port)["worker"], time.time() + 120
    while time.time() < deadline:
        cluster = orjson.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{worker.web_port}/cluster/", timeout=10).read())
        mine = next(w for w in cluster["workers"] if w["id"] == first_id)
        if mine["up"] and len(mine["partitions"].get("events", [])) == settings.partitions:
            break
        time.sleep(1)


def quiet(ports, timeout: float = 40.0) -> dict:
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        now = summed_counters(ports)
        if now == last:
            return now
        last = now
        time.sleep(1.5)
    raise TimeoutError("counters kept moving")


def test_pages_load_and_show_both_workers(two_workers):
    first, second = two_workers
    url = f"http://127.0.0.1:{first.web_port}/dashboard/"
    page = Rows(dump_dom(url + "#overview"))
    assert page.attrs["page-overview"]["class"] == "page on"
    assert sorted(page.workers.values()) == ["true", "true"], page.workers
    assert {stats(first.web_port)["worker"], stats(second.web_port)["worker"]} <= set(page.workers)
    for name in ("overview", "models", "funnel"):
        assert screenshot(f"{url}#{name}", f"two-workers-{name}").stat().st_size > 10_000


def test_figures_match_the_workers_counters(kafka, two_workers):
    first, second = two_workers
    ports = (first.web_port, second.web_port)
    before = summed_counters(ports)
    users = [f"browser-u{i}" for i in range(12)]
    with EventProducer(kafka) as p:
        for n, user in enumerate(users):
            for i in range(3):
                p.send(new_event(user, f"browser-i{(n + i) % 7}", "like", author=f"a{i}"))
        p.send_raw(b"browser-u0", b"{not json")
    with RecommendationClient(kafka) as client:
        for user in users:
            client.recommend(user, "explore", k=5, timeout=5.0)
    counters = quiet(ports)
    assert counters["events_applied"] >= before.get("events_applied", 0) + 36
    assert counters["requests_served"] >= before.get("requests_served", 0) + len(users)
    served = [stats(port)["counters"].get("requests_served", 0) for port in ports]
    assert all(served), f"each worker should have answered some requests: {served}"
    time.sleep(3)  # a publication after the counters settled
    page = Rows(dump_dom(f"http://127.0.0.1:{second.web_port}/dashboard/#overview"))
    for counter in SUMMED:
        assert page.counters.get(counter, 0) == counters.get(counter, 0), counter
    screenshot(f"http://127.0.0.1:{second.web_port}/dashboard/#overview", "figures-overview")


def test_the_inspector_answers(kafka, two_workers):
    first, _ = two_workers
    user = "browser-u3"
    html = dump_dom(f"http://127.0.0.1:{first.web_port}/dashboard/#funnel?user={user}", 6000)
    page = Rows(html)
    answer = page.attrs.get("inspect_answer")
    assert answer is not None, re.findall(r'id="inspect_status".{0,300}', html)
    assert answer["data-user"] == user and int(answer["data-items"]) > 0
    assert html.count("<tr>") > int(answer["data-items"])  # one row per item
    screenshot(f"http://127.0.0.1:{first.web_port}/dashboard/#funnel?user={user}", "inspector")


def test_a_killed_worker_shows_down_within_10_s(two_workers):
    first, second = two_workers
    wid = stats(second.web_port)["worker"]
    os.killpg(second.proc.pid, signal.SIGKILL)
    killed = time.time()
    second.proc.wait(10)
    shown = None
    while time.time() - killed < 20:
        page = Rows(dump_dom(f"http://127.0.0.1:{first.web_port}/dashboard/#overview", 1000))
        if page.workers.get(wid) == "false":
            shown = time.time() - killed
            break
    assert shown is not None, "the killed worker never showed as down"
    screenshot(f"http://127.0.0.1:{first.web_port}/dashboard/#overview", "worker-down")
    print(f"killed worker shown down after at most {shown:.1f} s")
    assert shown <= 10.0


def test_the_dashboard_command_serves_the_page_with_the_cluster(kafka, worker, tmp_path):
    """One page load against `streamrec dashboard`, a server of its own (no worker in it)."""
    from .test_dashboard_server import DASHBOARD_PORT, Dashboard
    dash = Dashboard(tmp_path / "dashboard.log", "--port", str(DASHBOARD_PORT),
                     "--bootstrap", kafka)
    try:
        dash.wait_listening(DASHBOARD_PORT)
        wid = stats(worker.web_port)["worker"]
        url = f"http://127.0.0.1:{DASHBOARD_PORT}/dashboard/#overview"
        deadline, page, html = time.time() + 20, None, ""
        while time.time() < deadline:
            html = dump_dom(url)
            page = Rows(html)
            if page.workers.get(wid) == "true":
                break
        assert page.workers.get(wid) == "true", page.workers
        assert "Served by streamrec dashboard" in html
        assert screenshot(url, "dashboard-command-overview").stat().st_size > 10_000
    finally:
        dash.stop()

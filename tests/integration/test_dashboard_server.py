"""`streamrec dashboard` against a real broker and a running worker: the server of its
own shows the worker's published figures, with the same merging as the worker's page."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from streams.client import RecommendationClient
from streams.producer import EventProducer

from .conftest import WEB_PORT, new_event

pytestmark = pytest.mark.integration
DASHBOARD_PORT = int(os.environ.get("STREAMREC_TEST_DASHBOARD_PORT", str(WEB_PORT + 10)))
ROOT = Path(__file__).resolve().parents[2]


def get(port: int, path: str, headers=None) -> bytes:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.read()


class Dashboard:
    """`python -m streams.cli dashboard` as a subprocess, stopped with SIGTERM."""

    def __init__(self, log: Path, *args: str):
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "dashboard", *args], cwd=ROOT,
                stdout=out, stderr=subprocess.STDOUT)

    def wait_listening(self, port: int, timeout: float = 30.0, headers=None) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamrec dashboard exited {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                get(port, "/cluster/", headers)
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        raise TimeoutError("streamrec dashboard never answered")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def cluster_when(port: int, ready, timeout: float = 30.0, headers=None) -> dict:
    deadline, cluster = time.time() + timeout, None
    while time.time() < deadline:
        cluster = orjson.loads(get(port, "/cluster/", headers))
        if ready(cluster):
            return cluster
        time.sleep(1.0)
    raise TimeoutError(f"the dashboard's /cluster/ never got there: {cluster}")


def test_the_dashboard_command_shows_the_running_workers_cluster(kafka, worker, tmp_path):
    wid = worker.stats()["worker"]
    before = worker.counter("events_applied")
    with EventProducer(kafka) as p:
        for i in range(4):
            p.send(new_event("dash-user", f"dash-{i}", "like"))
    worker.wait_for("events_applied", before + 4, timeout=30)
    with RecommendationClient(kafka) as client:
        assert client.recommend("dash-user", "explore", k=5, timeout=5.0).error is None

    dash = Dashboard(tmp_path / "dashboard.log", "--port", str(DASHBOARD_PORT),
                     "--bootstrap", kafka)
    try:
        dash.wait_listening(DASHBOARD_PORT)
        # The worker's figures after the request: what the worker's own /cluster/ says.
        served = worker.counter("requests_served")
        cluster = cluster_when(DASHBOARD_PORT, lambda c: any(
            w["id"] == wid and w["up"] for w in c["workers"])
            and c["counters"].get("requests_served", 0) >= served)
        assert cluster["server"] == "dashboard"
        assert cluster["served_by"].startswith("streamrec dashboard on ")
        mine = next(w for w in cluster["workers"] if w["id"] == wid)
        assert mine["partitions"].get("events"), mine
        assert cluster["counters"]["events_applied"] >= before + 4
        assert cluster["history"], "no history rows: the topic's last hour was not read"
        assert "streamrec" in cluster["group_lag"]
        # The same merge as the worker's page, a publication or two apart.
        on_worker = orjson.loads(get(worker.web_port, "/cluster/"))
        assert {w["id"] for w in on_worker["workers"]} == {w["id"] for w in cluster["workers"]}
        html = get(DASHBOARD_PORT, "/dashboard/").decode()
        assert html == get(worker.web_port, "/dashboard/").decode()
        # The inspector answers through the dashboard too.
        reply = orjson.loads(get(DASHBOARD_PORT, "/inspect/?user=dash-user&k=5"))
        assert reply["user_id"] == "dash-user" and reply["items"], reply
    finally:
        assert dash.stop() == 0, "streamrec dashboard did not stop cleanly on SIGTERM"


def test_the_dashboard_command_with_a_token(kafka, worker, tmp_path):
    dash = Dashboard(tmp_path / "dashboard.log", "--port", str(DASHBOARD_PORT),
                     "--bootstrap", kafka, "--token", "s3cret")
    try:
        dash.wait_listening(DASHBOARD_PORT, headers={"Authorization": "Bearer s3cret"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            get(DASHBOARD_PORT, "/cluster/")
        assert refused.value.code == 401
        wid = worker.stats()["worker"]
        cluster = cluster_when(DASHBOARD_PORT, lambda c: wid in {w["id"] for w in c["workers"]},
                               headers={"Authorization": "Bearer s3cret"})
        assert cluster["server"] == "dashboard"
        by_query = orjson.loads(get(DASHBOARD_PORT, "/cluster/?token=s3cret"))
        assert wid in {w["id"] for w in by_query["workers"]}
    finally:
        dash.stop()


def test_the_dashboard_command_without_a_broker_says_so():
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "streams.cli", "dashboard", "--port",
                          str(DASHBOARD_PORT), "--bootstrap", "127.0.0.1:1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "streamrec dashboard: no Kafka broker answers at 127.0.0.1:1" in out.stderr
    assert time.monotonic() - t0 < 20

"""streamrec dashboard without a broker: its pages over a ClusterView fed by hand, the
token, the inspector, the refusals, and that none of it needs the Faust app."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import types
from concurrent.futures import Future

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from streams import cluster_stats, dashboard_server
from streams.cluster_stats import ClusterView

NOW = 1_000.0


def fed_view(monkeypatch) -> ClusterView:
    """A ClusterView (never started: no consumer) holding two workers' figures, one down."""
    monkeypatch.setattr(cluster_stats.time, "time", lambda: NOW)
    view = ClusterView("unused:1")
    for at in (990.0, 992.0, 998.0):
        view.apply(b"host:6066", orjson.dumps({
            "worker": "host:6066", "at": at, "partitions": {"events": [0, 1]},
            "counters": {"requests_served": 5, "events_ingested": 40},
            "rates": {"requests": 2.0, "events": 10.0}}))
    view.apply(b"host:6067", orjson.dumps({"worker": "host:6067", "at": 980.0,
                                          "counters": {"requests_served": 3}}))
    return view


class FakeClient:
    def __init__(self):
        self.asked = []

    def submit(self, user, surface, k, timeout):
        self.asked.append((user, surface, k))
        future = Future()
        future.set_result(types.SimpleNamespace(to_dict=lambda: {
            "user_id": user, "items": [{"item_id": "7", "score": float("nan")}]}))
        return future

    def close(self):
        pass


def run(server, *requests):
    """Status and body (JSON when it is) of each ``(path, headers)`` against ``server``."""
    async def go():
        async with TestClient(TestServer(server)) as client:
            out = []
            for path, headers in requests:
                r = await client.get(path, headers=headers, allow_redirects=False)
                body = await r.read()
                try:
                    body = orjson.loads(body)
                except orjson.JSONDecodeError:
                    body = body.decode()
                out.append((r.status, body, r.headers.get("Location")))
            return out
    return asyncio.run(go())


def test_cluster_json_merges_every_workers_figures(monkeypatch):
    server = dashboard_server.make_app(fed_view(monkeypatch), "unused:1", served_by="dash")
    (status, body, _), (_, newer, _) = run(server, ("/cluster/", {}),
                                           ("/cluster/?since=990", {}))
    assert status == 200
    assert [(w["id"], w["up"]) for w in body["workers"]] == [("host:6066", True),
                                                             ("host:6067", False)]
    assert body["workers_up"] == 1 and body["rates"]["requests"] == 2.0
    assert body["counters"] == {"events_ingested": 40, "requests_served": 8}
    assert body["served_by"] == "dash" and body["server"] == "dashboard"
    assert [r["t"] for r in body["history"]] == [980.0, 990.0]
    assert [r["t"] for r in newer["history"]] == [990.0]


def test_the_page_is_the_workers_page(monkeypatch):
    server = dashboard_server.make_app(fed_view(monkeypatch), "unused:1")
    (root, _, location), (status, html, _) = run(server, ("/", {}), ("/dashboard/", {}))
    assert root == 302 and location == "/dashboard/"
    assert status == 200 and html == dashboard_server.DASHBOARD.read_text()
    assert 'api("/cluster/"' in html


@pytest.mark.parametrize("path, headers, status", [
    ("/cluster/", {}, 401),
    ("/dashboard/", {}, 401),
    ("/inspect/?user=1", {}, 401),
    ("/cluster/?token=guess", {}, 401),
    ("/cluster/?token=s3cret", {}, 200),
    ("/cluster/", {"Authorization": "Bearer s3cret"}, 200),
])
def test_the_token_guards_every_page(monkeypatch, path, headers, status):
    server = dashboard_server.make_app(fed_view(monkeypatch), "unused:1", token="s3cret")
    [(got, _, _)] = run(server, (path, headers))
    assert got == status


def test_the_root_keeps_the_token_on_its_way_to_the_page(monkeypatch):
    server = dashboard_server.make_app(fed_view(monkeypatch), "unused:1", token="s3cret")
    [(status, _, location)] = run(server, ("/?token=s3cret", {}))
    assert status == 302 and location == "/dashboard/?token=s3cret"


def test_the_inspector_asks_through_the_client(monkeypatch):
    fake = FakeClient()
    client = dashboard_server.OneClient("unused:1")
    client.client = fake
    server = dashboard_server.make_app(fed_view(monkeypatch), "unused:1", client=client)
    (missing, error, _), (status, reply, _) = run(
        server, ("/inspect/", {}), ("/inspect/?user=42&surface=home&k=99", {}))
    assert missing == 400 and "name a user" in error["error"]
    assert status == 200 and reply["user_id"] == "42"
    assert reply["items"] == [{"item_id": "7", "score": None}]  # NaN made JSON-safe
    assert fake.asked == [("42", "home", 50)]


def test_an_unanswered_question_is_a_504_with_the_reason(monkeypatch):
    class Late(FakeClient):
        def submit(self, user, surface, k, timeout):
            future = Future()
            future.set_exception(TimeoutError(f"no reply within {timeout} s"))
            return future
    status, body = asyncio.run(dashboard_server.inspect(Late, {"user": "9"}))
    assert status == 504 and body == {"error": "TimeoutError: no reply within 2.0 s",
                                      "user_id": "9"}


def test_serve_refuses_to_expose_without_a_token_before_asking_the_broker(monkeypatch):
    from streams import producer
    monkeypatch.setattr(producer, "check_broker", lambda *a, **kw: pytest.fail("asked"))
    with pytest.raises(ValueError, match="--bind=0.0.0.0 exposes the dashboard"):
        dashboard_server.serve("unused:1", bind="0.0.0.0", token="")


def test_serve_says_when_no_broker_answers(monkeypatch):
    from streams import producer

    def nobody(bootstrap, timeout=5.0):
        raise ConnectionError(f"no Kafka broker answers at {bootstrap}")
    monkeypatch.setattr(producer, "check_broker", nobody)
    with pytest.raises(ConnectionError, match="no Kafka broker answers at 127.0.0.1:29899"):
        dashboard_server.serve("127.0.0.1:29899")


def test_a_broker_without_the_stats_topic_is_named_as_such(monkeypatch):
    import confluent_kafka.admin

    class Admin:
        def __init__(self, config):
            pass

        def list_topics(self, timeout):
            return types.SimpleNamespace(topics={"events": types.SimpleNamespace(error=None)})
    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", Admin)
    with pytest.raises(RuntimeError, match="no topic 'cluster.stats'.*streamrec topics create"):
        ClusterView("127.0.0.1:29899").check()


def test_the_command_passes_its_options_on(monkeypatch):
    import dataclasses

    import streams.settings
    from streams.cli import main
    calls = []
    monkeypatch.setattr(dashboard_server, "serve", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(streams.settings, "settings", dataclasses.replace(
        streams.settings.settings, bootstrap="127.0.0.1:29892", web_bind="127.0.0.1",
        web_token="from-env"))
    assert main(["dashboard"]) == 0
    assert main(["dashboard", "--port", "29990", "--token", "t", "--bind", "0.0.0.0",
                 "--bootstrap", "h:1"]) == 0
    assert calls == [(("127.0.0.1:29892",), {"port": dashboard_server.DEFAULT_PORT,
                                             "bind": "127.0.0.1", "token": "from-env"}),
                     (("h:1",), {"port": 29990, "bind": "0.0.0.0", "token": "t"})]


def test_the_help_names_the_default_port():
    from streams.cli import build_parser
    sub = build_parser()._subparsers._group_actions[0].choices["dashboard"]
    assert f"default {dashboard_server.DEFAULT_PORT}" in sub.format_help()


def test_importing_the_dashboard_starts_no_faust_app():
    code = ("import sys, streams.dashboard_server, streams.cluster_stats; "
            "print('streams.app' in sys.modules, 'streams.view' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.split() == ["False", "False"]


def test_a_reader_error_is_shown_until_figures_arrive_again(monkeypatch):
    view = fed_view(monkeypatch)
    assert dashboard_server.cluster_payload(view, "d")["reader_error"] is None
    view.on_error(types.SimpleNamespace(name=lambda: "_ALL_BROKERS_DOWN",
                                        str=lambda: "1/1 brokers are down"))
    payload = dashboard_server.cluster_payload(view, "d")
    assert payload["reader_error"] == "_ALL_BROKERS_DOWN: 1/1 brokers are down"
    view.apply(b"host:6066", orjson.dumps({"worker": "host:6066", "at": 999.0}))
    assert dashboard_server.cluster_payload(view, "d")["reader_error"] is None

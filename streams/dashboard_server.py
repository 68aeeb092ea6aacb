"""The cluster dashboard's web side, without Faust: shared by every worker's pages
(streams/web.py) and by ``streamrec dashboard``, a small server of its own.

``streamrec dashboard`` tails the compacted ``cluster.stats`` topic with the same
:class:`streams.cluster_stats.ClusterView` the workers run and serves the same
page (``streams/dashboard.html``) and ``/cluster/`` JSON, merged by the same
functions, plus the request inspector (``/inspect/``) through a
:class:`streams.client.RecommendationClient`. It needs no worker of its own: the
figures are what the workers published. Like the workers' pages it listens on
loopback unless told otherwise, and then only with a token that every request
must carry.

Nothing here imports the Faust app.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

from aiohttp import web as aioweb

from streams import cluster_stats

DASHBOARD = Path(__file__).with_name("dashboard.html")
INSPECT_TIMEOUT_S = 2.0
DEFAULT_PORT = 6060


def is_loopback(host: str) -> bool:
    """
    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(bind: str, token: str, bind_name: str = "STREAMREC_WEB_BIND",
                   token_name: str = "STREAMREC_WEB_TOKEN") -> None:
    """Refuse to expose the pages beyond this machine without a token.

    >>> check_exposure("127.0.0.1", "")
    >>> check_exposure("0.0.0.0", "")
    Traceback (most recent call last):
    ...
    ValueError: STREAMREC_WEB_BIND=0.0.0.0 exposes the dashboard beyond this machine: set STREAMREC_WEB_TOKEN too
    """
    if not is_loopback(bind) and not token:
        raise ValueError(f"{bind_name}={bind} exposes the dashboard beyond this machine: "
                         f"set {token_name} too")


def token_ok(expected: str, authorization: Optional[str], query_token: Optional[str]) -> bool:
    """Whether a request carries the token (none needed when none is set).

    >>> token_ok("", None, None), token_ok("s3", "Bearer s3", None), token_ok("s3", None, "s3")
    (True, True, True)
    >>> token_ok("s3", "Bearer nope", None), token_ok("s3", None, None)
    (False, False)
    """
    if not expected:
        return True
    given = query_token or ""
    if authorization and authorization.startswith("Bearer "):
        given = authorization[len("Bearer "):]
    return hmac.compare_digest(given.encode(), expected.encode())


def token_middleware(expected: Callable[[], str]):
    """aiohttp middleware answering 401 to a request without the token ``expected()``
    (read per request, so a worker's settings can change under tests)."""
    @aioweb.middleware
    async def require_token(request, handler):
        if not token_ok(expected(), request.headers.get("Authorization"),
                        request.query.get("token")):
            return aioweb.json_response({"error": "missing or wrong token"}, status=401)
        return await handler(request)
    return require_token


def since_from(query: Optional[str]) -> float:
    """``?since=`` of /cluster/: epoch seconds, 0 (everything) when absent or not a number.

    >>> since_from("1790000000.5"), since_from(None), since_from("yesterday")
    (1790000000.5, 0.0, 0.0)
    """
    try:
        return float(query or "0")
    except ValueError:
        return 0.0


def cluster_payload(view, served_by: str, since: float = 0.0, server: str = "worker") -> dict:
    """What /cluster/ answers: ``view``'s workers merged (a ClusterView, or anything with
    its ``cluster()`` and ``series(since)``), who serves it (``server``: ``"worker"`` or
    ``"dashboard"``, the standalone server), the history rows from ``since``, and the
    reader's error when it cannot read the stats topic now."""
    return cluster_stats.clean({
        **view.cluster(), "served_by": served_by, "server": server,
        "stale_s": cluster_stats.STALE_S, "history_step_s": cluster_stats.HISTORY_STEP_S,
        "history": view.series(since=since), "reader_error": getattr(view, "error", None)})


def inspect_query(query) -> tuple[str, str, int]:
    """User, surface and k (1-50, default 10) of an /inspect/ request's query.

    >>> inspect_query({"user": " 42 ", "k": "500"}), inspect_query({"k": "x", "surface": "home"})
    (('42', 'explore', 50), ('', 'home', 10))
    """
    user = (query.get("user") or "").strip()
    surface = (query.get("surface") or "explore").strip()
    try:
        k = max(1, min(50, int(query.get("k", "10"))))
    except ValueError:
        k = 10
    return user, surface, k


async def inspect(client_factory: Callable[[], object], query) -> tuple[int, dict]:
    """Status and body of /inspect/: a real request over ``rec.requests`` through the
    client ``client_factory()`` gives (built off the event loop), and the reply."""
    user, surface, k = inspect_query(query)
    if not user:
        return 400, {"error": "name a user: /inspect/?user=42"}
    client = await asyncio.get_running_loop().run_in_executor(None, client_factory)
    try:
        reply = await asyncio.wrap_future(client.submit(user, surface, k,
                                                        timeout=INSPECT_TIMEOUT_S))
    except Exception as exc:
        return 504, {"error": f"{type(exc).__name__}: {exc}", "user_id": user}
    return 200, cluster_stats.clean(reply.to_dict())


class OneClient:
    """The inspector's RecommendationClient, made at the first question and kept."""

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self.client = None
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:  # two first questions at once make one client
            if self.client is None:
                from streams.client import RecommendationClient
                self.client = RecommendationClient(self.bootstrap)
            return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def make_app(view, bootstrap: str, token: str = "", served_by: str = "streamrec dashboard",
             client: Optional[OneClient] = None) -> aioweb.Application:
    """The standalone dashboard: /dashboard/ (the page; / leads there), /cluster/ and
    /inspect/, every one behind the token when there is one."""
    client = client or OneClient(bootstrap)
    server = aioweb.Application(middlewares=[token_middleware(lambda: token)])

    async def root(request):
        raise aioweb.HTTPFound("/dashboard/" + (f"?{request.query_string}"
                                                if request.query_string else ""))

    async def dashboard(request):
        return aioweb.Response(text=DASHBOARD.read_text(), content_type="text/html")

    async def cluster(request):
        return aioweb.json_response(cluster_payload(
            view, served_by, since_from(request.query.get("since")), server="dashboard"))

    async def inspector(request):
        status, body = await inspect(client, request.query)
        return aioweb.json_response(body, status=status)

    async def close_client(_app):
        client.close()

    server.router.add_get("/", root)
    server.router.add_get("/dashboard/", dashboard)
    server.router.add_get("/cluster/", cluster)
    server.router.add_get("/inspect/", inspector)
    server.on_cleanup.append(close_client)
    return server


def serve(bootstrap: str, port: int = DEFAULT_PORT, bind: str = "127.0.0.1",
          token: str = "", *, ready: Optional[Callable[[str], None]] = None) -> None:
    """Run ``streamrec dashboard`` until interrupted. Raises ValueError when ``bind`` is
    beyond loopback with no token, ConnectionError when no broker answers at
    ``bootstrap`` or it refuses this client, RuntimeError when there is no stats topic."""
    from streams.producer import check_broker
    check_exposure(bind, token, "--bind", "--token (or STREAMREC_WEB_TOKEN)")
    check_broker(bootstrap)
    view = cluster_stats.ClusterView(bootstrap)
    view.check()
    view.start()
    served_by = f"streamrec dashboard on {socket.gethostname()}:{port}"
    try:
        asyncio.run(_run(make_app(view, bootstrap, token, served_by), bind, port, ready))
    finally:
        view.stop()


async def _run(server: aioweb.Application, bind: str, port: int, ready) -> None:
    runner = aioweb.AppRunner(server)
    await runner.setup()
    try:
        site = aioweb.TCPSite(runner, bind, port)
        try:
            await site.start()
        except OSError as exc:
            raise RuntimeError(f"cannot listen on {bind}:{port} ({exc.strerror}); "
                               f"choose another with --port") from None
        url = f"http://{'127.0.0.1' if bind in ('0.0.0.0', '::') else bind}:{port}/dashboard/"
        (ready or (lambda u: print(f"streamrec dashboard: {u}", file=sys.stderr, flush=True)))(url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()

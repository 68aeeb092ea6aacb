"""Run the system's parts as local processes: used by the demo, tests and benchmarks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import orjson


class WorkerProcess:
    """A ``streamrec worker`` subprocess with its own data dir, log file and web port.

    >>> with WorkerProcess("127.0.0.1:9092", data_dir, web_port=6070) as w:  # doctest: +SKIP
    ...     w.stats()["counters"]
    """

    def __init__(self, bootstrap: str, data_dir: Path, *, web_port: int = 6066,
                 log_file: Optional[Path] = None, env: Optional[dict] = None):
        self.bootstrap = bootstrap
        self.data_dir = Path(data_dir)
        self.web_port = web_port
        self.log_file = Path(log_file or self.data_dir / "worker.log")
        self.env = {**os.environ, **(env or {}), "STREAMREC_BOOTSTRAP": bootstrap,
                    "STREAMREC_DATA_DIR": str(self.data_dir),
                    "STREAMREC_WEB_PORT": str(web_port)}
        self.proc: Optional[subprocess.Popen] = None
        self._log_start = 0

    def start(self, timeout: float = 90.0) -> "WorkerProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")
        self._log_start = log.seek(0, os.SEEK_END)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"], env=self.env, stdout=log,
            stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
            start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; see {self.log_file}:\n"
                                   + self.tail())
            if self.ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"worker not ready after {timeout:.0f}s; see {self.log_file}:\n" + self.tail())

    def ready(self) -> bool:
        """The web server answers and the worker has logged 'Worker ready'."""
        try:
            self.stats()
        except OSError:
            return False
        with open(self.log_file, "rb") as f:
            f.seek(self._log_start)
            return b"Worker ready" in f.read()

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/stats/", timeout=10) as r:
            return orjson.loads(r.read())

    def counter(self, name: str) -> int:
        return self.stats()["counters"].get(name, 0)

    def wait_for(self, name: str, at_least: int, timeout: float = 60.0) -> int:
        deadline = time.time() + timeout
        value = 0
        while time.time() < deadline:
            value = self.counter(name)
            if value >= at_least:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"counter {name} reached {value}, wanted {at_least} within {timeout}s")

    def wait_drained(self, timeout: float = 300.0) -> dict:
        """Wait until every item delta the ingest agent sent has been applied."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            c = self.stats()["counters"]
            if c.get("item_deltas_applied", 0) >= c.get("item_deltas_sent", 0):
                return c
            time.sleep(0.2)
        raise TimeoutError(f"item deltas not drained within {timeout}s: {c}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> "WorkerProcess":
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()

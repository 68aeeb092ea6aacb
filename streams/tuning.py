"""Faust tuned for request/reply latency, fast restarts and bounded stops.

- Faust creates its aiokafka consumer with a fixed ``fetch_max_wait_ms=1500``;
  on a broker that holds fetches for the full wait that puts up to 1.5 s into
  every request/reply round trip.  :class:`StreamrecApp` builds its transport
  with a consumer whose fetch wait comes from settings instead.
- Faust's table manager sleeps 1 s before it subscribes, for tables declared
  while the worker starts; ours are all declared at import, and that second is
  a second of every restart's outage.
- A worker told to stop exits within ``stop_timeout`` seconds whatever state it
  is in: Faust's own stop can wait far longer on a consumer still joining its
  group or a producer flushing to a broker that is gone.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

import faust
from faust.tables.manager import TableManager
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.worker import Worker

log = logging.getLogger(__name__)


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    fetch_wait_ms = 5

    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        # Read by aiokafka when it builds its fetcher in start().
        consumer._fetch_max_wait_ms = self.fetch_wait_ms
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self):
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class _TableManager(TableManager):
    async def on_start(self) -> None:
        # What Faust's on_start does after its fixed 1 s sleep.
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


def exit_after(seconds: float, reason: str) -> threading.Timer:
    """Start a daemon timer that ends the process (exit status 70) after ``seconds``,
    unless it is cancelled first: a stop that hangs cannot outlive it."""
    def _exit() -> None:
        log.error("%s did not finish within %.0f s: exiting now", reason, seconds)
        logging.shutdown()
        os._exit(70)
    timer = threading.Timer(seconds, _exit)
    timer.daemon = True
    timer.start()
    return timer


class _Worker(Worker):
    stop_timeout: float = 8.0

    def _schedule_shutdown(self, signum: signal.Signals) -> None:
        if not self._signal_stop_time:
            exit_after(self.stop_timeout, f"stopping on {signal.Signals(signum).name}")
        super()._schedule_shutdown(signum)


class StreamrecApp(faust.App):
    def __init__(self, *args, fetch_wait_ms: int = 5, stop_timeout: float = 8.0, **kwargs):
        _ConsumerThread.fetch_wait_ms = fetch_wait_ms
        _Worker.stop_timeout = stop_timeout
        kwargs.setdefault("TableManager", _TableManager)
        kwargs.setdefault("Worker", _Worker)
        super().__init__(*args, **kwargs)

    def _new_transport(self):
        return _Transport(self.conf.broker_consumer, self)

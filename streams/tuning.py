"""Faust with a configurable consumer fetch wait.

Faust creates its aiokafka consumer with a fixed ``fetch_max_wait_ms=1500``;
on a broker that holds fetches for the full wait that puts up to 1.5 s into
every request/reply round trip.  :class:`StreamrecApp` builds its transport
with a consumer whose fetch wait comes from settings instead.
"""
from __future__ import annotations

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka


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


class StreamrecApp(faust.App):
    def __init__(self, *args, fetch_wait_ms: int = 5, **kwargs):
        _ConsumerThread.fetch_wait_ms = fetch_wait_ms
        super().__init__(*args, **kwargs)

    def _new_transport(self):
        return _Transport(self.conf.broker_consumer, self)

"""Runtime settings, read once from ``STREAMREC_*`` environment variables.

Every value has an embedded default that works on one machine with the broker
that ``streamrec broker start`` runs.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from models.history import AUTHOR_HALF_LIFE_S


def _env(name: str, default: str) -> str:
    return os.environ.get(f"STREAMREC_{name}", default)


def home() -> Path:
    return Path(_env("HOME", str(Path.home() / ".cache" / "streamrec"))).expanduser()


@dataclass(frozen=True)
class Settings:
    bootstrap: str = field(default_factory=lambda: _env(
        "BOOTSTRAP", f"127.0.0.1:{_env('KAFKA_PORT', '9092')}"))
    app_id: str = field(default_factory=lambda: _env("APP_ID", "streamrec"))
    partitions: int = field(default_factory=lambda: int(_env("PARTITIONS", "4")))
    data_dir: Path = field(default_factory=lambda: Path(_env("DATA_DIR", str(home() / "worker"))))
    web_port: int = field(default_factory=lambda: int(_env("WEB_PORT", "6066")))
    #: Address the web pages (dashboard, /stats/, /metrics) listen on: loopback unless
    #: set; any other address needs ``web_token``, which every request must then carry
    #: (``Authorization: Bearer <token>`` or ``?token=<token>``).
    web_bind: str = field(default_factory=lambda: _env("WEB_BIND", "127.0.0.1"))
    web_token: str = field(default_factory=lambda: _env("WEB_TOKEN", ""))
    #: Consumer fetch wait: low values cut request/reply latency, cost idle CPU.
    fetch_wait_ms: int = field(default_factory=lambda: int(_env("FETCH_WAIT_MS", "5")))
    #: Producer linger: each ms may delay a reply by as much; a few ms let table
    #: and delta writes share requests (0 ms halved ingest in bench/ingest.py).
    producer_linger_ms: float = field(
        default_factory=lambda: float(_env("PRODUCER_LINGER_MS", "2")))
    #: Messages the ingest agent takes per batch, and item-delta bundles the item side
    #: folds per batch.  Serving shares the event loop, which a batch holds until it is
    #: done: a replayed backlog holds it for 6-8 s at a time (0.4-1.3 s with 200 and 20).
    ingest_batch: int = field(default_factory=lambda: int(_env("INGEST_BATCH", "2000")))
    ingest_within_s: float = field(default_factory=lambda: float(_env("INGEST_WITHIN_S", "0.05")))
    item_batch: int = field(default_factory=lambda: int(_env("ITEM_BATCH", "500")))
    trending_half_life_s: float = field(
        default_factory=lambda: float(_env("TRENDING_HALF_LIFE_S", "3600")))
    #: A user's per-author engagement counts (ranking features) halve every this many
    #: seconds of event time, so the ranker follows taste that moves.
    user_author_half_life_s: float = field(
        default_factory=lambda: float(_env("USER_AUTHOR_HALF_LIFE_S", str(AUTHOR_HALF_LIFE_S))))
    #: Label join: engagements count for an impression this long after it (event time;
    #: its window closes then, not before). Set it short for short closed loops...
    label_window_s: float = field(default_factory=lambda: float(_env("LABEL_WINDOW_S", "1800")))
    #: ...and a partition quiet this long (wall clock) lets its event time run on with
    #: the wall clock, so windows there close too.
    label_wall_window_s: float = field(
        default_factory=lambda: float(_env("LABEL_WALL_WINDOW_S", "120")))
    #: Online training on/off (off: examples still flow, nobody learns from them here).
    online_training: bool = field(
        default_factory=lambda: _env("ONLINE_TRAINING", "1") not in ("0", "false", "no"))
    #: Online training: examples per optimiser step, seconds between published versions.
    train_batch: int = field(default_factory=lambda: int(_env("TRAIN_BATCH", "256")))
    publish_interval_s: float = field(
        default_factory=lambda: float(_env("PUBLISH_INTERVAL_S", "60")))
    model_tier: str = field(default_factory=lambda: _env("MODEL_TIER", "TIER2"))
    model_owner: str = field(default_factory=lambda: _env("MODEL_OWNER", "streamrec-online-trainer"))
    #: How often each partition republishes its trending snapshot.
    snapshot_interval_s: float = field(
        default_factory=lambda: float(_env("SNAPSHOT_INTERVAL_S", "0.5")))
    # -- failover: how fast a dead worker's partitions serve again ------------------
    #: Static group membership (KIP-345): a worker that restarts with the same instance
    #: id gets its partitions back at once instead of after the dead member's session
    #: times out. One id per worker, the same across its restarts; "" = derived from
    #: the app id, host and web port (:meth:`instance_id`).
    group_instance_id: str = field(default_factory=lambda: _env("GROUP_INSTANCE_ID", ""))
    #: A member silent this long is dropped from the group and another worker takes
    #: its partitions (Faust's default was 60 s). Brokers refuse sessions shorter than
    #: their group.min.session.timeout.ms (Kafka's default 6 s, the local broker's
    #: 1 s): ``streamrec worker`` raises it to that minimum.
    session_timeout_s: float = field(
        default_factory=lambda: float(_env("SESSION_TIMEOUT_S", "2")))
    heartbeat_interval_s: float = field(
        default_factory=lambda: float(_env("HEARTBEAT_INTERVAL_S", "0.5")))
    #: How long a rebalance waits for every live member to rejoin.
    rebalance_timeout_s: float = field(
        default_factory=lambda: float(_env("REBALANCE_TIMEOUT_S", "10")))
    #: Offsets are committed this often: what a killed worker redoes after a restart.
    commit_interval_s: float = field(
        default_factory=lambda: float(_env("COMMIT_INTERVAL_S", "1")))
    #: A worker told to stop (SIGTERM/SIGINT) exits after this long even if a part of
    #: it is stuck (waiting to join its group, a broker that is gone).
    stop_timeout_s: float = field(default_factory=lambda: float(_env("STOP_TIMEOUT_S", "8")))
    #: Copies of each topic ``streamrec topics create`` makes (1 on one broker; 3 on a
    #: cluster), and how many must have a write before it is acknowledged (0 = the
    #: broker's default on one copy, all but one copy otherwise).
    replication_factor: int = field(default_factory=lambda: int(_env("REPLICATION_FACTOR", "1")))
    min_insync_replicas: int = field(
        default_factory=lambda: int(_env("MIN_INSYNC_REPLICAS", "0")))

    def instance_id(self) -> str:
        """This worker's static group member id."""
        return self.group_instance_id or f"{self.app_id}-{socket.gethostname()}-{self.web_port}"


settings = Settings()

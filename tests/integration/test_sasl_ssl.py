"""The project's clients and a worker against a broker that serves only SASL_SSL
(TLS with a CA made for it, SCRAM users), all configured through streams/kafka_config.py."""
from __future__ import annotations

import shutil
import time

import pytest

from .conftest import new_event

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None,
                       reason="openssl is needed to make the broker's TLS certificate"),
]
#: Its own port (below 32768; the KRaft controller takes the next one), so it never
#: meets the PLAINTEXT test broker or a developer's broker.
SASL_SSL_PORT = 29792
WEB_PORT = 16266


@pytest.fixture(scope="module")
def secure_kafka():
    """The SASL_SSL broker with the catalogue's topics; this process's clients use its
    settings (``client.env``) for the whole module."""
    from schemas.topics import catalogue
    from streams import broker
    from streams.admin import create_topics
    from streams.settings import settings
    info = broker.start(port=SASL_SSL_PORT, wipe=True, timeout=120, sasl_ssl=True)
    try:
        with pytest.MonkeyPatch.context() as env:
            for name, value in info.client_env.items():
                env.setenv(name, value)
            create_topics(info.bootstrap, catalogue(settings.partitions, settings.app_id))
            yield info
    finally:
        broker.stop(port=SASL_SSL_PORT, wipe=True)


def broker_dir():
    from streams import broker
    return broker.broker_dir(SASL_SSL_PORT)


def test_the_listener_speaks_only_sasl_ssl(secure_kafka):
    server = (broker_dir() / "server.properties").read_text()
    assert f"listeners=SASL_SSL://127.0.0.1:{SASL_SSL_PORT}," in server
    assert "PLAINTEXT://127.0.0.1" not in server.replace("CONTROLLER:PLAINTEXT", "")
    env = secure_kafka.client_env
    assert env["STREAMREC_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["STREAMREC_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert env["STREAMREC_SSL_CAFILE"].endswith("tls/ca.pem")


def test_events_go_through_with_the_credentials(secure_kafka):
    from stores.topic_reader import read_to_end
    from streams.producer import EventProducer, check_broker
    check_broker(secure_kafka.bootstrap)
    sent = [new_event("sasl-user", f"item{i}", "like") for i in range(5)]
    with EventProducer(secure_kafka.bootstrap) as producer:
        for event in sent:
            producer.send(event)
    assert producer.delivered == 5
    stored = [m.value() for m in read_to_end(secure_kafka.bootstrap, "events", timeout=30)]
    assert all(any(e["event_id"].encode() in value for value in stored) for e in sent)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_both_scram_mechanisms_log_in(secure_kafka, monkeypatch, mechanism):
    from streams.producer import check_broker
    monkeypatch.setenv("STREAMREC_SASL_MECHANISM", mechanism)
    check_broker(secure_kafka.bootstrap, timeout=15)


def test_a_wrong_password_is_refused_with_a_clear_error(secure_kafka, monkeypatch):
    from streams.kafka_config import BrokerRefused
    from streams.producer import check_broker
    monkeypatch.setenv("STREAMREC_SASL_PASSWORD", "not-the-password")
    t0 = time.monotonic()
    with pytest.raises(BrokerRefused) as refused:
        check_broker(secure_kafka.bootstrap, timeout=15)
    assert "refused SCRAM-SHA-512 user streamrec" in str(refused.value)
    assert "STREAMREC_SASL_PASSWORD" in str(refused.value)
    assert time.monotonic() - t0 < 10, "a refusal should not wait out the whole timeout"


def test_a_broker_certificate_from_an_unknown_ca_is_refused(secure_kafka, monkeypatch):
    from streams.kafka_config import BrokerRefused
    from streams.producer import check_broker
    # Without the broker's CA, the system's CAs cannot vouch for its certificate.
    monkeypatch.delenv("STREAMREC_SSL_CAFILE")
    with pytest.raises(BrokerRefused, match="TLS to the broker at 127.0.0.1:29792 failed"):
        check_broker(secure_kafka.bootstrap, timeout=15)


def test_a_worker_serves_a_recommendation_over_sasl_ssl(secure_kafka, tmp_path):
    from streams.client import RecommendationClient
    from streams.local import WorkerProcess
    from streams.producer import EventProducer
    env = {**secure_kafka.client_env, "STREAMREC_ONLINE_TRAINING": "0"}
    with WorkerProcess(secure_kafka.bootstrap, tmp_path / "worker", web_port=WEB_PORT,
                       env=env) as worker:
        before = worker.counter("events_applied")
        with EventProducer(secure_kafka.bootstrap) as producer:
            for user in ("u1", "u2", "u3"):
                for item in ("m1", "m2", "m3"):
                    producer.send(new_event(user, item, "like", author=f"a-{item}"))
        worker.wait_for("events_applied", before + 9, timeout=60)
        with RecommendationClient(secure_kafka.bootstrap) as client:
            reply = client.recommend("u4", "explore", k=3, timeout=5.0)
    assert reply.user_id == "u4" and not reply.error
    # The worker also ingests what the module's earlier tests produced (item0..item4).
    produced = {"m1", "m2", "m3"} | {f"item{i}" for i in range(5)}
    assert reply.items and {i.item_id for i in reply.items} <= produced

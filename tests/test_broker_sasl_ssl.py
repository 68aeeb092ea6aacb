"""The local broker's SASL_SSL listener as configuration: no broker started here
(tests/integration/test_sasl_ssl.py starts one)."""
from __future__ import annotations

from pathlib import Path

import pytest

from streams.broker import (BrokerError, SaslSsl, _server_properties, check_scram_user,
                            client_env, scram_format_args)

LISTENER = SaslSsl(keystore=Path("/b/tls/broker.p12"), keystore_password="kpw",
                   cafile=Path("/b/tls/ca.pem"), username="ann", password="pw")


def properties(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines()
                if line and not line.startswith("#"))


def test_the_default_listener_is_plaintext_as_before():
    props = properties(_server_properties(9092, Path("/d")))
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    assert not any(k.startswith(("ssl.", "sasl.", "listener.name.")) for k in props)


def test_sasl_ssl_replaces_plaintext_and_the_broker_logs_in_as_the_scram_user():
    props = properties(_server_properties(29792, Path("/d"), LISTENER))
    assert props["listeners"] == "SASL_SSL://127.0.0.1:29792,CONTROLLER://127.0.0.1:29793"
    assert props["advertised.listeners"] == "SASL_SSL://127.0.0.1:29792"
    assert props["listener.security.protocol.map"] == "SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT"
    assert props["inter.broker.listener.name"] == "SASL_SSL"
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-256,SCRAM-SHA-512"
    for mechanism in ("scram-sha-256", "scram-sha-512"):
        jaas = props[f"listener.name.sasl_ssl.{mechanism}.sasl.jaas.config"]
        assert 'username="ann" password="pw";' in jaas
    assert props["ssl.keystore.location"] == "/b/tls/broker.p12"
    assert props["ssl.truststore.location"] == "/b/tls/ca.pem"
    assert props["log.dirs"] == "/d"


def test_the_scram_user_is_created_for_both_mechanisms_at_format_time():
    assert scram_format_args("ann", "pw") == [
        "--add-scram", 'SCRAM-SHA-256=[name=ann,password="pw"]',
        "--add-scram", 'SCRAM-SHA-512=[name=ann,password="pw"]']


def test_clients_get_the_settings_streams_kafka_config_reads():
    from streams.kafka_config import ClientSecurity
    env = client_env(29792, LISTENER)
    assert env["STREAMREC_BOOTSTRAP"] == "127.0.0.1:29792"
    security = ClientSecurity.from_env(env, check_files=False)
    assert security.confluent() == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "ann", "sasl.password": "pw", "ssl.ca.location": "/b/tls/ca.pem"}


@pytest.mark.parametrize("username, password", [
    ("ann smith", "pw"), ("ann", ""), ("ann", 'p"w'), ("ann", "p'w"), ("ann", "p w"),
    ("ann", "p;w"), ("ann", "p\\w")])
def test_names_and_passwords_the_configs_cannot_quote_are_refused(username, password):
    with pytest.raises(BrokerError, match="SASL"):
        check_scram_user(username, password)


def test_a_plain_user_and_random_password_pass():
    check_scram_user("streamrec", "5uG1l8cPipTuK9_KBamI9KGb")

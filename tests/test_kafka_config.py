"""Client security settings: environment to confluent-kafka and Faust, and the errors
that name what to fix."""
from __future__ import annotations

import ssl

import faust
import pytest

from streams.kafka_config import ClientSecurity, KafkaSecurityError, client_config

#: The files named are not opened: mapping only.
CA_PEM_IS_NOT_NEEDED = dict(check_files=False)


def env(**values) -> dict:
    return {f"STREAMREC_{k.upper()}": v for k, v in values.items()}


def test_plaintext_is_the_default_and_adds_nothing():
    security = ClientSecurity.from_env({})
    assert security.protocol == "PLAINTEXT"
    assert security.confluent() == {}
    assert security.faust_credentials() is None
    assert security.ssl_context() is None


def test_client_config_keeps_bootstrap_then_security_then_the_clients_own(monkeypatch):
    for name in ("SECURITY_PROTOCOL", "SASL_MECHANISM", "SASL_USERNAME", "SASL_PASSWORD",
                 "SSL_CAFILE", "SSL_CERTFILE", "SSL_KEYFILE", "SSL_KEY_PASSWORD"):
        monkeypatch.delenv(f"STREAMREC_{name}", raising=False)
    assert client_config("h:1", {"linger.ms": 0}) == {"bootstrap.servers": "h:1", "linger.ms": 0}
    monkeypatch.setenv("STREAMREC_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("STREAMREC_SASL_USERNAME", "alice")
    monkeypatch.setenv("STREAMREC_SASL_PASSWORD", "s3cret")
    assert client_config("h:1", {"group.id": "g"}) == {
        "bootstrap.servers": "h:1", "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "alice", "sasl.password": "s3cret",
        "group.id": "g"}


def test_sasl_ssl_maps_to_librdkafka_names(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    security = ClientSecurity.from_env(env(security_protocol="sasl_ssl",
                                           sasl_mechanism="scram-sha-256",
                                           sasl_username="alice", sasl_password=" pw ",
                                           ssl_cafile=str(ca)))
    assert security.confluent() == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "alice", "sasl.password": " pw ", "ssl.ca.location": str(ca)}


def test_ssl_with_a_client_certificate_maps_every_file():
    security = ClientSecurity.from_env(env(security_protocol="SSL", ssl_cafile="/ca.pem",
                                           ssl_certfile="/c.pem", ssl_keyfile="/k.pem",
                                           ssl_key_password="kp"), **CA_PEM_IS_NOT_NEEDED)
    assert security.confluent() == {
        "security.protocol": "SSL", "ssl.ca.location": "/ca.pem",
        "ssl.certificate.location": "/c.pem", "ssl.key.location": "/k.pem",
        "ssl.key.password": "kp"}


def test_the_password_never_shows_in_repr():
    security = ClientSecurity.from_env(env(security_protocol="SASL_PLAINTEXT",
                                           sasl_username="alice", sasl_password="s3cret"))
    assert "s3cret" not in repr(security)
    assert "alice" in repr(security)


@pytest.mark.parametrize("values, says", [
    (dict(security_protocol="TLS"), "STREAMREC_SECURITY_PROTOCOL='TLS' is not one of"),
    (dict(security_protocol="SASL_SSL", sasl_password="pw"),
     "SASL_SSL needs STREAMREC_SASL_USERNAME and STREAMREC_SASL_PASSWORD"),
    (dict(security_protocol="SASL_SSL", sasl_username="alice"),
     "SASL_SSL needs STREAMREC_SASL_USERNAME and STREAMREC_SASL_PASSWORD"),
    (dict(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="a",
          sasl_password="p"), "STREAMREC_SASL_MECHANISM='PLAIN' is not supported"),
    (dict(sasl_username="alice", sasl_password="pw"),
     "STREAMREC_SASL_USERNAME, STREAMREC_SASL_PASSWORD set but STREAMREC_SECURITY_PROTOCOL "
     "is PLAINTEXT"),
    (dict(security_protocol="SASL_PLAINTEXT", sasl_username="a", sasl_password="p",
          ssl_cafile="/ca.pem"),
     "STREAMREC_SSL_CAFILE set but STREAMREC_SECURITY_PROTOCOL is SASL_PLAINTEXT"),
    (dict(security_protocol="SSL", ssl_certfile="/c.pem"),
     "needs both STREAMREC_SSL_CERTFILE and STREAMREC_SSL_KEYFILE"),
    (dict(security_protocol="SSL", ssl_key_password="kp"),
     "STREAMREC_SSL_KEY_PASSWORD set without STREAMREC_SSL_KEYFILE"),
])
def test_contradictory_or_incomplete_settings_say_what_to_fix(values, says):
    with pytest.raises(KafkaSecurityError) as err:
        ClientSecurity.from_env(env(**values), check_files=False)
    assert says in str(err.value)


def test_a_missing_ca_file_is_named(tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(KafkaSecurityError, match=f"STREAMREC_SSL_CAFILE={missing}: no such file"):
        ClientSecurity.from_env(env(security_protocol="SSL", ssl_cafile=str(missing)))


def test_faust_gets_scram_credentials_over_tls():
    security = ClientSecurity.from_env(env(security_protocol="SASL_SSL", sasl_username="alice",
                                           sasl_password="pw"))
    creds = security.faust_credentials()
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password) == ("alice", "pw")
    assert creds.mechanism.value == "SCRAM-SHA-512"
    assert creds.protocol.value == "SASL_SSL"
    assert isinstance(creds.ssl_context, ssl.SSLContext)
    # the broker's certificate is checked, name included
    assert creds.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert creds.ssl_context.check_hostname


def test_faust_gets_scram_without_tls_for_sasl_plaintext():
    creds = ClientSecurity.from_env(env(security_protocol="SASL_PLAINTEXT", sasl_username="a",
                                        sasl_password="p")).faust_credentials()
    assert creds.protocol.value == "SASL_PLAINTEXT"
    assert creds.ssl_context is None


def test_faust_gets_tls_alone_for_ssl():
    creds = ClientSecurity.from_env(env(security_protocol="SSL")).faust_credentials()
    assert isinstance(creds, faust.SSLCredentials)
    assert creds.protocol.value == "SSL"
    assert creds.context.verify_mode == ssl.CERT_REQUIRED


def test_the_aiokafka_settings_faust_derives_carry_the_credentials():
    # What Faust's aiokafka transport hands to AIOKafkaConsumer/Producer.
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
    creds = ClientSecurity.from_env(env(security_protocol="SASL_SSL", sasl_username="alice",
                                        sasl_password="pw",
                                        sasl_mechanism="SCRAM-SHA-256")).faust_credentials()
    auth = credentials_to_aiokafka_auth(creds)
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-256"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("alice", "pw")
    assert isinstance(auth["ssl_context"], ssl.SSLContext)

"""How every client reaches the broker: the one place for TLS and SASL/SCRAM settings.

Read from the environment each time a client is built, so a process (a worker,
a CLI command, a test) uses whatever is set when it connects:

- ``STREAMREC_SECURITY_PROTOCOL``: PLAINTEXT (default), SSL, SASL_PLAINTEXT or SASL_SSL
- ``STREAMREC_SASL_MECHANISM``: SCRAM-SHA-512 (default with SASL) or SCRAM-SHA-256
- ``STREAMREC_SASL_USERNAME``, ``STREAMREC_SASL_PASSWORD``: required with SASL
- ``STREAMREC_SSL_CAFILE``: PEM file of the CA that signed the broker's certificate
  (the system's CAs when unset)
- ``STREAMREC_SSL_CERTFILE``, ``STREAMREC_SSL_KEYFILE`` (and ``STREAMREC_SSL_KEY_PASSWORD``):
  a client certificate, for brokers that require one

:class:`ClientSecurity` is pure (parse, validate, map); :func:`client_config` gives
confluent-kafka's config dict and :func:`faust_credentials` the Faust app's
``broker_credentials``.
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
DEFAULT_MECHANISM = "SCRAM-SHA-512"
PREFIX = "STREAMREC_"


class KafkaSecurityError(ValueError):
    """The security settings are incomplete or contradict each other."""


class BrokerRefused(ConnectionError):
    """The broker answered but refused this client: wrong credentials or TLS."""


@dataclass(frozen=True)
class ClientSecurity:
    protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_key_password: str = field(default="", repr=False)

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None,
                 check_files: bool = True) -> "ClientSecurity":
        """Parse and validate ``STREAMREC_*`` variables (``os.environ`` by default).

        >>> ClientSecurity.from_env({})
        ClientSecurity(protocol='PLAINTEXT', sasl_mechanism='', sasl_username='', ssl_cafile='', ssl_certfile='', ssl_keyfile='')
        >>> ClientSecurity.from_env({"STREAMREC_SECURITY_PROTOCOL": "sasl_ssl"})
        ... # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        KafkaSecurityError: STREAMREC_SECURITY_PROTOCOL=SASL_SSL needs STREAMREC_SASL_USERNAME ...
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return env.get(PREFIX + name, "").strip()

        protocol = (get("SECURITY_PROTOCOL") or "PLAINTEXT").upper()
        mechanism = get("SASL_MECHANISM").upper()
        if protocol.startswith("SASL_") and not mechanism:
            mechanism = DEFAULT_MECHANISM
        security = cls(protocol=protocol, sasl_mechanism=mechanism,
                       sasl_username=get("SASL_USERNAME"),
                       # a password is taken as it is: spaces may be part of it
                       sasl_password=env.get(PREFIX + "SASL_PASSWORD", ""),
                       ssl_cafile=get("SSL_CAFILE"), ssl_certfile=get("SSL_CERTFILE"),
                       ssl_keyfile=get("SSL_KEYFILE"),
                       ssl_key_password=env.get(PREFIX + "SSL_KEY_PASSWORD", ""))
        security.validate(check_files=check_files)
        return security

    def validate(self, check_files: bool = True) -> "ClientSecurity":
        """Raise :class:`KafkaSecurityError` naming the variable to fix."""
        v = PREFIX
        if self.protocol not in PROTOCOLS:
            raise KafkaSecurityError(f"{v}SECURITY_PROTOCOL={self.protocol!r} is not one of "
                                     f"{', '.join(PROTOCOLS)}")
        sasl_set = [n for n, val in (("SASL_MECHANISM", self.sasl_mechanism),
                                     ("SASL_USERNAME", self.sasl_username),
                                     ("SASL_PASSWORD", self.sasl_password)) if val]
        tls_set = [n for n, val in (("SSL_CAFILE", self.ssl_cafile),
                                    ("SSL_CERTFILE", self.ssl_certfile),
                                    ("SSL_KEYFILE", self.ssl_keyfile),
                                    ("SSL_KEY_PASSWORD", self.ssl_key_password)) if val]
        # Credentials set for a protocol that would not use them are a forgotten
        # STREAMREC_SECURITY_PROTOCOL far more often than an intent to connect in the clear.
        if sasl_set and not self.uses_sasl:
            raise KafkaSecurityError(
                f"{', '.join(v + n for n in sasl_set)} set but {v}SECURITY_PROTOCOL is "
                f"{self.protocol}: set it to SASL_SSL (or SASL_PLAINTEXT) to use them")
        if tls_set and not self.uses_tls:
            raise KafkaSecurityError(
                f"{', '.join(v + n for n in tls_set)} set but {v}SECURITY_PROTOCOL is "
                f"{self.protocol}: set it to SSL or SASL_SSL to use them")
        if self.uses_sasl:
            if self.sasl_mechanism not in MECHANISMS:
                raise KafkaSecurityError(f"{v}SASL_MECHANISM={self.sasl_mechanism!r} is not "
                                         f"supported: use {' or '.join(MECHANISMS)}")
            if not self.sasl_username or not self.sasl_password:
                raise KafkaSecurityError(f"{v}SECURITY_PROTOCOL={self.protocol} needs "
                                         f"{v}SASL_USERNAME and {v}SASL_PASSWORD")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise KafkaSecurityError(f"a client certificate needs both {v}SSL_CERTFILE "
                                     f"and {v}SSL_KEYFILE")
        if self.ssl_key_password and not self.ssl_keyfile:
            raise KafkaSecurityError(f"{v}SSL_KEY_PASSWORD set without {v}SSL_KEYFILE")
        if check_files:
            for name, path in (("SSL_CAFILE", self.ssl_cafile), ("SSL_CERTFILE", self.ssl_certfile),
                               ("SSL_KEYFILE", self.ssl_keyfile)):
                if path and not Path(path).is_file():
                    raise KafkaSecurityError(f"{v}{name}={path}: no such file")
        return self

    def confluent(self) -> dict[str, str]:
        """librdkafka's settings for this security; empty for PLAINTEXT.

        >>> ClientSecurity("SASL_SSL", "SCRAM-SHA-256", "u", "p", "/ca.pem").confluent()
        ... # doctest: +NORMALIZE_WHITESPACE
        {'security.protocol': 'SASL_SSL', 'sasl.mechanism': 'SCRAM-SHA-256',
         'sasl.username': 'u', 'sasl.password': 'p', 'ssl.ca.location': '/ca.pem'}
        """
        if self.protocol == "PLAINTEXT":
            return {}
        config = {"security.protocol": self.protocol}
        if self.uses_sasl:
            config.update({"sasl.mechanism": self.sasl_mechanism,
                           "sasl.username": self.sasl_username,
                           "sasl.password": self.sasl_password})
        for key, value in (("ssl.ca.location", self.ssl_cafile),
                           ("ssl.certificate.location", self.ssl_certfile),
                           ("ssl.key.location", self.ssl_keyfile),
                           ("ssl.key.password", self.ssl_key_password)):
            if value:
                config[key] = value
        return config

    def ssl_context(self) -> Optional[ssl.SSLContext]:
        """The TLS context aiokafka (Faust) connects with; None without TLS.
        Hostname checking stays on, as in librdkafka."""
        if not self.uses_tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=self.ssl_cafile or None)
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile,
                                    password=self.ssl_key_password or None)
        return context

    def faust_credentials(self) -> Any:
        """Faust's ``broker_credentials`` (SASLCredentials or SSLCredentials), or None."""
        if self.protocol == "PLAINTEXT":
            return None
        import faust
        if self.uses_sasl:
            return faust.SASLCredentials(username=self.sasl_username, password=self.sasl_password,
                                         ssl_context=self.ssl_context(),
                                         mechanism=self.sasl_mechanism)
        return faust.SSLCredentials(self.ssl_context())


def refusal(bootstrap: str, security: ClientSecurity, code: str, detail: str) -> Optional[BrokerRefused]:
    """The clear error for a librdkafka error that means "refused", else None.

    ``code`` is the error's name (``KafkaError.name()``): _AUTHENTICATION for SASL,
    _SSL for a TLS handshake that failed (usually the CA or the certificate's name).

    >>> s = ClientSecurity("SASL_SSL", "SCRAM-SHA-512", "ann", "x", "/ca.pem")
    >>> str(refusal("h:9093", s, "_AUTHENTICATION", "invalid credentials"))
    'the broker at h:9093 refused SCRAM-SHA-512 user ann: invalid credentials; check STREAMREC_SASL_USERNAME and STREAMREC_SASL_PASSWORD'
    >>> refusal("h:9093", s, "_TRANSPORT", "connection refused") is None
    True
    """
    if code == "_AUTHENTICATION":
        return BrokerRefused(f"the broker at {bootstrap} refused {security.sasl_mechanism or 'SASL'} "
                             f"user {security.sasl_username}: {detail}; check "
                             f"{PREFIX}SASL_USERNAME and {PREFIX}SASL_PASSWORD")
    if code == "_SSL":
        return BrokerRefused(f"TLS to the broker at {bootstrap} failed: {detail}; check "
                             f"{PREFIX}SSL_CAFILE ({security.ssl_cafile or 'the system CAs'}) "
                             f"and that the broker's certificate names the host")
    return None


def security_from_env() -> ClientSecurity:
    return ClientSecurity.from_env()


def client_config(bootstrap: str, overrides: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """A confluent-kafka Producer/Consumer/AdminClient config: the bootstrap servers,
    the security settings from the environment, then the client's own ``overrides``."""
    return {"bootstrap.servers": bootstrap, **security_from_env().confluent(), **(overrides or {})}


def faust_credentials() -> Any:
    """The Faust app's ``broker_credentials`` from the environment (None for PLAINTEXT)."""
    return security_from_env().faust_credentials()

"""Manage a local single-node Apache Kafka broker (KRaft mode).

Standard library only: this module must work as ``python -m streams.broker
start`` before any third-party package is installed.

Layout (``$STREAMREC_HOME``, default ``~/.cache/streamrec``)::

    kafka/<version>/libs/*.jar      fetched jars (shared cache, via Maven)
    kafka/<version>/.complete       marker: the libs dir is complete
    broker-<port>/data/             KRaft log dirs (kept unless wiped)
    broker-<port>/server.properties
    broker-<port>/log4j2.properties
    broker-<port>/broker.log        stdout+stderr of the JVM
    broker-<port>/broker.pid
    broker-<port>/cluster.id
    broker-<port>/tls/              --sasl-ssl only: throwaway CA, broker certificate
    broker-<port>/client.env        --sasl-ssl only: the STREAMREC_* settings clients need

``start --sasl-ssl`` serves one SASL_SSL listener (TLS with a certificate from a CA
made for this broker, SCRAM-SHA-256/512 users created when the storage is
formatted) instead of PLAINTEXT; the controller listener stays PLAINTEXT on loopback.

Environment: ``STREAMREC_HOME``, ``STREAMREC_KAFKA_PORT`` (default 9092; the
controller listens on port+1), ``STREAMREC_KAFKA_VERSION`` (default 4.3.1),
``STREAMREC_KAFKA_HEAP`` (default 768m).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

DEFAULT_PORT = 9092
DEFAULT_VERSION = "4.3.1"
LOG4J_SLF4J_VERSION = "2.24.3"
DEFAULT_HEAP = "768m"
STARTED_MARKER = "Kafka Server started"
MAIN_CLASS = "kafka.Kafka"


class BrokerError(RuntimeError):
    """Raised when the broker cannot be fetched, started or stopped."""


@dataclasses.dataclass
class BrokerInfo:
    pid: int
    port: int
    bootstrap: str
    version: str
    data_dir: str
    log_file: str
    already_running: bool = False
    #: With --sasl-ssl: the STREAMREC_* variables a client needs (protocol, user, CA).
    client_env: Optional[dict] = None


# --------------------------------------------------------------------------
# configuration / paths
# --------------------------------------------------------------------------

def _say(msg: str) -> None:
    print(f"[broker] {msg}", file=sys.stderr, flush=True)


def home() -> Path:
    return Path(os.environ.get("STREAMREC_HOME") or "~/.cache/streamrec").expanduser().absolute()


def kafka_version() -> str:
    return os.environ.get("STREAMREC_KAFKA_VERSION") or DEFAULT_VERSION


def default_port() -> int:
    raw = os.environ.get("STREAMREC_KAFKA_PORT")
    if not raw:
        return DEFAULT_PORT
    try:
        return int(raw)
    except ValueError:
        raise BrokerError(f"STREAMREC_KAFKA_PORT must be an integer, got {raw!r}")


def _port(port: Optional[int]) -> int:
    return int(port) if port else default_port()


def kafka_dir(version: Optional[str] = None) -> Path:
    return home() / "kafka" / (version or kafka_version())


def libs_dir(version: Optional[str] = None) -> Path:
    return kafka_dir(version) / "libs"


def broker_dir(port: Optional[int] = None) -> Path:
    return home() / f"broker-{_port(port)}"


def _paths(port: Optional[int] = None) -> dict:
    b = broker_dir(port)
    return {
        "dir": b,
        "data": b / "data",
        "server": b / "server.properties",
        "log4j": b / "log4j2.properties",
        "log": b / "broker.log",
        "pid": b / "broker.pid",
        "cluster": b / "cluster.id",
        "tls": b / "tls",
        "client_env": b / "client.env",
    }


def bootstrap_servers(port: Optional[int] = None) -> str:
    return f"127.0.0.1:{_port(port)}"


# --------------------------------------------------------------------------
# fetching jars
# --------------------------------------------------------------------------

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.streamrec</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""


def _require(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise BrokerError(f"`{tool}` not found on PATH: {hint}")
    return path


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    return _require("java", "install a JDK/JRE 17+ (e.g. apt-get install openjdk-17-jre-headless)")


def jars_ready(version: Optional[str] = None) -> bool:
    kd = kafka_dir(version)
    return (kd / ".complete").exists() and any((kd / "libs").glob("kafka_2.13-*.jar"))


def fetch(version: Optional[str] = None, force: bool = False) -> Path:
    """Download Kafka's runtime jars with Maven into the shared cache.

    Jars go to a temp dir next to the target and are renamed into place only
    once Maven succeeded, so a half-finished download is never used.
    """
    version = version or kafka_version()
    kd = kafka_dir(version)
    libs = kd / "libs"
    if jars_ready(version) and not force:
        return libs
    mvn = _require("mvn", "install Maven (e.g. apt-get install maven) to fetch the Kafka jars")
    kd.mkdir(parents=True, exist_ok=True)
    _say(f"fetching Kafka {version} jars with Maven into {libs} ...")
    t0 = time.monotonic()
    last_err = ""
    for attempt in (1, 2):
        build = Path(tempfile.mkdtemp(prefix=".fetch-", dir=kd))
        try:
            tmp_libs = build / "libs"
            (build / "pom.xml").write_text(_POM.format(kafka=version, log4j=LOG4J_SLF4J_VERSION))
            cmd = [mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(build / "pom.xml"),
                   "dependency:copy-dependencies",
                   f"-DoutputDirectory={tmp_libs}", "-DincludeScope=runtime"]
            if attempt > 1:
                cmd.insert(1, "-U")
            proc = subprocess.run(cmd, cwd=build, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
            if proc.returncode == 0 and any(tmp_libs.glob("kafka_2.13-*.jar")):
                (kd / ".complete").unlink(missing_ok=True)
                if libs.exists():
                    old = kd / f".old-{os.getpid()}-{time.time_ns()}"
                    libs.rename(old)
                    shutil.rmtree(old, ignore_errors=True)
                tmp_libs.rename(libs)  # atomic on the same filesystem
                (kd / ".complete").write_text(f"{version}\n")
                n = len(list(libs.glob("*.jar")))
                _say(f"fetched {n} jars in {time.monotonic() - t0:.1f}s")
                return libs
            out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout or "").strip()
            last_err = "\n".join(out.splitlines()[-30:])
            _say(f"maven attempt {attempt} failed (exit {proc.returncode})"
                 + ("; retrying with -U" if attempt == 1 else ""))
        finally:
            shutil.rmtree(build, ignore_errors=True)
    try:
        kd.rmdir()  # leave no empty cache dir behind for a bad version
    except OSError:
        pass
    raise BrokerError(f"could not fetch Kafka {version} jars with Maven "
                      f"(check the version and network access):\n{last_err}")


# --------------------------------------------------------------------------
# config files
# --------------------------------------------------------------------------

SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclasses.dataclass(frozen=True)
class SaslSsl:
    """What a SASL_SSL listener needs: the broker's PKCS12 keystore and the one
    SCRAM user (clients and the broker itself log in as it)."""
    keystore: Path
    keystore_password: str
    #: The CA's certificate: the broker checks its own listener with it (inter-broker).
    cafile: Path
    username: str
    password: str = dataclasses.field(repr=False)


def _listener_properties(port: int, ctl: int, sasl_ssl: Optional[SaslSsl]) -> str:
    if sasl_ssl is None:
        return f"""listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{ctl}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
"""
    jaas = "".join(
        f"listener.name.sasl_ssl.{m.lower()}.sasl.jaas.config="
        f"org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{sasl_ssl.username}" password="{sasl_ssl.password}";\n'
        for m in SCRAM_MECHANISMS)
    return f"""listeners=SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{ctl}
advertised.listeners=SASL_SSL://127.0.0.1:{port}
controller.listener.names=CONTROLLER
# the controller listener is reachable from this machine only
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms={",".join(SCRAM_MECHANISMS)}
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
{jaas}ssl.keystore.type=PKCS12
ssl.keystore.location={sasl_ssl.keystore}
ssl.keystore.password={sasl_ssl.keystore_password}
ssl.key.password={sasl_ssl.keystore_password}
ssl.truststore.type=PEM
ssl.truststore.location={sasl_ssl.cafile}
ssl.client.auth=none
"""


def _server_properties(port: int, data_dir: Path, sasl_ssl: Optional[SaslSsl] = None) -> str:
    ctl = port + 1
    return f"""# generated by streams/broker.py; rewritten on every start
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:{ctl}
{_listener_properties(port, ctl, sasl_ssl)}log.dirs={data_dir}
num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
auto.create.topics.enable=false
delete.topic.enable=true
group.initial.rebalance.delay.ms=0
# let workers use short consumer-group sessions, so a dead one's partitions move in ~2 s
group.min.session.timeout.ms=1000
# a dev box: keep background threads small
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.check.interval.ms=60000
"""


_LOG4J2 = """rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
"""


def _write_configs(p: dict, port: int, sasl_ssl: Optional[SaslSsl] = None) -> None:
    p["dir"].mkdir(parents=True, exist_ok=True)
    p["server"].write_text(_server_properties(port, p["data"].resolve(), sasl_ssl))
    if sasl_ssl is not None:
        p["server"].chmod(0o600)  # it holds the SCRAM user's password
    p["log4j"].write_text(_LOG4J2)


# --------------------------------------------------------------------------
# SASL_SSL: a throwaway CA, the broker's certificate, the SCRAM user
# --------------------------------------------------------------------------

def scram_format_args(username: str, password: str) -> List[str]:
    """StorageTool arguments that create ``username`` for both SCRAM mechanisms.

    >>> scram_format_args("ann", "pw")
    ['--add-scram', 'SCRAM-SHA-256=[name=ann,password="pw"]', '--add-scram', 'SCRAM-SHA-512=[name=ann,password="pw"]']
    """
    return [arg for m in SCRAM_MECHANISMS
            for arg in ("--add-scram", f'{m}=[name={username},password="{password}"]')]


def check_scram_user(username: str, password: str) -> None:
    """Refuse names and passwords the broker's configs and StorageTool cannot quote."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", username):
        raise BrokerError(f"SASL user name {username!r}: use letters, digits, '.', '_' or '-'")
    if not password or re.search(r'["\'\\\s;]', password):
        raise BrokerError("SASL password: give a non-empty one without quotes, "
                          "backslashes, semicolons or spaces")


def client_env(port: int, sasl_ssl: SaslSsl) -> dict:
    """The STREAMREC_* variables a client of this broker needs (streams/kafka_config.py)."""
    return {"STREAMREC_BOOTSTRAP": bootstrap_servers(port),
            "STREAMREC_SECURITY_PROTOCOL": "SASL_SSL",
            "STREAMREC_SASL_MECHANISM": "SCRAM-SHA-512",
            "STREAMREC_SASL_USERNAME": sasl_ssl.username,
            "STREAMREC_SASL_PASSWORD": sasl_ssl.password,
            "STREAMREC_SSL_CAFILE": str(sasl_ssl.cafile)}


def _read_client_env(path: Path) -> dict:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            name, value = line[len("export "):].split("=", 1)
            env[name] = value.strip("'")
    return env


def _openssl(tls: Path, *args: str) -> None:
    openssl = _require("openssl", "install OpenSSL to make the broker's TLS certificate")
    r = subprocess.run([openssl, *args], cwd=tls, capture_output=True, text=True)
    if r.returncode != 0:
        raise BrokerError(f"openssl {args[0]} failed (exit {r.returncode}):\n{r.stderr}")


def _make_tls(tls: Path, keystore_password: str) -> None:
    """A CA of its own and a broker certificate it signed, valid for 127.0.0.1 and
    localhost (clients check the name), as a PKCS12 keystore for the broker."""
    tls.mkdir(parents=True, exist_ok=True)
    tls.chmod(0o700)
    _openssl(tls, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365",
             "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=streamrec local broker CA")
    _openssl(tls, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key",
             "-out", "broker.csr", "-subj", "/CN=localhost")
    (tls / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(tls, "x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "365", "-out", "broker.pem", "-extfile", "san.ext")
    _openssl(tls, "pkcs12", "-export", "-in", "broker.pem", "-inkey", "broker.key",
             "-certfile", "ca.pem", "-name", "broker", "-out", "broker.p12",
             "-passout", f"pass:{keystore_password}")


def _prepare_sasl_ssl(p: dict, port: int) -> SaslSsl:
    """The listener's keystore and SCRAM user: kept from an earlier start (the user is
    in the formatted storage), else new. The user comes from STREAMREC_SASL_USERNAME
    and STREAMREC_SASL_PASSWORD when set, otherwise 'streamrec' and a random password."""
    tls = p["tls"]
    if _is_formatted(p) and p["client_env"].exists() and (tls / "broker.p12").exists():
        env = _read_client_env(p["client_env"])
        return SaslSsl(tls / "broker.p12", (tls / "keystore.password").read_text().strip(),
                       tls / "ca.pem", env["STREAMREC_SASL_USERNAME"], env["STREAMREC_SASL_PASSWORD"])
    if _is_formatted(p):
        raise BrokerError(f"{p['data']} was formatted without a SCRAM user; start with "
                          f"--sasl-ssl --wipe to reformat it")
    username = os.environ.get("STREAMREC_SASL_USERNAME") or "streamrec"
    password = os.environ.get("STREAMREC_SASL_PASSWORD") or secrets.token_urlsafe(18)
    check_scram_user(username, password)
    shutil.rmtree(tls, ignore_errors=True)
    keystore_password = secrets.token_hex(16)
    _make_tls(tls, keystore_password)
    (tls / "keystore.password").write_text(keystore_password + "\n")
    sasl_ssl = SaslSsl(tls / "broker.p12", keystore_password, tls / "ca.pem", username, password)
    p["dir"].mkdir(parents=True, exist_ok=True)
    p["client_env"].touch(mode=0o600)
    p["client_env"].write_text("".join(
        f"export {k}='{v}'\n" for k, v in client_env(port, sasl_ssl).items()))
    return sasl_ssl


def _classpath(version: Optional[str] = None) -> str:
    return str(libs_dir(version).resolve() / "*")


def _format_storage(p: dict, version: str, sasl_ssl: Optional[SaslSsl] = None) -> None:
    java = _java()
    cp = _classpath(version)
    cluster_file = p["cluster"]
    cluster_id = cluster_file.read_text().strip() if cluster_file.exists() else ""
    if not cluster_id:
        r = subprocess.run([java, "-cp", cp, "kafka.tools.StorageTool", "random-uuid"],
                           capture_output=True, text=True)
        lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
        if r.returncode != 0 or not lines:
            raise BrokerError(f"StorageTool random-uuid failed:\n{r.stdout}{r.stderr}")
        cluster_id = lines[-1]
        cluster_file.write_text(cluster_id + "\n")
    _say(f"formatting KRaft storage in {p['data']} (cluster id {cluster_id})")
    p["data"].mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        [java, f"-Dlog4j2.configurationFile={p['log4j'].resolve()}", "-cp", cp,
         "kafka.tools.StorageTool", "format", "-t", cluster_id,
         "-c", str(p["server"]), "--standalone",
         *(scram_format_args(sasl_ssl.username, sasl_ssl.password) if sasl_ssl else [])],
        capture_output=True, text=True)
    if r.returncode != 0:
        raise BrokerError(f"StorageTool format failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")


def _is_formatted(p: dict) -> bool:
    return (p["data"] / "meta.properties").exists()


# --------------------------------------------------------------------------
# process helpers
# --------------------------------------------------------------------------

def _read_pid(p: dict) -> Optional[int]:
    try:
        return int(p["pid"].read_text().strip())
    except (OSError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return raw.replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        pass
    try:  # non-Linux fallback
        r = subprocess.run(["ps", "-o", "command=", "-p", str(pid)],
                           capture_output=True, text=True)
        return r.stdout.strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child counts as dead
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except (OSError, IndexError):
        pass
    return True


def _our_broker_pid(p: dict) -> Optional[int]:
    """The pid from our pid file if it is a live Kafka broker, else None."""
    pid = _read_pid(p)
    if pid and _alive(pid) and MAIN_CLASS in _cmdline(pid) and str(p["server"]) in _cmdline(pid):
        return pid
    return None


def _port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int, since: int = 0) -> str:
    """Last ``lines`` lines of ``path``, not looking before byte ``since``."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(since, size - max(lines, 1) * 400))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _log_says_started(path: Path, offset: int) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return STARTED_MARKER.encode() in f.read()
    except OSError:
        return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------

def _serves_sasl_ssl(p: dict) -> bool:
    """Whether the config the broker runs (or last ran) with has the SASL_SSL listener."""
    try:
        return "listeners=SASL_SSL://" in p["server"].read_text()
    except OSError:
        return False


def _info(p: dict, port: int, pid: int, already: bool) -> BrokerInfo:
    env = _read_client_env(p["client_env"]) if _serves_sasl_ssl(p) else None
    return BrokerInfo(pid=pid, port=port, bootstrap=bootstrap_servers(port),
                      version=kafka_version(), data_dir=str(p["data"]),
                      log_file=str(p["log"]), already_running=already, client_env=env)


def _wipe(p: dict) -> None:
    if p["data"].exists():
        _say(f"wiping {p['data']}")
        shutil.rmtree(p["data"], ignore_errors=True)
    p["cluster"].unlink(missing_ok=True)
    # the SCRAM user lived in the wiped storage; its certificate goes with it
    shutil.rmtree(p["tls"], ignore_errors=True)
    p["client_env"].unlink(missing_ok=True)


def start(port: Optional[int] = None, wipe: bool = False, timeout: float = 60.0,
          sasl_ssl: bool = False) -> BrokerInfo:
    """Start the broker (idempotent) and wait until it serves on ``port``: PLAINTEXT,
    or with ``sasl_ssl`` TLS and SCRAM (``BrokerInfo.client_env`` says how to connect)."""
    port = _port(port)
    version = kafka_version()
    p = _paths(port)

    pid = _our_broker_pid(p)
    if pid and wipe:
        stop(port=port, wipe=True)
        pid = None
    if pid and _serves_sasl_ssl(p) != sasl_ssl:
        running, wanted = ("SASL_SSL", "PLAINTEXT") if _serves_sasl_ssl(p) else ("PLAINTEXT", "SASL_SSL")
        raise BrokerError(f"the broker on port {port} runs {running}, not {wanted}: "
                          f"stop it first (`python -m streams.broker stop --port {port}`)")
    if pid:
        if _port_open(port):
            _say(f"already running (pid {pid}) on {bootstrap_servers(port)}")
            return _info(p, port, pid, True)
        # alive but not (yet) listening: maybe still starting up; give it time
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            if _port_open(port):
                return _info(p, port, pid, True)
            time.sleep(0.5)
        raise BrokerError(f"broker pid {pid} is alive but not listening on port {port}; "
                          f"try `python -m streams.broker stop`.\n{_tail(p['log'], 20)}")

    if _port_open(port) or _port_open(port + 1):
        raise BrokerError(f"port {port} or {port + 1} is already in use by another process; "
                          f"choose another with --port or STREAMREC_KAFKA_PORT")

    _java()
    fetch(version)

    if wipe:
        _wipe(p)
    listener = _prepare_sasl_ssl(p, port) if sasl_ssl else None
    _write_configs(p, port, listener)
    if not _is_formatted(p):
        if p["data"].exists() and any(p["data"].iterdir()):
            raise BrokerError(f"{p['data']} exists but has no meta.properties; "
                              f"start with --wipe to reformat it")
        _format_storage(p, version, listener)

    heap = os.environ.get("STREAMREC_KAFKA_HEAP") or DEFAULT_HEAP
    cmd = [_java(), f"-Xms{min(256, _heap_mb(heap))}m", f"-Xmx{heap}",
           "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
           "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
           # keep logging until Kafka's own shutdown hook has finished
           "-Dlog4j2.shutdownHookEnabled=false",
           f"-Dlog4j2.configurationFile={p['log4j'].resolve()}",
           "-cp", _classpath(version), MAIN_CLASS, str(p["server"])]
    with open(p["log"], "ab") as log:
        log.write(f"\n===== streamrec broker start {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
        offset = log.tell()
        proc = subprocess.Popen(cmd, cwd=p["dir"], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    p["pid"].write_text(f"{proc.pid}\n")
    _say(f"starting Kafka {version} (pid {proc.pid}) on {bootstrap_servers(port)}; log: {p['log']}")

    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        code = proc.poll()
        if code is not None:
            p["pid"].unlink(missing_ok=True)
            raise BrokerError(f"Kafka exited with code {code} during startup. "
                              f"Last log lines ({p['log']}):\n{_tail(p['log'], 20, offset)}")
        if _port_open(port) and _log_says_started(p["log"], offset):
            break
        if time.monotonic() > deadline:
            tail = _tail(p["log"], 20, offset)
            _terminate(proc.pid, grace=10)
            p["pid"].unlink(missing_ok=True)
            raise BrokerError(f"Kafka did not start within {timeout:.0f}s (stopped it). "
                              f"Last log lines ({p['log']}):\n{tail}")
        time.sleep(0.25)
    _say(f"ready in {time.monotonic() - t0:.1f}s")
    return _info(p, port, proc.pid, False)


def _heap_mb(heap: str) -> int:
    h = heap.strip().lower()
    try:
        if h.endswith("g"):
            return int(float(h[:-1]) * 1024)
        if h.endswith("m"):
            return int(h[:-1])
        return int(h) // (1024 * 1024)
    except ValueError:
        return 256


def _terminate(pid: int, grace: float = 30.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pid)
        if not _alive(pid):
            return
        time.sleep(0.25)
    _say(f"pid {pid} did not exit after {grace:.0f}s; sending SIGKILL")
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(40):
        _reap(pid)
        if not _alive(pid):
            return
        time.sleep(0.25)


def stop(wipe: bool = False, port: Optional[int] = None) -> bool:
    """Stop our broker (the pid in our pid file). Returns True if one was stopped."""
    port = _port(port)
    p = _paths(port)
    stopped = False
    pid = _read_pid(p)
    if pid and _alive(pid):
        if MAIN_CLASS in _cmdline(pid):
            _say(f"stopping broker pid {pid}")
            _terminate(pid, grace=30.0)
            stopped = True
        else:
            _say(f"pid file names pid {pid}, which is not a Kafka broker; not signalling it")
    elif pid:
        _say(f"stale pid file (pid {pid} not running)")
    else:
        _say("not running")
    p["pid"].unlink(missing_ok=True)
    if wipe:
        _wipe(p)
    return stopped


def status(port: Optional[int] = None) -> dict:
    port = _port(port)
    p = _paths(port)
    pid = _our_broker_pid(p)
    return {
        "running": bool(pid) and _port_open(port),
        "pid": pid,
        "port": port,
        "bootstrap": bootstrap_servers(port),
        "version": kafka_version(),
        "data_dir": str(p["data"]),
        "log_file": str(p["log"]),
        "security": "SASL_SSL" if _serves_sasl_ssl(p) else "PLAINTEXT",
    }


def logs(lines: int = 50, port: Optional[int] = None) -> str:
    return _tail(_paths(port)["log"], lines)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m streams.broker",
                                 description="Local single-node Kafka (KRaft) broker for streamrec.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, hlp in (("start", "start the broker (idempotent)"),
                      ("stop", "stop the broker"),
                      ("status", "show broker status"),
                      ("logs", "print the end of the broker log")):
        sp = sub.add_parser(name, help=hlp)
        sp.add_argument("--port", type=int, default=None,
                        help=f"broker port (default $STREAMREC_KAFKA_PORT or {DEFAULT_PORT})")
        if name in ("start", "stop"):
            sp.add_argument("--wipe", action="store_true", help="delete the broker's data dir")
        if name == "start":
            sp.add_argument("--timeout", type=float, default=60.0)
            sp.add_argument("--sasl-ssl", action="store_true",
                            help="serve SASL_SSL (TLS + SCRAM) instead of PLAINTEXT; the client "
                                 "settings go to client.env beside the data dir")
        if name == "logs":
            sp.add_argument("-n", "--lines", type=int, default=50)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "start":
            info = start(port=args.port, wipe=args.wipe, timeout=args.timeout,
                         sasl_ssl=args.sasl_ssl)
            print(info.bootstrap)
            if info.client_env:
                # the password stays in the file (mode 600), out of terminals and logs
                _say(f"SASL_SSL: clients connect with the settings in "
                     f"{_paths(info.port)['client_env']} (`source` it)")
        elif args.cmd == "stop":
            stop(wipe=args.wipe, port=args.port)
        elif args.cmd == "status":
            st = status(port=args.port)
            for k, v in st.items():
                print(f"{k}: {v}")
            return 0 if st["running"] else 3
        elif args.cmd == "logs":
            out = logs(lines=args.lines, port=args.port)
            if out:
                print(out)
    except BrokerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

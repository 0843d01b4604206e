"""The agent process against mosquitto with TLS and a password file.

Certificates are made here: a CA, a server certificate for 127.0.0.1/localhost
and one for another host name, all signed by that CA."""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent_harness import (MOSQUITTO, AgentProcess, LineWriter, Observer, Pty,
                           assert_exact, no_traceback, tiny_model, wait_until, write_config)
from conftest import Broker

x509 = pytest.importorskip("cryptography.x509", reason="the cryptography package makes the "
                                                       "test certificates")
from cryptography.hazmat.primitives import hashes, serialization   # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec           # noqa: E402
from cryptography.x509.oid import NameOID                          # noqa: E402

pytestmark = pytest.mark.skipif(
    not (os.path.exists(MOSQUITTO) and shutil.which("mosquitto_passwd")),
    reason="mosquitto and mosquitto_passwd are needed")

USER, PASSWORD = "agent", "Tls-Pa55-horse-7731"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(d: Path, stem: str, cert, key) -> tuple[Path, Path]:
    c, k = d / f"{stem}.pem", d / f"{stem}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption()))
    return c, k


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("tsad test CA"))
          .issuer_name(_name("tsad test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": _write(d, "ca", ca, ca_key)[0]}

    def server(stem: str, cn: str, sans: list,
               usage=x509.ExtendedKeyUsageOID.SERVER_AUTH) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        out[stem], out[stem + "_key"] = _write(d, stem, cert, key)

    server("server", "127.0.0.1", [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                   x509.DNSName("localhost")])
    server("other", "otherhost", [x509.DNSName("otherhost")])
    server("client", "tsad-agent", [x509.DNSName("tsad-agent")],
           usage=x509.ExtendedKeyUsageOID.CLIENT_AUTH)
    return out


def _tls_broker(d: Path, pki: dict, cert: str = "server", mutual: bool = False) -> Broker:
    d.mkdir()
    pw = d / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), USER, PASSWORD], check=True,
                   capture_output=True)
    root = "user root\n" if os.geteuid() == 0 else ""
    return Broker(d, extra_conf=(f"allow_anonymous false\npassword_file {pw}\n"
                                 f"cafile {pki['ca']}\ncertfile {pki[cert]}\n"
                                 f"keyfile {pki[cert + '_key']}\n{root}"
                                 + ("require_certificate true\n" if mutual else ""))).start()


@pytest.fixture
def run(tmp_path, pki):
    """Starts the agent against a broker with the given TLS/auth settings."""
    pty = Pty()
    started: list[AgentProcess] = []

    def start(port: int, password: str = PASSWORD, name: str = "a", streams=None,
              **tls) -> AgentProcess:
        pwf = tmp_path / f"{name}.pw"
        pwf.write_text(password + "\n")
        more = {} if streams is None else {"streams": streams(pty.path)}
        cfg = write_config(tmp_path / f"{name}.yaml", model=tiny_model(tmp_path),
                           port=port, serial_port=pty.path, state_dir=tmp_path / f"st-{name}",
                           log_level="debug",
                           mqtt={"username": USER, "password_file": str(pwf),
                                 "tls": {"ca_file": str(pki["ca"]), **tls}}, **more)
        a = AgentProcess(cfg, tmp_path / f"{name}.log").start()
        started.append(a)
        return a

    yield start, pty
    for a in started:
        a.close()
    pty.close()


def _broker_log(broker: Broker) -> str:
    return (broker.dir / "mosquitto.log").read_text(errors="replace")


def _attempts(broker: Broker) -> int:
    # a handshake the broker gave up on is logged as a failed connection, not a new one
    return _broker_log(broker).count("onnection from 127.0.0.1")


def test_tls_and_password_deliver_alerts(tmp_path, pki, run):
    start, pty = run
    b = _tls_broker(tmp_path / "mq", pki)
    obs = Observer(b.port, tls={"ca_certs": str(pki["ca"])}, auth=(USER, PASSWORD))
    try:
        obs.wait_subscribed()
        agent = start(b.port)
        agent.wait_log("open at")
        agent.wait_log("MQTT connected")
        w = LineWriter(pty)
        w.normal(20)
        expected = set(w.spikes(3))
        obs.wait_ids(expected)
        assert_exact(obs, expected)
        assert PASSWORD not in agent.log()
        no_traceback(agent)
    finally:
        obs.close()
        b.stop()


def test_wrong_password_logs_and_keeps_retrying(tmp_path, pki, run):
    start, _ = run
    b = _tls_broker(tmp_path / "mq", pki)
    wrong = "Wr0ng-Tls-Secret-9150"
    try:
        agent = start(b.port, password=wrong)
        agent.wait_log("refused the connection")
        line = next(ln for ln in agent.log().splitlines() if "refused the connection" in ln)
        assert "ERROR" in line and f"username '{USER}'" in line, line
        wait_until(lambda: _attempts(b) >= 3, "repeated connection attempts", timeout=30)
        assert agent.running(), agent.log()
        assert agent.count("refused the connection") == 1, "one line per problem, not per retry"
        assert wrong not in agent.log() and PASSWORD not in agent.log()
        assert "MQTT connected" not in agent.log()
        no_traceback(agent)
    finally:
        b.stop()


def test_a_refused_mqtt_source_says_so_once(tmp_path, pki, run):
    """The sink said a refused password once; each MQTT source said it at every retry
    (2 a minute at the 30 s backoff: 2,900 lines a day per source)."""
    start, _ = run
    b = _tls_broker(tmp_path / "mq", pki)
    streams = lambda port: [                                             # noqa: E731
        {"id": "pump", "source": {"type": "serial", "port": port, "baud": 115200,
                                  "protocol": "csv", "timestamp": "first"}},
        {"id": "dev", "source": {"type": "mqtt", "topic": "plant/dev", "protocol": "csv"}}]
    try:
        agent = start(b.port, password="Wr0ng-Tls-Secret-9150", streams=streams)
        agent.wait_log("dev: broker")
        wait_until(lambda: _attempts(b) >= 6, "repeated connection attempts", timeout=40)
        assert agent.running(), agent.log()
        assert agent.count("dev: broker") == 1, agent.log()
        no_traceback(agent)
    finally:
        b.stop()


def test_tls_client_refuses_plaintext_listener(tmp_path, run):
    start, _ = run
    (tmp_path / "plain").mkdir()
    b = Broker(tmp_path / "plain").start()          # anonymous, no TLS
    obs = Observer(b.port)
    try:
        obs.wait_subscribed()
        agent = start(b.port)
        agent.wait_log("plaintext listener?")
        wait_until(lambda: _attempts(b) >= 3, "repeated TLS attempts", timeout=30)
        assert "MQTT connected" not in agent.log()
        assert b"online" not in obs.availability()
        assert agent.running()
        no_traceback(agent)
    finally:
        obs.close()
        b.stop()


def test_hostname_verification(tmp_path, pki, run):
    start, _ = run
    b = _tls_broker(tmp_path / "mq", pki, cert="other")     # valid chain, wrong name
    try:
        strict = start(b.port, name="strict")
        strict.wait_log("broker certificate rejected")
        assert "IP address mismatch" in strict.log(), strict.log()
        wait_until(lambda: _broker_log(b).count("bad certificate") >= 2,
                   "repeated attempts the agent broke off", timeout=30)
        assert "MQTT connected" not in strict.log()
        strict.close()
        # the same chain with name checking off connects: the name was the only problem
        lax = start(b.port, name="lax", verify_hostname=False)
        lax.wait_log("MQTT connected")
        no_traceback(lax)
    finally:
        b.stop()


def test_unreadable_credentials_stop_the_start_clearly(tmp_path, pki):
    pty = Pty()
    try:
        for name, mqtt, says in (
                ("nopw", {"username": USER, "password_file": str(tmp_path / "missing.pw")},
                 "mqtt.password_file: cannot read"),
                ("noca", {"tls": {"ca_file": str(tmp_path / "missing-ca.pem")}},
                 "mqtt.tls.ca_file: cannot read")):
            cfg = write_config(tmp_path / f"{name}.yaml", model=tiny_model(tmp_path),
                               port=1883, serial_port=pty.path, state_dir=tmp_path / name,
                               mqtt=mqtt)
            a = AgentProcess(cfg, tmp_path / f"{name}.log").start()
            assert a.proc.wait(30) == 2
            assert says in a.log(), a.log()
            no_traceback(a)
    finally:
        pty.close()


def test_mutual_tls_takes_the_client_key_as_a_systemd_credential(tmp_path, pki, run,
                                                                 monkeypatch):
    """The unit's transient user cannot read a key only root may; systemd hands it over
    as a credential (LoadCredential=client.key:/etc/tsad-agent/client.key)."""
    start, pty = run
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "client.key").write_bytes(pki["client_key"].read_bytes())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    b = _tls_broker(tmp_path / "mq", pki, mutual=True)
    obs = Observer(b.port, tls={"ca_certs": str(pki["ca"]), "certfile": str(pki["client"]),
                                "keyfile": str(pki["client_key"])}, auth=(USER, PASSWORD))
    try:
        obs.wait_subscribed()
        agent = start(b.port, cert_file=str(pki["client"]), key_credential="client.key")
        agent.wait_log("MQTT connected")
        w = LineWriter(pty)
        w.normal(20)
        expected = set(w.spikes(2))
        obs.wait_ids(expected)
        no_traceback(agent)
    finally:
        obs.close()
        b.stop()


def test_the_tls_file_that_cannot_be_read_is_the_one_named(tmp_path, pki, monkeypatch):
    from agent.config import ConfigError
    from agent.mqtt_client import TlsConfig, tls_files
    missing = str(tmp_path / "nope.key")
    with pytest.raises(ConfigError, match=f"mqtt.tls.key_file: cannot read '{missing}'"):
        tls_files(TlsConfig(ca_file=str(pki["ca"]), cert_file=str(pki["client"]),
                            key_file=missing))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(ConfigError, match="mqtt.tls.key_credential: cannot read"):
        tls_files(TlsConfig(ca_file=str(pki["ca"]), cert_file=str(pki["client"]),
                            key_credential="client.key"))
    with pytest.raises(ValueError, match="not both"):
        TlsConfig(ca_file="a", cert_file="b", key_file="c", key_credential="d")

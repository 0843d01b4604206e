"""The broker connection: its settings (the config's `mqtt:` section) and the one place
that builds a configured paho-mqtt client (v2 callback API) from them.

Shared by the MQTT source and the MQTT sink so TLS, credentials and client ids
behave the same way for both.  The clients read the socket in blocks of
`mqtt.read_bytes` (`BufferedClient`; 0: paho's own reads): paho alone pays a few system
calls for every packet.
"""
from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path
from typing import Annotated

import paho.mqtt.client as mqtt
from msgspec import Meta

from .config_base import ConfigError, NonNegativeFloat, PositiveFloat, Strict


class TlsConfig(Strict):
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    # the client key as a systemd credential (LoadCredential=NAME:/etc/...): the unit's
    # transient user can read no file that only root may, and a key must stay private
    key_credential: str | None = None
    verify_hostname: bool = True

    def __post_init__(self):
        if self.key_file and self.key_credential:
            raise ValueError("give key_file or key_credential, not both")
        if self.key_credential and not self.cert_file:
            raise ValueError("key_credential is the key of cert_file: give cert_file too")


class HomeAssistantConfig(Strict):
    enabled: bool = False
    discovery_prefix: str = "homeassistant"
    # how long the per-stream "shelve" button shelves (a week at most, as for any shelve)
    shelve_s: Annotated[float, Meta(gt=0, le=7 * 24 * 3600)] = 3600.0


class MqttConfig(Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 1883
    client_id: str | None = None
    username: str | None = None
    # exactly one way to give the password; it never appears in logs
    password_file: str | None = None
    password_env: str | None = None
    password_credential: str | None = None    # name under $CREDENTIALS_DIRECTORY (systemd)
    tls: TlsConfig | None = None
    prefix: str | None = None                  # default "tsad/<node>/"
    keepalive: Annotated[int, Meta(ge=5)] = 30
    # read the socket this many bytes at a time (BufferedClient); 0: paho reads each packet
    read_bytes: Annotated[int, Meta(ge=0, le=1 << 20)] = 16384
    score_interval_s: NonNegativeFloat = 1.0
    health_interval_s: PositiveFloat = 30.0
    # a stream is "online" while its source is connected and its last sample is younger
    # (than this, or than 3 of its intervals when longer: agent/staleness.py)
    stale_after_s: PositiveFloat = 60.0
    homeassistant: HomeAssistantConfig = HomeAssistantConfig()

    def __post_init__(self):
        given = [k for k in ("password_file", "password_env", "password_credential")
                 if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give at most one of password_file, password_env, "
                             f"password_credential (got {', '.join(given)})")


def resolve_password(m: MqttConfig) -> str | None:
    """The MQTT password from file, environment or systemd credential; never logged."""
    if m.password_file:
        return _secret(Path(m.password_file), f"mqtt.password_file: cannot read {m.password_file!r}")
    if m.password_env:
        v = os.environ.get(m.password_env)
        if v is None:
            raise ConfigError([f"mqtt.password_env: environment variable {m.password_env!r} is not set"])
        return v
    if m.password_credential:
        return _secret(_credential(m.password_credential, "mqtt.password_credential"),
                       f"mqtt.password_credential: cannot read credential {m.password_credential!r}")
    return None


def _credential(name: str, key: str) -> Path:
    d = os.environ.get("CREDENTIALS_DIRECTORY")
    if not d:
        raise ConfigError([f"{key}: $CREDENTIALS_DIRECTORY is not set (use LoadCredential= "
                           "in the systemd unit)"])
    return Path(d) / name


def tls_files(tls: TlsConfig) -> tuple[str, str | None, str | None]:
    """(ca, cert, key) paths, each one readable: ConfigError naming the one that is not
    (ssl's own error does not say which of the three it could not open)."""
    key = str(_credential(tls.key_credential, "mqtt.tls.key_credential")) \
        if tls.key_credential else tls.key_file
    for name, path in (("ca_file", tls.ca_file), ("cert_file", tls.cert_file),
                       ("key_credential" if tls.key_credential else "key_file", key)):
        if path is not None:
            try:
                open(path, "rb").close()
            except OSError as e:
                raise ConfigError([f"mqtt.tls.{name}: cannot read {path!r}: {e.strerror}"]) from None
    return tls.ca_file, tls.cert_file, key


def _secret(path: Path, where: str) -> str:
    try:
        return path.read_bytes().decode("utf-8").strip()
    except OSError as e:
        raise ConfigError([f"{where}: {e.strerror}"]) from None
    except UnicodeDecodeError:
        # the decoder's message quotes a byte of the secret and where it is
        raise ConfigError([f"{where}: not UTF-8 text"]) from None


class BufferedClient(mqtt.Client):
    """paho's client, reading the socket up to `read_bytes` at a time (`mqtt.read_bytes`).

    paho reads each packet with three recv calls (its type byte, its length byte, its
    body) and selects before each packet.  At thousands of small sensor messages a
    second those system calls cost more than paho's handling of the messages
    (benchmarks/bench_ingest.py --bare-buffered).  Here the socket is read in blocks
    and paho takes its bytes from memory.  The default since the memory it seemed to cost
    was traced to the learning buffers (baseline._unheaped): 50 x 100 one-sample messages
    a second at 1.25x a bare subscriber's CPU against 1.67x with paho's reads
    (docs/RESULTS.md, fourteenth session).  Rules:
    - Nothing waits in the buffer: after a read, every packet it holds is handled
      before paho selects on the socket again (`loop_read`), so a message never waits
      for the next network event.
    - The buffer belongs to one socket: bytes of a lost connection are never read as
      the next connection's.
    - One buffer for the client's life, read into: no allocation per read.
    - A read that would block, a closed connection and TLS's want-read/want-write reach
      paho as from its own read.  A transport without recv_into (websockets), and a
      body larger than the buffer, are read by paho itself.
    """

    def __init__(self, *args, read_bytes: int = 16384, **kwargs):
        super().__init__(*args, **kwargs)
        self._rmem = memoryview(bytearray(read_bytes))
        self._rlen = self._rpos = 0
        self._rsock = None

    def _sock_recv(self, bufsize: int) -> bytes:
        sock = self._sock
        if self._rsock is not sock:
            self._rlen = self._rpos = 0
            self._rsock = sock
        pos = self._rpos
        if pos >= self._rlen:
            into = getattr(sock, "recv_into", None)
            if into is None or bufsize >= len(self._rmem):
                return super()._sock_recv(bufsize)
            try:
                n = into(self._rmem)
            except ssl.SSLWantReadError as err:
                raise BlockingIOError() from err
            except ssl.SSLWantWriteError as err:
                self._call_socket_register_write()
                raise BlockingIOError() from err
            if n == 0:
                return b""          # the broker closed the connection
            self._rlen, pos = n, 0
        end = min(pos + bufsize, self._rlen)
        self._rpos = end
        return bytes(self._rmem[pos:end])

    def buffered(self) -> int:
        """Bytes read from the current socket that paho has not taken yet."""
        return self._rlen - self._rpos if self._rsock is self._sock else 0

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        # paho handles one packet per call; each call takes at least a byte of the
        # buffer, so this ends with the buffer empty, or with an error (buffered() is 0
        # once the socket is gone)
        rc = super().loop_read(max_packets)
        while rc == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS and self.buffered():
            rc = super().loop_read(max_packets)
        return rc


def make_client(cfg: MqttConfig, node: str, role: str,
                clean_session: bool = False) -> mqtt.Client:
    """The agent's connections keep their broker session (clean_session False: QoS 1
    messages wait for them across reconnects); a one-shot client (the command verbs)
    asks for a clean one so that it leaves nothing behind in the broker."""
    client_id = f"{cfg.client_id or 'tsad-' + node}-{role}"
    args = {"callback_api_version": mqtt.CallbackAPIVersion.VERSION2, "client_id": client_id,
            "protocol": mqtt.MQTTv311, "clean_session": clean_session}
    c = BufferedClient(read_bytes=cfg.read_bytes, **args) if cfg.read_bytes else \
        mqtt.Client(**args)
    if cfg.username:
        c.username_pw_set(cfg.username, resolve_password(cfg))
    if cfg.tls:
        # TLS configured means TLS only: paho never falls back to plaintext once set.
        ca, cert, key = tls_files(cfg.tls)
        try:
            c.tls_set(ca_certs=ca, certfile=cert, keyfile=key, cert_reqs=ssl.CERT_REQUIRED,
                      tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise ConfigError([f"mqtt.tls: cannot load ca_file {cfg.tls.ca_file!r}"
                               + (f" / cert_file {cfg.tls.cert_file!r}" if cfg.tls.cert_file
                                  else "") + f": {e}"]) from None
        c.tls_insecure_set(not cfg.tls.verify_hostname)
    c.reconnect_delay_set(min_delay=1, max_delay=30)
    return c


def tls_problem(cfg: MqttConfig, timeout: float = 3.0) -> str | None:
    """Why a TLS connection to the broker fails, from one handshake of our own, or
    None when it succeeds, TLS is off, or the broker is simply not reachable.
    paho's reconnect loop swallows the exception, and "certificate verify failed:
    IP address mismatch" is what an operator needs to read, not "unreachable"."""
    if not cfg.tls:
        return None
    try:
        ca, cert, key = tls_files(cfg.tls)
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
    except ConfigError as e:
        return e.problems[0]
    except (OSError, ssl.SSLError) as e:
        return f"TLS files unusable: {e}"
    ctx.check_hostname = cfg.tls.verify_hostname
    try:
        with socket.create_connection((cfg.host, cfg.port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=cfg.host):
                return None
    except ssl.SSLCertVerificationError as e:
        return f"TLS: broker certificate rejected: {str(e.verify_message).rstrip('.')}"
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
        return f"TLS handshake failed ({e}): is this port a plaintext listener?"
    except OSError:
        return None

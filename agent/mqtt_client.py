"""One place that builds a configured paho-mqtt client (v2 callback API).

Shared by the MQTT source and the MQTT sink so TLS, credentials and client ids
behave the same way for both.
"""
from __future__ import annotations

import socket
import ssl

import paho.mqtt.client as mqtt

from .config import ConfigError, MqttConfig, resolve_password


def make_client(cfg: MqttConfig, node: str, role: str) -> mqtt.Client:
    client_id = f"{cfg.client_id or 'tsad-' + node}-{role}"
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv311, clean_session=False)
    if cfg.username:
        c.username_pw_set(cfg.username, resolve_password(cfg))
    if cfg.tls:
        # TLS configured means TLS only: paho never falls back to plaintext once set.
        try:
            c.tls_set(ca_certs=cfg.tls.ca_file, certfile=cfg.tls.cert_file,
                      keyfile=cfg.tls.key_file, cert_reqs=ssl.CERT_REQUIRED,
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
        ctx = ssl.create_default_context(cafile=cfg.tls.ca_file)
        if cfg.tls.cert_file:
            ctx.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
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

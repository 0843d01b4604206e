"""One place that builds a configured paho-mqtt client (v2 callback API).

Shared by the MQTT source and the MQTT sink so TLS, credentials and client ids
behave the same way for both.
"""
from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt

from .config import MqttConfig, resolve_password


def make_client(cfg: MqttConfig, node: str, role: str) -> mqtt.Client:
    client_id = f"{cfg.client_id or 'tsad-' + node}-{role}"
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv311, clean_session=False)
    if cfg.username:
        c.username_pw_set(cfg.username, resolve_password(cfg))
    if cfg.tls:
        # TLS configured means TLS only: paho never falls back to plaintext once set.
        c.tls_set(ca_certs=cfg.tls.ca_file, certfile=cfg.tls.cert_file,
                  keyfile=cfg.tls.key_file, cert_reqs=ssl.CERT_REQUIRED,
                  tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.tls_insecure_set(not cfg.tls.verify_hostname)
    c.reconnect_delay_set(min_delay=1, max_delay=30)
    return c

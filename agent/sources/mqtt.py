"""MQTT source: samples published by devices or gateways on a topic filter.

One subscription may feed several streams: with `stream_from_topic: 1`,
`plant/+/sensors` turns `plant/pump1/sensors` into stream `pump1`.  The paho
network thread only stamps each message with its arrival time and emits it
undecoded; the pipeline thread decodes each tick's messages per stream at once
(`decode`, rules in sources/base.py).  An absent broker at start is not fatal
(connect_async + paho's own reconnect), and the subscription is renewed on
every connect.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Annotated, Literal

import paho.mqtt.client as paho
from msgspec import Meta

from ..config_base import (STREAM_ID_RE, KeyProblem, NonNegativeInt, PositiveInt,
                           SourceConfig)
from ..decoders import MAX_PAYLOAD, LineDecoder
from ..metrics import Metrics
from ..mqtt_client import MqttConfig, make_client
from .base import Batch, Emit, Source, Undecoded

log = logging.getLogger("tsad.source.mqtt")

TOPICS_CACHED = 4096     # topic -> stream id lookups remembered (then forgotten at once)


class _Oversize(bytes):
    """The head of a payload over MAX_PAYLOAD, for the log line: such a payload is refused
    on the network thread, so a flood of them cannot fill the queue's memory."""


class MqttSourceConfig(SourceConfig, tag="mqtt"):
    topic: Annotated[str, Meta(min_length=1)]    # may hold + and # wildcards
    # 0-based topic level that names the stream ("plant/+/sensors" -> 1); None: the stream id
    stream_from_topic: NonNegativeInt | None = None
    protocol: Literal["csv", "json"] = "json"
    qos: Literal[0, 1, 2] = 1
    # streams this subscription may create (stream_from_topic); the rest are refused
    max_streams: PositiveInt = 256

    def __post_init__(self):
        # paho refuses a bad filter only on its network thread, which then dies: the
        # source would sit disconnected with nothing counted, so it is a config error here
        if problem := topic_filter_problem(self.topic):
            raise KeyProblem("topic", problem)


def topic_filter_problem(topic: str) -> str | None:
    """Why `topic` is not an MQTT topic filter (MQTT 3.1.1 section 4.7), or None."""
    if len(topic.encode("utf-8", "surrogatepass")) > 65535:
        return "longer than MQTT's 65,535 bytes"
    if "\0" in topic:
        return "holds a NUL character"
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level, the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


class MqttLineSource(Source):
    type = "mqtt"
    config_class = MqttSourceConfig

    def __init__(self, stream_id: str, cfg: MqttSourceConfig, channels: list[str],
                 metrics: Metrics, mqtt: MqttConfig, node: str):
        super().__init__()
        self.stream_id = stream_id
        self.cfg = cfg
        self.mqtt = mqtt
        self.decoder = LineDecoder(channels, cfg.protocol, "auto", metrics, f"mqtt:{stream_id}")
        self._client = make_client(mqtt, node, role=f"src-{stream_id}")
        self._emit: Emit | None = None
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._started = False
        self._refused: str | None = None    # the refusal last logged (once per reason)
        self._topics: dict[str, str] = {}     # topic -> its stream id, once derived

    @classmethod
    def from_config(cls, stream_id, cfg, channels, metrics, broker, node) -> "MqttLineSource":
        return cls(stream_id, cfg, channels, metrics, broker, node)

    def run(self, emit: Emit, stop: threading.Event) -> None:
        self._emit = emit
        self._client.connect_async(self.mqtt.host, self.mqtt.port, keepalive=self.mqtt.keepalive)
        self._client.loop_start()
        self._started = True
        stop.wait()

    def close(self) -> None:
        # first: the disconnect below is a clean stop, not one to warn about (_on_disconnect)
        self.connected = False
        if self._started:
            self._started = False
            self._client.disconnect()
            self._client.loop_stop()

    def stream_for(self, topic: str) -> str | None:
        """The stream id a message on `topic` belongs to; None if it cannot be derived."""
        if self.cfg.stream_from_topic is None:
            return self.stream_id
        levels = topic.split("/")
        if self.cfg.stream_from_topic >= len(levels):
            return None
        sid = levels[self.cfg.stream_from_topic]
        return sid if STREAM_ID_RE.match(sid) else None

    # ------------------------------------------------------------ paho callbacks
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            # once per reason, not at every retry (a rotated password: 2,900 lines a day)
            if str(reason_code) != self._refused:
                self._refused = str(reason_code)
                log.error("%s: broker %s:%d refused the connection: %s; retrying with backoff "
                          "(said once; the next line is the subscription)", self.stream_id,
                          self.mqtt.host, self.mqtt.port, reason_code)
            self.connected = False
            return
        self._refused = None
        client.subscribe(self.cfg.topic, qos=self.cfg.qos)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        # connected means "receiving": only a granted subscription counts
        if any(rc.is_failure for rc in reason_codes):
            log.error("%s: broker refused the subscription to %r (ACL?): %s", self.stream_id,
                      self.cfg.topic, reason_codes)
            self.connected = False
            return
        self.connected = True
        log.info("%s: subscribed to %r on %s:%d", self.stream_id, self.cfg.topic,
                 self.mqtt.host, self.mqtt.port)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected:
            self.disconnects += 1
            log.warning("%s: disconnected from broker (%s); paho reconnects", self.stream_id,
                        reason_code)
        self.connected = False

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        # an exception escaping a paho callback would stop the network loop
        try:
            payload = msg.payload
            if len(payload) > MAX_PAYLOAD:
                payload = _Oversize(payload[:80])
            self._emit(Undecoded(self, msg.topic, payload, time.time()))
        except Exception:
            log.exception("%s: message on %r could not be handled", self.stream_id, msg.topic)

    def decode(self, items: list[Undecoded]) -> list[Batch]:
        """The messages of each stream decoded together, in order (one Batch per stream)."""
        groups: dict[str, tuple[list[bytes], list[float]]] = {}
        topics = self._topics
        for m in items:
            if type(m.payload) is _Oversize:
                self.decoder.bad("too_long", m.payload)
                continue
            sid = topics.get(m.topic)
            if sid is None:
                sid = self.stream_for(m.topic)
                if sid is None:
                    self.decoder.bad("bad_stream_id", m.topic)
                    continue
                if len(topics) >= TOPICS_CACHED:
                    topics.clear()
                topics[m.topic] = sid
            g = groups.get(sid)
            if g is None:
                g = groups[sid] = ([], [])
            g[0].append(m.payload)
            g[1].append(m.arrival)
        arrived = time.monotonic()      # decoded on the pipeline thread as its step begins
        return [Batch(sid, ts, values, self.stream_id, arrived)
                for sid, ts, values in self.decoder.decode_streams(groups)]

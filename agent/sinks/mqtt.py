"""MQTT sink: alerts (durable, in order, at least once), stream states, scores,
health, availability, Home Assistant device discovery, and the operator command channel.

Topics (P = cfg.topic_prefix, default "tsad/<node>/"); JSON payloads follow docs/schemas/:
  P alerts                  every alert event (alert.json)        QoS 1, not retained
  P availability            "online" / "offline"                 QoS 1, retained; "offline" is the Last Will
  P stream/<id>/...         state, availability, shelved, alert (mqtt_streams.py)   QoS 1, retained
  P stream/<id>/score       score.json, <= 1 per score_interval_s  QoS 0, not retained
  P health                  health.json (+ this sink's "mqtt")   QoS 1, retained
  P cmd                     operator commands in (command.json)  QoS 1, subscribed
  P cmd/result              one result per command (command-result.json)  QoS 1, not retained
  <discovery_prefix>/device/<node>/config   Home Assistant device discovery (homeassistant.py)

Commands (mqtt_commands.py): each message on P cmd goes to the attached pipeline; its
result goes out on P cmd/result.  The subscription lives in the sink's persistent
session, so a command sent while the agent is away is carried out when it is back.

Alert delivery: alert() writes the event to the sink's own Outbox
(state_dir/outbox.sqlite; in memory without a state_dir) and returns; a sender
thread hands the oldest rows to paho (at most WINDOW unacknowledged) and deletes
each row when its PUBACK arrives.  Rows still in the outbox at exit are sent
again by the next run, so delivery is at least once and consumers keep one record
per alert id, updated by each event.  Order is kept across outages: after a reconnect
paho first resends its unacknowledged copies in their original order, and new rows are
handed over only once the broker has acknowledged this connection's "online" message,
which it can only do after those resends went out.  The outbox also keeps events the disk
refused (in memory, bounded), and the sender publishes those the same way.

Open alerts: the outbox records each alert between its new and its end, and the stream's
last sample time every PERSIST_S at most (from the sender thread: the score blocks only
update a dict).  A run that finds records left behind (the previous one was killed) sends
an "end" for each, with "reason": "restart" and "end" = the last sample time known.

TLS: when mqtt.tls is set the client speaks TLS only (see make_client); there is
no plaintext fallback.  Credentials never appear in log lines.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt

from ..timestamps import iso_utc
from ..metrics import Metrics
from ..mqtt_client import make_client, tls_problem
from ..outbox import Outbox
from .base import Sink, to_json
from .mqtt_commands import CommandChannel
from .mqtt_streams import StreamTopics

if TYPE_CHECKING:   # the config module builds its sinks section from this package
    from ..config import AgentConfig

log = logging.getLogger(__name__)

WINDOW = 32      # alert rows handed to paho but not yet acknowledged
FLUSH_S = 2.0    # how long a clean stop may spend delivering queued alerts
SHORT_S, SHORT_RUN = 10.0, 3   # connections shorter than this, this many in a row: flapping
PERSIST_S = 10.0  # how often open alerts' last sample time is written (alerts.update_interval_s's default)


def outbox_path(cfg: AgentConfig) -> str:
    # Without a state dir the outbox lives in memory: alerts survive outages, not restarts.
    return str(Path(cfg.state_dir) / "outbox.sqlite") if cfg.state_dir else ":memory:"


def _acked(info: mqtt.MQTTMessageInfo | None) -> bool:
    try:
        return info is not None and info.is_published()
    except (RuntimeError, ValueError):     # never queued: it will never be acknowledged
        return False


class MqttSink(Sink):
    @classmethod
    def from_config(cls, cfg: AgentConfig, metrics: Metrics) -> "MqttSink | None":
        return cls(cfg, metrics) if cfg.mqtt.enabled else None

    def __init__(self, cfg: AgentConfig, metrics: Metrics, outbox: str | None = None) -> None:
        """`outbox`: the file (default: outbox_path(cfg)); OutboxError when unwritable."""
        self.cfg, self.m, self.metrics = cfg, cfg.mqtt, metrics
        p = cfg.topic_prefix
        self.t_alerts, self.t_avail, self.t_health = p + "alerts", p + "availability", p + "health"
        self.client = make_client(cfg.mqtt, cfg.node, role="sink")
        # The will must be registered before the first CONNECT to be part of it.
        self.client.will_set(self.t_avail, "offline", qos=1, retain=True)
        # Unlimited in paho: our WINDOW bounds alerts, and a paho-side queue would let
        # a fresh publish overtake older queued ones.
        self.client.max_inflight_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = lambda *a: self._wake.set()
        self.client.on_message = self._on_message
        self.streams = StreamTopics(cfg, self.client)
        self.commands = CommandChannel(self.client, p)
        self._health: dict | None = None
        self._last_score: dict[str, float] = {}
        self._wake = threading.Event()
        self._stopping = self._closed = False
        self._gate: mqtt.MQTTMessageInfo | None = None    # this connection's "online"
        self._republish = False     # retained values due once the gate is acknowledged
        self._inflight: dict[int, mqtt.MQTTMessageInfo] = {}
        self._last_handed = 0
        self._problem: str | None = None
        self._was_connected = False
        self._up_since, self._short = 0.0, 0     # this connection's start; short ones in a row
        self.disconnects = 0        # connections lost (health, tsad_mqtt_disconnects_total)
        self.connect_failures = 0
        self._thread: threading.Thread | None = None
        self._open: dict[str, str] = {}          # stream -> its open alert's id
        self._last_ts: dict[str, float] = {}     # stream -> newest sample time
        self._touched = 0.0
        # last: a client that cannot be built (TLS files) must not leave the file open
        self.outbox = Outbox(outbox or outbox_path(cfg), metrics=metrics)
        self._carried: set[str] = set()

    def carry(self, open_ids: set[str], ended: list[dict]) -> None:
        self._carried = set(open_ids)
        for ev in ended:
            self.streams.open[ev["stream"]] = to_json(ev).encode()

    def _end_left_open(self) -> None:
        """Alerts a killed run left open get their end (reason "restart"); those the engine
        holds across a reload (_carried) stay open: an end was followed by a second one."""
        for aid, topic, payload, last_ts in self.outbox.left_open():
            ev = json.loads(payload)
            if aid in self._carried:
                self._open[ev.get("stream")] = aid
                self.streams.alert(ev.get("stream"), payload, False)
                continue
            ev.update(type="end", reason="restart",
                      end=iso_utc(last_ts) if last_ts is not None else ev.get("start"))
            log.warning("alert %s of stream %s was open when the agent last stopped without "
                        "ending it: sending its end (reason restart, last sample %s)",
                        aid, ev.get("stream"), ev["end"])
            self.outbox.put(topic, to_json(ev).encode(), "end", alert_id=aid)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._end_left_open()
        self._thread = threading.Thread(target=self._run, name="mqtt-sink", daemon=True)
        self._thread.start()
        # Asynchronous: an absent broker is retried in the background while
        # alerts accumulate in the outbox.
        self.client.connect_async(self.m.host, self.m.port, keepalive=self.m.keepalive)
        self.client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish "offline" (waiting up to timeout for the broker to have it),
        disconnect and close the outbox.  A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        # While the broker is there, what is queued goes out first (bounded), among it
        # the "end" events of alerts the stop itself closed; the rest waits in the
        # outbox for the next run.
        until = time.monotonic() + min(FLUSH_S, timeout)
        while self.client.is_connected() and self.outbox.depth() and time.monotonic() < until:
            self._wake.set()
            time.sleep(0.02)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.client.is_connected():
            self.streams.offline()      # sent in order: waiting for the node's waits for these
            info = self.client.publish(self.t_avail, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass    # connection gone meanwhile: the will says "offline" instead
            self._settle()
        self.client.disconnect()
        self.client.loop_stop()
        self.outbox.close()

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    # ------------------------------------------------------------ events
    def alert(self, alert: dict) -> None:
        kind, stream = str(alert.get("type", "?")), alert.get("stream")
        if kind == "end":
            self._open.pop(stream, None)
        else:
            self._open[stream] = alert.get("id")
        event = to_json(alert).encode()
        self.outbox.put(self.t_alerts, event, kind, alert_id=alert.get("id"),
                        last_ts=self._last_ts.get(stream))
        # one that ended unacknowledged stays retained until acked (its end again, acked)
        self.streams.alert(stream, event, kind == "end" and bool(alert.get("acknowledged")))
        self._wake.set()

    def scores(self, stream: str, ts, scores, threshold: float, labels, alert_open) -> None:
        if len(ts):
            self._last_ts[stream] = float(ts[-1])
        super().scores(stream, ts, scores, threshold, labels, alert_open)

    def state(self, stream: str, state: str) -> None:
        self.streams.state(stream, state)

    def stream_status(self, stream: str, status: dict) -> None:
        self.streams.stream_status(stream, status)

    def shows(self, stream: str) -> bool:
        return stream in self.streams.known       # a set's `in` is atomic: no lock needed

    def attach(self, cfg, command, departures=None) -> None:
        self.streams.attach(cfg, departures)
        self.commands.command = command

    def evicted(self, streams: list[str]) -> None:
        # an evicted stream has no open alert, and its next score is due whenever it returns
        for sid in streams:
            self._last_ts.pop(sid, None)
            self._last_score.pop(sid, None)

    def forget(self, streams: list[str]) -> None:
        self.evicted(streams)
        self.streams.forget(streams)

    def score(self, stream: str, ts: float, score: float, threshold: float, label: int) -> None:
        now = time.monotonic()
        last = self._last_score.get(stream)
        if last is not None and now - last < self.m.score_interval_s:
            return
        if not self.client.is_connected():
            return      # scores are live values: nothing to catch up on later
        self._last_score[stream] = now
        self.client.publish(f"{self.cfg.topic_prefix}stream/{stream}/score",
                            to_json({"ts": iso_utc(ts), "score": score, "threshold": threshold,
                                     "label": label}), qos=0, retain=False)

    def health(self, health: dict) -> None:
        self._health = health
        if self.client.is_connected() and not self._republish:
            self._pub_health()

    def _pub_health(self) -> None:
        doc = dict(self._health or {})
        doc["mqtt"] = {"connected": self.client.is_connected(), "disconnects": self.disconnects,
                       "queued": self.outbox.depth(),
                       "dropped": self.metrics.dropped.get("outbox_full", 0),
                       "outbox": self.outbox.state(),
                       "commands": self.commands.counts()}
        self.client.publish(self.t_health, to_json(doc), qos=1, retain=True)

    # ------------------------------------------------------------ paho callbacks (network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._report(logging.ERROR,
                         f"MQTT broker {self.m.host}:{self.m.port} refused the connection: "
                         f"{reason_code} (username {self.m.username!r}); check mqtt.username "
                         f"and the password source; retrying with backoff")
            self.connect_failures += 1
            return
        self._problem = None
        self._was_connected, self._up_since = True, time.monotonic()
        if self._short < SHORT_RUN:
            log.info("MQTT connected to %s:%d as %s (%d alert events queued)", self.m.host,
                     self.m.port, self.m.username or "anonymous", self.outbox.depth())
        self._gate = client.publish(self.t_avail, "online", qos=1, retain=True)
        client.subscribe(self.commands.t_cmd, qos=1)
        self._republish = True      # the sender does it once the gate is acknowledged
        self._wake.set()

    def _on_connect_fail(self, client, userdata) -> None:
        # paho does not say why; with TLS on, one handshake of our own does
        why = tls_problem(self.m)
        if why:
            self._report(logging.ERROR,
                         f"MQTT broker {self.m.host}:{self.m.port}: {why} -- not connecting "
                         f"(TLS only, no plaintext fallback); alerts are kept in the outbox; "
                         f"retrying")
        else:
            self._report(logging.WARNING,
                         f"MQTT broker {self.m.host}:{self.m.port} unreachable (network or TLS "
                         f"error); alerts are kept in the outbox and sent when it is back")
        self.connect_failures += 1

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.streams.on_disconnect()
        if self._was_connected and not self._stopping:
            self._was_connected = False
            self.disconnects += 1
            if self._flapping(client):
                return
            self._report(logging.WARNING, f"MQTT connection to {self.m.host}:{self.m.port} lost "
                                          f"({reason_code}); reconnecting")

    def _flapping(self, client) -> bool:
        """A broker that closes each connection soon after accepting it (a message over its
        max_packet_size, an ACL that disconnects, a second client with this id) had the
        agent reconnect every second, logging two lines each time; such connections now
        back off as failed ones do, and are logged once.  True: this loss is not logged."""
        if time.monotonic() - self._up_since >= SHORT_S:
            return False
        self._short += 1
        client.reconnect_delay_set(min_delay=min(2 ** self._short, 30), max_delay=30)
        if self._short == SHORT_RUN:
            log.error("MQTT broker %s:%d closed the connection within %g s of accepting it %d "
                      "times in a row: a message over its max_packet_size (the Home Assistant "
                      "discovery message grows with the streams), an ACL that disconnects on "
                      "a refused publish, or another client with this client id (two agents "
                      "with one node name); alerts wait in the outbox; backing off, up to 30 s "
                      "between tries; said once", self.m.host, self.m.port, SHORT_S, SHORT_RUN)
        return self._short >= SHORT_RUN

    def _steady(self) -> None:
        """A connection up for SHORT_S ends a run of short ones (sender thread): said when
        it was named, so that the journal's last word is not the broker dropping us."""
        if (self._short and self.client.is_connected()
                and time.monotonic() - self._up_since >= SHORT_S):
            if self._short >= SHORT_RUN:
                log.warning("MQTT connection to %s:%d has stayed up for %g s, after %d short "
                            "ones", self.m.host, self.m.port, SHORT_S, self._short)
            self._short = 0
            self.client.reconnect_delay_set(min_delay=1, max_delay=30)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        # an exception escaping a paho callback would stop the network loop
        try:
            if msg.topic == self.commands.t_cmd:
                self.commands.on_message(msg.payload, msg.retain)
            elif msg.topic == self.streams.discovery_topic:
                self.streams.read_back(msg.payload)
        except Exception:
            log.exception("MQTT message on %r could not be handled", msg.topic)

    def _report(self, level: int, msg: str) -> None:
        # once per distinct problem, not once per retry
        if msg != self._problem:
            self._problem = msg
            log.log(level, msg)

    # ------------------------------------------------------------ sender thread
    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stopping:
                break
            try:
                self._settle()
                self._steady()
                self._republished()
                self._hand_off()
                self._touch()
                self.streams.tick()
                self.outbox.retry()
            except Exception:      # a broken outbox must not end delivery for good
                log.exception("MQTT sink sender failed; retrying")
                time.sleep(1.0)

    def _settle(self) -> None:
        for rowid, info in list(self._inflight.items()):
            if _acked(info):
                self.outbox.ack(rowid)
                del self._inflight[rowid]

    def _republished(self) -> None:
        """The retained values (streams' topics, discovery, health), after a connect, once
        its gate is acknowledged: paho resends the previous connection's unacknowledged
        publications after on_connect, so values published there were overwritten by
        older ones; whatever is published after the gate's PUBACK goes out after them."""
        if self._republish and self.client.is_connected() and _acked(self._gate):
            self._republish = False
            self.streams.on_connect()
            if self._health is not None:
                self._pub_health()

    def _touch(self) -> None:
        now = time.monotonic()
        if self._open and now - self._touched >= PERSIST_S:
            self._touched = now
            self.outbox.touch({aid: t for s, aid in list(self._open.items())
                               if (t := self._last_ts.get(s)) is not None})

    def _hand_off(self) -> None:
        if not (self.client.is_connected() and _acked(self._gate)):
            return
        room = WINDOW - len(self._inflight)
        if room <= 0:
            return
        for rowid, topic, payload in self.outbox.pending(room, after=self._last_handed):
            info = self.client.publish(topic, payload, qos=1, retain=False)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                # The connection dropped under us.  paho keeps this copy and resends it
                # in order on reconnect; the row is handed over again after that (a
                # duplicate that consumers drop by id).
                break
            self._inflight[rowid] = info
            self._last_handed = rowid

"""What the MQTT sink publishes per stream, and the Home Assistant device that shows it.

Topics (P = the topic prefix), all QoS 1 and retained:
  P stream/<id>/state          learning | warming_up | normal | anomaly | no_data | idle
  P stream/<id>/availability   online | offline: its source is connected and its last
                               sample is younger than its stale window (mqtt.stale_after_s,
                               widened for a slow stream: agent/staleness.py)
  P stream/<id>/shelved        {"ts", "shelved_until"} (docs/schemas/shelved.json)
  P stream/<id>/alert          the open alert's latest event (docs/schemas/alert.json),
                               then its end while nobody has acked it; cleared (an empty
                               retained message) once it has ended acknowledged: a
                               dashboard that connects late lists and acks it from there

Which streams exist: the config's own streams from the start, and a topic-named one
(`stream_from_topic`) from its first sample on; never the id of a topic-named source
itself, which names a subscription, not a stream.  A stream stays while the config can
still produce it (`configured`); one that a reload (or a restart: the previous
discovery payload is read back once from the broker) leaves without a source is
dropped: its retained topics are cleared and HA is told to remove its entities.

A topic-named stream silent for `buffer.forget_after_s` is forgotten the same way
(`forget`, from the pipeline's book of departed streams, agent/departures.py), and the
read-back does not bring back one that book counts as gone.  A stream forgotten while the
broker is away has its topics cleared at the next connect, and the read-back that
follows does not take it back.  Home Assistant is told of a removal for REMOVED_KEEP_S,
not for ever: the payload would otherwise grow with every stream that ever went.

A fresh process has judged no window yet, so every stream known at start is
"warming_up" (which also clears a state a crashed run left) until its status says
otherwise.  The discovery payload is re-published when the set of
streams changes, or a stream's stale window (the score's `expire_after`) does, as when
it learns its interval, at most once per DISCOVERY_S (a wildcard source may bring
hundreds of streams at once).  All publishing happens under one lock, so that a reconnect's
re-publication never overtakes a newer state; and only once the broker has acknowledged
the connection's "online" (MqttSink calls on_connect then): paho resends the previous
connection's unacknowledged publications after its own on_connect, so values published
there were overwritten by older ones (a link that died silently left `normal` retained
during an open alert; RESULTS, twenty-first session).
"""
from __future__ import annotations

import json
import logging
import threading
import time

from ..config_base import STREAM_ID_RE
from ..staleness import stale_window
from ..timestamps import iso_utc
from .base import to_json
from .homeassistant import COMPONENTS, discovery, discovery_topic, stream_components, stream_of

log = logging.getLogger(__name__)

DISCOVERY_S = 1.0
REMOVED_KEEP_S = 86400.0     # a day: Home Assistant down for longer keeps an orphan entity
KINDS = ("state", "availability", "shelved", "alert")      # the retained topics of a stream


def producer(cfg, sid: str):
    """The config stream that can produce stream `sid` (a stream of its own, or a
    topic-named source whose filter admits that id at its stream level), else None."""
    for s in cfg.streams:
        level = getattr(s.source, "stream_from_topic", None)
        if level is None:
            if s.id == sid:
                return s
            continue
        parts = s.source.topic.split("/")
        if "#" in parts[:level + 1] or (level < len(parts) and parts[level] in ("+", sid)):
            return s
    return None


def configured(cfg, sid: str) -> bool:
    """Whether `cfg` can still produce stream `sid`."""
    return producer(cfg, sid) is not None


class StreamTopics:
    def __init__(self, cfg, client) -> None:
        self.cfg, self.client = cfg, client
        self.prefix = cfg.topic_prefix
        self.ha = cfg.mqtt.homeassistant.enabled
        self._lock = threading.RLock()
        self.known: set[str] = cfg.named_streams
        self.states = {sid: "warming_up" for sid in self.known}
        self.status: dict[str, dict] = {}
        self.stale: dict[str, float] = {}      # stream -> its stale window, from its status
        self.open: dict[str, bytes] = {}       # stream -> its retained alert (open, or ended unacked)
        # component key -> (platform, when removed), until it returns or REMOVED_KEEP_S passed
        self.removed: dict[str, tuple[str, float]] = {}
        self.departures = None                 # the pipeline's book (agent/departures.py)
        self._unsent: set[str] = set()         # forgotten, not yet cleared or read back
        self._dirty = False
        self._last_discovery = 0.0
        self._read_back = self.ha              # the previous run's payload, once
        # set by on_connect: before it, a discovery publication could overwrite the
        # previous run's payload before it was read back
        self._online = False

    @property
    def discovery_topic(self) -> str:
        return discovery_topic(self.cfg)

    def _pub(self, sid: str, kind: str, payload) -> None:
        if self._online and self.client.is_connected():
            self.client.publish(f"{self.prefix}stream/{sid}/{kind}", payload, qos=1, retain=True)

    def _shelved(self, sid: str) -> str:
        until = self.status.get(sid, {}).get("shelved_until")
        return to_json({"ts": iso_utc(time.time()), "shelved_until": until})

    def _publish_stream(self, sid: str) -> None:
        self._pub(sid, "state", self.states.get(sid, "warming_up"))
        self._pub(sid, "availability",
                  "online" if self.status.get(sid, {}).get("online") else "offline")
        self._pub(sid, "shelved", self._shelved(sid))
        self._pub(sid, "alert", self.open.get(sid, b""))

    def offline(self) -> None:
        """A clean stop: every stream's source is gone with the agent (the node's
        availability, which follows, covers an unclean one as the Last Will)."""
        with self._lock:
            for sid in sorted(self.known):
                self._pub(sid, "availability", "offline")

    def _add(self, sid: str) -> bool | None:
        """True: a new stream; False: a known one; None: one the config does not produce
        (the end event of a stream a reload dropped still brings its state)."""
        if sid in self.known:
            return False
        if not configured(self.cfg, sid):
            return None
        self.known.add(sid)
        for key in stream_components(self.cfg, sid):
            self.removed.pop(key, None)
        self._dirty = True
        return True

    # ------------------------------------------------------------ from the pipeline
    def alert(self, sid: str, event: bytes, cleared: bool) -> None:
        with self._lock:
            if cleared:
                self.open.pop(sid, None)
            else:
                self.open[sid] = event
            if sid in self.known:
                self._pub(sid, "alert", b"" if cleared else event)

    def state(self, sid: str, state: str) -> None:
        with self._lock:
            new = self._add(sid)
            if new is None:
                return
            self.states[sid] = state
            if new:
                self._publish_stream(sid)
            else:
                self._pub(sid, "state", state)

    def stream_status(self, sid: str, status: dict) -> None:
        with self._lock:
            new = self._add(sid)
            if new is None:
                return
            before = self.status.get(sid, {})
            self.status[sid] = status
            window = status.get("stale_after_s")
            if window is not None and self.stale.get(sid) != window:
                self.stale[sid] = window
                self._dirty = True          # the score's expire_after follows it
            if new or self.states.get(sid) != status["state"]:
                self.states[sid] = status["state"]
                self._pub(sid, "state", status["state"])
            if new or before.get("online") != status["online"]:
                self._pub(sid, "availability", "online" if status["online"] else "offline")
            if new or before.get("shelved_until") != status["shelved_until"]:
                self._pub(sid, "shelved", self._shelved(sid))
            if new:             # clears an alert a crashed run left retained
                self._pub(sid, "alert", self.open.get(sid, b""))

    def attach(self, cfg, departures=None) -> None:
        """A (re)loaded config: streams it can no longer produce are dropped."""
        with self._lock:
            self.cfg, self.departures = cfg, departures
            for sid in sorted(self.known):
                if not configured(cfg, sid):
                    self._drop(sid)
            for sid in sorted(cfg.named_streams - self.known):
                self._add(sid)
                self.states.setdefault(sid, "warming_up")
                self._publish_stream(sid)

    def _drop(self, sid: str) -> None:
        log.info("stream %s: no longer configured; its retained topics are cleared%s", sid,
                 " and Home Assistant drops its entities" if self.ha else "")
        self._clear(sid)

    def _clear(self, sid: str) -> None:
        if sid in self.known:
            self.known.discard(sid)
            now = time.monotonic()
            self.removed.update({k: (c["p"], now)
                                 for k, c in stream_components(self.cfg, sid).items()})
            self._dirty = True
        self.states.pop(sid, None)
        self.status.pop(sid, None)
        self.stale.pop(sid, None)
        self.open.pop(sid, None)
        self._wipe(sid)
        # not sent while the broker is away (or the read-back is due): the next connect
        # clears them; a stream a reload dropped offline kept its retained topics for good
        if self._read_back or not self._online:
            self._unsent.add(sid)

    def _wipe(self, sid: str) -> None:
        for kind in KINDS:
            self._pub(sid, kind, b"")      # an empty retained message deletes the retained one

    def forget(self, sids: list[str]) -> None:
        """Streams gone for good: dropped like those a reload leaves, whether known to this
        run or not (the topics a previous run left retained go too)."""
        with self._lock:
            for sid in sids:
                self._clear(sid)
            if sids:
                now = time.monotonic()
                for k in [k for k, (_, t) in self.removed.items() if now - t > REMOVED_KEEP_S]:
                    del self.removed[k]
                    self._dirty = True

    # ------------------------------------------------------------ from the network thread
    def on_connect(self) -> None:
        with self._lock:
            self._online = True
            if self._read_back:
                self.client.subscribe(self.discovery_topic, qos=1)
            for sid in sorted(self.known):
                self._publish_stream(sid)
            for sid in sorted(self._unsent):
                self._wipe(sid)
            if not self._read_back:
                self._unsent.clear()
            self.publish_discovery()

    def on_disconnect(self) -> None:
        with self._lock:
            self._online = False

    def read_back(self, payload: bytes) -> None:
        """The retained discovery payload found at the first connect (a previous run's, or
        this run's own when there was none): its streams that the config still produces
        are known again, its other components are removed."""
        with self._lock:
            if not self._read_back:
                return
            self._read_back = False
            self.client.unsubscribe(self.discovery_topic)
            try:
                cmps = json.loads(payload or b"{}").get("cmps")
            except (ValueError, AttributeError, RecursionError):
                cmps = None
            if not isinstance(cmps, dict):
                if payload:
                    log.warning("the retained Home Assistant discovery payload on %s is not "
                                "one of ours; replacing it", self.discovery_topic)
                cmps = {}
            earlier = {k: c for k, c in cmps.items() if isinstance(c, dict) and len(c) > 1}
            # only ids a source could have made: anyone who may write the discovery topic
            # could otherwise plant streams here, which this payload would then carry on
            ids = {stream_of(c, self.prefix) for c in earlier.values()}
            book = self.departures
            for sid in sorted(i for i in ids if i is not None and STREAM_ID_RE.match(i)):
                if not configured(self.cfg, sid) or sid in self._unsent or \
                        (book is not None and book.gone(sid)):
                    self._wipe(sid)
                elif self._add(sid):
                    if book is not None:
                        book.adopt([sid])
                    self.states.setdefault(sid, "warming_up")
                    self._publish_stream(sid)
            self._unsent.clear()
            current = {k for sid in self.known for k in stream_components(self.cfg, sid)}
            now = time.monotonic()
            for k, c in earlier.items():
                if k not in current and c.get("p") in COMPONENTS.values():
                    self.removed[k] = (c["p"], now)
                    self._dirty = True

    # ------------------------------------------------------------ from the sender thread
    def publish_discovery(self) -> None:
        with self._lock:
            if not (self.ha and self._online and self.client.is_connected()):
                return
            self._dirty = False
            self._last_discovery = time.monotonic()
            topic, payload = discovery(self.cfg, self.known,
                                       {k: p for k, (p, _) in self.removed.items()},
                                       {sid: self._stale(sid) for sid in self.known})
            if payload["cmps"]:      # a wildcard source before its first stream: nothing yet
                self.client.publish(topic, to_json(payload), qos=1, retain=True)

    def _stale(self, sid: str) -> float:
        """A stream's stale window: from its status, else (no sample yet) from the interval
        its config gives."""
        window = self.stale.get(sid)
        if window is None:
            src = producer(self.cfg, sid)
            window = stale_window(self.cfg.mqtt.stale_after_s, src and src.interval_s)
        return window

    def tick(self) -> None:
        if self._dirty and time.monotonic() - self._last_discovery >= DISCOVERY_S:
            self.publish_discovery()


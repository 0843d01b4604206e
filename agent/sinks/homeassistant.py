"""Home Assistant MQTT device discovery: one retained message describes the agent and,
per stream, its entities.

Rules, from Home Assistant core's MQTT integration (homeassistant/components/mqtt:
discovery.py, schemas.py, the platform schemas):
- Topic `<discovery_prefix>/device/<node>/config`; the ids in it, and the component
  ids, use only [A-Za-z0-9_-] (`slug`).
- The payload holds the device (`dev`, with an identifier), the origin (`o`, with a
  name) and the components (`cmps`), each with its platform (`p`) and a `unique_id`.
- Availability: a stream's anomaly, state and score entities are available only while
  the node AND the stream are online (an `availability` list with
  `availability_mode: all`); the score also expires (`expire_after`) when no score
  came for the stream's stale window (`stale_after_s`, widened for a slow stream:
  agent/staleness.py) + `score_interval_s`.  The buttons and the shelved sensor
  need only the node: they inherit the device-level `availability`.
  (`availability_topic` is never used: HA refuses it beside an `availability` list.)
- Buttons publish the JSON command on `P cmd` (QoS 1, not retained).
- HA does not remove a component that is merely left out of a later payload: a
  removed one is sent as its platform alone ({"p": "sensor"}), which HA takes as a
  removal, for a day (mqtt_streams.REMOVED_KEEP_S) while the sink runs.
- Nothing is published while there is no stream (a wildcard source before its first).
"""
from __future__ import annotations

import hashlib
import math
import re

from .. import __version__
from ..stream_status import STATES
from .base import to_json

# Entity suffix -> platform; the component key is "<stream slug>_<suffix>".
COMPONENTS = {"anomaly": "binary_sensor", "state": "sensor", "score": "sensor",
              "shelved": "binary_sensor", "ack": "button", "recalibrate": "button",
              "shelve": "button", "unshelve": "button"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def slug(s: str) -> str:
    """An id HA accepts in topics and component keys.  Stream ids may hold a '.', which
    HA does not allow; such ids get a short hash so that "a.b" and "a_b" stay apart."""
    safe = _UNSAFE.sub("_", s)
    return safe if safe == s else f"{safe}_{hashlib.sha1(s.encode()).hexdigest()[:6]}"


def discovery_topic(cfg) -> str:
    return f"{cfg.mqtt.homeassistant.discovery_prefix}/device/{slug(cfg.node)}/config"


def _duration(s: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n and s % n == 0:
            return f"{s / n:g} {unit}"
    return f"{s:g} s"


def stream_components(cfg, sid: str, stale_s: float | None = None) -> dict[str, dict]:
    """`stale_s`: the stream's stale window; None: `mqtt.stale_after_s`."""
    p, dev, key = cfg.topic_prefix, slug(cfg.node), slug(sid)
    base = f"{p}stream/{sid}/"
    both = {"availability": [{"topic": f"{p}availability"}, {"topic": base + "availability"}],
            "availability_mode": "all"}

    def cmp(suffix: str, name: str, **kw) -> tuple[str, dict]:
        return f"{key}_{suffix}", {"p": COMPONENTS[suffix], "name": f"{sid} {name}",
                                   "unique_id": f"tsad_{dev}_{key}_{suffix}", "qos": 1, **kw}

    def button(suffix: str, name: str, args: dict | None = None, **kw) -> tuple[str, dict]:
        press = to_json({"id": f"ha-{suffix}-{sid}", "cmd": suffix, "stream": sid,
                         **(args or {})})
        return cmp(suffix, name, command_topic=f"{p}cmd", payload_press=press, retain=False,
                   **kw)

    shelve_s = cfg.mqtt.homeassistant.shelve_s
    return dict([
        cmp("anomaly", "anomaly", state_topic=base + "state", device_class="problem",
            # "learning", "warming_up", "no_data" and "idle" are neither: the entity shows unknown
            # ("None")
            value_template="{{ {'anomaly': 'ON', 'normal': 'OFF'}.get(value, 'None') }}",
            **both),
        cmp("state", "state", state_topic=base + "state", device_class="enum",
            options=list(STATES), **both),
        cmp("score", "anomaly score", state_topic=base + "score",
            value_template="{{ value_json.score }}", state_class="measurement",
            json_attributes_topic=base + "score",
            # scores come at most every score_interval_s: expired = none for the stale window more
            expire_after=math.ceil((cfg.mqtt.stale_after_s if stale_s is None else stale_s)
                                   + cfg.mqtt.score_interval_s), **both),
        cmp("shelved", "shelved", state_topic=base + "shelved",
            value_template="{{ 'ON' if value_json.shelved_until else 'OFF' }}",
            json_attributes_topic=base + "shelved"),
        # the stream's latest alert, open or ended unacknowledged: a button carries no id
        button("ack", "acknowledge"),
        button("recalibrate", "recalibrate", entity_category="config"),
        button("shelve", f"shelve {_duration(shelve_s)}", {"for_s": shelve_s}),
        button("unshelve", "unshelve"),
    ])


def discovery(cfg, streams, removed: dict[str, str],
              stale: dict[str, float] | None = None) -> tuple[str, dict]:
    """The topic and payload for `streams`; `removed` (component key -> platform) lists
    components of earlier payloads that HA must drop; `stale`: each stream's stale window
    (missing: `mqtt.stale_after_s`)."""
    cmps = {k: {"p": platform} for k, platform in removed.items()}
    for sid in sorted(streams):
        cmps.update(stream_components(cfg, sid, (stale or {}).get(sid)))
    payload = {
        "dev": {"ids": [f"tsad_{slug(cfg.node)}"], "name": f"tsad {cfg.node}",
                "mf": "tsad-agent", "mdl": "edge anomaly detector", "sw": __version__},
        "o": {"name": "tsad-agent", "sw": __version__},
        "availability": [{"topic": f"{cfg.topic_prefix}availability"}],
        "qos": 1,
        "cmps": cmps,
    }
    return discovery_topic(cfg), payload


def stream_of(component: dict, prefix: str) -> str | None:
    """The stream an (earlier payload's) component belongs to, from its state topic."""
    m = re.fullmatch(re.escape(prefix) + r"stream/(.+)/(state|score|shelved)",
                     str(component.get("state_topic", "")))
    return m.group(1) if m else None

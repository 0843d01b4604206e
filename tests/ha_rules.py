"""Home Assistant's rules for an MQTT device-discovery message, written down from HA core
(homeassistant/components/mqtt: discovery.py, schemas.py, abbreviations.py, const.py, util.py
and the sensor, binary_sensor and button platform schemas), so that tests check what the
agent publishes against what HA accepts, not against the agent's own function.

`check(topic, raw)` returns (problems, components): the problems HA would have with the
message (none: HA sets it up) and each component as HA sets it up (abbreviations
expanded, the device's shared options merged in).  `Registry` applies a sequence of
retained messages as HA's discovery does: a component with a config adds or updates
an entity, one sent as its platform alone removes it, one merely left out stays.
"""
from __future__ import annotations

import json
import re

# abbreviations.py (the keys a payload may use; the agent's payload uses some of them)
ABBREVIATIONS = {
    "p": "platform", "cmps": "components", "o": "origin", "dev": "device",
    "avty": "availability", "avty_mode": "availability_mode", "avty_t": "availability_topic",
    "avty_tpl": "availability_template", "pl_avail": "payload_available",
    "pl_not_avail": "payload_not_available", "t": "topic", "stat_t": "state_topic",
    "cmd_t": "command_topic", "uniq_id": "unique_id", "val_tpl": "value_template",
    "dev_cla": "device_class", "stat_cla": "state_class", "exp_aft": "expire_after",
    "json_attr_t": "json_attributes_topic", "json_attr_tpl": "json_attributes_template",
    "pl_on": "payload_on", "pl_off": "payload_off", "pl_prs": "payload_press",
    "ent_cat": "entity_category", "ops": "options", "ret": "retain", "e": "encoding",
    "obj_id": "object_id", "unit_of_meas": "unit_of_measurement", "ic": "icon",
}
DEVICE_ABBREVIATIONS = {"ids": "identifiers", "cns": "connections", "mf": "manufacturer",
                        "mdl": "model", "mdl_id": "model_id", "sw": "sw_version",
                        "hw": "hw_version", "sn": "serial_number", "sa": "suggested_area",
                        "cu": "configuration_url", "via_dev": "via_device"}
ORIGIN_ABBREVIATIONS = {"sw": "sw_version", "url": "support_url"}

# const.py
SUPPORTED_COMPONENTS = {
    "alarm_control_panel", "binary_sensor", "button", "camera", "climate", "cover",
    "device_automation", "device_tracker", "event", "fan", "humidifier", "image",
    "lawn_mower", "light", "lock", "notify", "number", "scene", "select", "sensor", "siren",
    "switch", "tag", "text", "update", "vacuum", "valve", "water_heater"}
AVAILABILITY_MODES = {"all", "any", "latest"}
# schemas.py: device options a component inherits unless it sets them itself
SHARED_OPTIONS = ("availability", "availability_mode", "availability_template",
                  "availability_topic", "command_topic", "payload_available",
                  "payload_not_available", "state_topic")
# DEVICE_DISCOVERY_SCHEMA: no other key is allowed at the top level
DEVICE_LEVEL_KEYS = {"device", "components", "origin", "state_topic", "command_topic", "qos",
                     "encoding", "availability", "availability_mode", "availability_topic",
                     "availability_template", "payload_available", "payload_not_available"}
DEVICE_KEYS = {"identifiers", "connections", "manufacturer", "model", "model_id", "name",
               "hw_version", "serial_number", "sw_version", "via_device", "suggested_area",
               "configuration_url"}
# the platform schemas the agent uses: what each requires beyond the entity basics
REQUIRED = {"sensor": ("state_topic",), "binary_sensor": ("state_topic",),
            "button": ("command_topic",)}
SENSOR_STATE_CLASSES = {"measurement", "total", "total_increasing"}
ENTITY_CATEGORIES = {"config", "diagnostic"}
TOPIC_MATCHER = re.compile(r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)"
                           r"?(?P<object_id>[a-zA-Z0-9_-]+)/config")


def _expand(d: dict, table: dict) -> dict:
    return {table.get(k, k): v for k, v in d.items()}


def valid_subscribe_topic(t) -> bool:
    """util.valid_subscribe_topic: '+' and '#' only as whole levels, '#' last."""
    if not isinstance(t, str) or not t or "\0" in t or len(t.encode()) > 65535:
        return False
    levels = t.split("/")
    for i, lv in enumerate(levels):
        if ("#" in lv and (lv != "#" or i != len(levels) - 1)) or ("+" in lv and lv != "+"):
            return False
    return True


def valid_publish_topic(t) -> bool:
    return valid_subscribe_topic(t) and "+" not in t and "#" not in t


def _availability(where: str, cfg: dict) -> list[str]:
    out = []
    if "availability_topic" in cfg and "availability" in cfg:
        out.append(f"{where}: availability_topic and availability are exclusive")
    if "availability_topic" in cfg and not valid_subscribe_topic(cfg["availability_topic"]):
        out.append(f"{where}: bad availability_topic")
    if cfg.get("availability_mode", "latest") not in AVAILABILITY_MODES:
        out.append(f"{where}: availability_mode {cfg['availability_mode']!r}")
    items = cfg.get("availability", [])
    for item in items if isinstance(items, list) else [items]:
        item = _expand(item, ABBREVIATIONS) if isinstance(item, dict) else item
        if not isinstance(item, dict) or not valid_subscribe_topic(item.get("topic")):
            out.append(f"{where}: availability entry {item!r} needs a valid topic")
    return out


def _entity(key: str, platform: str, c: dict) -> list[str]:
    where = f"cmps.{key} ({platform})"
    out = _availability(where, c)
    if not isinstance(c.get("unique_id"), str) or not c["unique_id"]:
        out.append(f"{where}: unique_id is required")
    for req in REQUIRED.get(platform, ()):
        if req not in c:
            out.append(f"{where}: {req} is required")
    for k in ("state_topic", "json_attributes_topic"):
        if k in c and not valid_subscribe_topic(c[k]):
            out.append(f"{where}: bad {k} {c[k]!r}")
    if "command_topic" in c and not valid_publish_topic(c["command_topic"]):
        out.append(f"{where}: bad command_topic {c['command_topic']!r}")
    if "expire_after" in c and not (isinstance(c["expire_after"], int) and c["expire_after"] > 0):
        out.append(f"{where}: expire_after must be a positive int")
    if c.get("qos", 0) not in (0, 1, 2):
        out.append(f"{where}: qos {c['qos']!r}")
    if "entity_category" in c and c["entity_category"] not in ENTITY_CATEGORIES:
        out.append(f"{where}: entity_category {c['entity_category']!r}")
    if platform == "sensor":
        if c.get("device_class") == "enum" and (not c.get("options") or "state_class" in c
                                               or "unit_of_measurement" in c):
            out.append(f"{where}: an enum sensor needs options and no state_class or unit")
        if "state_class" in c and c["state_class"] not in SENSOR_STATE_CLASSES:
            out.append(f"{where}: state_class {c['state_class']!r}")
    if platform == "button" and not isinstance(c.get("payload_press", "PRESS"), str):
        out.append(f"{where}: payload_press must be a string")
    return out


def check(topic: str, raw: str | bytes, prefix: str = "homeassistant") -> tuple[list[str], dict]:
    """(problems, {component key: (platform, config as HA sets it up, or None: removed)})."""
    problems: list[str] = []
    m = TOPIC_MATCHER.fullmatch(topic[len(prefix) + 1:]) if topic.startswith(prefix + "/") else None
    if not m or m["component"] != "device":
        return [f"not a device discovery topic: {topic!r}"], {}
    try:
        doc = json.loads(raw)
    except ValueError:
        return ["payload is not JSON"], {}
    if not isinstance(doc, dict):
        return ["payload is not a JSON object"], {}
    doc = _expand(doc, ABBREVIATIONS)
    problems += [f"unknown top-level key {k!r}" for k in doc if k not in DEVICE_LEVEL_KEYS]
    dev = _expand(doc.get("device") or {}, DEVICE_ABBREVIATIONS)
    if not (dev.get("identifiers") or dev.get("connections")):
        problems.append("device: at least one identifier or connection is required")
    problems += [f"device: unknown key {k!r}" for k in dev if k not in DEVICE_KEYS]
    origin = _expand(doc.get("origin") or {}, ORIGIN_ABBREVIATIONS)
    if not isinstance(origin.get("name"), str):
        problems.append("origin with a name is required")
    problems += _availability("device", doc)
    cmps = doc.get("components")
    if not isinstance(cmps, dict):
        return problems + ["components (cmps) is required"], {}
    out = {}
    for key, c in cmps.items():
        c = _expand(dict(c), ABBREVIATIONS)
        platform = c.pop("platform", None)
        if platform not in SUPPORTED_COMPONENTS:
            problems.append(f"cmps.{key}: platform {platform!r} is not supported")
            continue
        if not c:                  # the platform alone: HA removes this component
            out[key] = (platform, None)
            continue
        for opt in SHARED_OPTIONS:
            if opt in doc and opt not in c:
                c[opt] = doc[opt]
        problems += _entity(key, platform, c)
        out[key] = (platform, c)
    return problems, out


class Registry:
    """The entities HA holds after a sequence of discovery messages (retained ones first)."""

    def __init__(self, prefix: str = "homeassistant"):
        self.prefix = prefix
        self.entities: dict[str, tuple[str, dict]] = {}    # component key -> (platform, config)

    def apply(self, topic: str, raw: str | bytes) -> list[str]:
        if not raw:                # an empty device payload removes every component
            self.entities.clear()
            return []
        problems, cmps = check(topic, raw, self.prefix)
        if problems:               # HA ignores an invalid device payload as a whole
            return problems
        for key, (platform, cfg) in cmps.items():
            if cfg is None:
                self.entities.pop(key, None)
            else:
                self.entities[key] = (platform, cfg)
        return []

    def streams(self) -> set[str]:
        """Streams with entities, read from their state topics (.../stream/<id>/...)."""
        return {m.group(1) for _, c in self.entities.values()
                if (m := re.search(r"/stream/([^/]+)/", c.get("state_topic", "")))}

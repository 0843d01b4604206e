"""A channel a device stops sending (audit s20 F1, F2), through the real agent process,
a real Mosquitto and the Prometheus endpoint: flat JSON samples on MQTT that lack channel
`b` (a sensor unplugged, a device misconfigured).

The stream showed `normal` on every surface while no window was scored, and the process
counter of unscored windows read 0.  Now: once `b` has had no value for a window past the
forward fill, the retained state topic says `no_data`, health names `b` and counts the
dropped windows at the top as per stream, Prometheus agrees, Home Assistant's state entity
accepts the state (its problem sensor shows unknown, not "cleared"); one WARNING names the
channel.  When `b` comes back the stream is judged again and says `normal`.
"""
from __future__ import annotations

import os

import pytest

from agent_harness import (MOSQUITTO, NODE, STREAM, JsonDevice, Publisher, Rig, json_stream,
                           no_traceback, retained, wait_until)
from conftest import free_port
from ha_rules import check
from prom_harness import scrape, value
from test_mqtt_ops import assert_payloads_valid

pytestmark = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto not installed")

WINDOW, FILL = 8, 3             # the tiny model's window, the default buffer.ffill_max
TOPIC = "dev/pump"
HA = f"homeassistant/device/{NODE}/config"
ALL, NO_B = {"a": 0, "b": 0, "c": 0}, {"a": 0, "c": 0}     # b left out, as a device would


def _states(rig: Rig) -> list[bytes]:
    return [p for _, p, _ in rig.obs.topic(f"stream/{STREAM}/state")]


def _health(rig: Rig, pred, what: str) -> dict:
    def ok():
        h = rig.obs.healths()
        return h and pred(h[-1][1]) and h[-1][1]
    return wait_until(ok, what)


def _scraped(port: int, pred, what: str) -> dict:
    box = {}

    def ok():
        box["f"] = scrape(port)
        return pred(box["f"])
    wait_until(ok, what, step=0.2)
    return box["f"]


def test_a_channel_the_device_stops_sending_shows_no_data_everywhere_until_it_returns(tmp_path):
    port = free_port()
    rig = Rig(tmp_path, wait_online=False, metrics={"listen": f"127.0.0.1:{port}"},
              mqtt={"homeassistant": {"enabled": True}},
              streams=[json_stream(STREAM, TOPIC)])
    pub = None
    try:
        agent = rig.agent()
        agent.wait_log("subscribed to")
        pub = Publisher(rig.broker.port)
        dev = JsonDevice(pub, TOPIC)
        dev.send(WINDOW + 2, ALL)
        wait_until(lambda: _states(rig)[-1:] == [b"normal"], "the state normal")

        dev.send(FILL + WINDOW + 5, NO_B)
        wait_until(lambda: _states(rig)[-1:] == [b"no_data"], "the state no_data")
        assert retained(rig.broker.port, f"tsad/{NODE}/stream/{STREAM}/state") == b"no_data"
        h = _health(rig, lambda h: h["streams"][STREAM]["state"] == "no_data"
                    and h["streams"][STREAM]["samples"] == dev.i, "health saying no_data")
        s = h["streams"][STREAM]
        assert s["missing_channels"] == ["b"]
        # every sample without b past the fill ended a window that was dropped
        assert s["windows_skipped"] == WINDOW + 5 == h["windows_skipped"]
        assert h["malformed"]["missing_channel"] == FILL + WINDOW + 5
        f = _scraped(port, lambda f: value(f, "tsad_stream_state", stream=STREAM,
                                           state="no_data") == 1, "Prometheus saying no_data")
        assert value(f, "tsad_stream_state", stream=STREAM, state="normal") == 0
        assert value(f, "tsad_stream_channel_missing", stream=STREAM, channel="b") == 1
        assert value(f, "tsad_windows_skipped_total") == h["windows_skipped"]
        assert rig.obs.topic(f"stream/{STREAM}/availability")[-1][1] == b"online"
        assert agent.count("stream pump: no value from b for 11 samples") == 1

        # b is back: the windows still holding its gap are dropped, the next is judged
        dev.send(WINDOW, ALL)
        wait_until(lambda: _states(rig)[-1:] == [b"normal"], "the state normal again")
        h = _health(rig, lambda h: h["streams"][STREAM]["state"] == "normal",
                    "health saying normal")
        assert h["streams"][STREAM]["missing_channels"] == []
        assert h["windows_skipped"] == WINDOW + 5 + WINDOW - 1
        f = _scraped(port, lambda f: value(f, "tsad_stream_state", stream=STREAM,
                                           state="normal") == 1, "Prometheus saying normal")
        assert value(f, "tsad_stream_channel_missing", stream=STREAM, channel="b") is None
        assert agent.count("stream pump: windows are scored again (b back): no_data ends") == 1
        states = _states(rig)
        assert [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s] == \
            [b"warming_up", b"normal", b"no_data", b"normal"]

        problems, cmps = check(HA, retained(rig.broker.port, HA))
        assert problems == []
        assert "no_data" in cmps[f"{STREAM}_state"][1]["options"]
        try:
            import jinja2
        except ImportError:
            pass
        else:
            tpl = cmps[f"{STREAM}_anomaly"][1]["value_template"]
            assert jinja2.Environment().from_string(tpl).render(value="no_data") == "None"
        assert assert_payloads_valid([(t, p, 1, r) for _, t, p, r in rig.obs.msgs]) > 0
        no_traceback(agent)
    finally:
        if pub is not None:
            pub.close()
        rig.close()

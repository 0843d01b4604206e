"""`running:` through the real agent process, a real Mosquitto and the Prometheus endpoint:
a machine stopped is shown `idle` on every surface and raises nothing; an alert open when
it stops ends with reason `idle`; it is judged again when it runs."""
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

WINDOW = 8                      # the tiny model's
TOPIC = "dev/pump"
HA = f"homeassistant/device/{NODE}/config"
RUN, STOP, FAULT = {"a": 1, "b": 0, "c": 0}, {"a": 0, "b": 900, "c": 900}, \
    {"a": 1000, "b": 1000, "c": 1000}


def _states(rig: Rig) -> list[bytes]:
    states = [p for _, p, _ in rig.obs.topic(f"stream/{STREAM}/state")]
    return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]


def test_a_stopped_machine_shows_idle_raises_nothing_and_ends_an_open_alert(tmp_path):
    port = free_port()
    rig = Rig(tmp_path, wait_online=False, metrics={"listen": f"127.0.0.1:{port}"},
              mqtt={"homeassistant": {"enabled": True}},
              running={"channel": "a", "above": 0.5},
              streams=[json_stream(STREAM, TOPIC)])
    pub = None
    try:
        agent = rig.agent()
        agent.wait_log("subscribed to")
        pub = Publisher(rig.broker.port)
        dev = JsonDevice(pub, TOPIC)
        dev.send(WINDOW + 2, RUN)
        wait_until(lambda: _states(rig)[-1:] == [b"normal"], "the state normal")

        dev.send(20, STOP)      # values that would alarm at once, were it running
        wait_until(lambda: _states(rig)[-1:] == [b"idle"], "the state idle")
        assert retained(rig.broker.port, f"tsad/{NODE}/stream/{STREAM}/state") == b"idle"
        h = wait_until(lambda: (h := rig.obs.healths()) and h[-1][1]["samples_in"] == dev.i
                       and h[-1][1], "health with every sample")
        assert h["streams"][STREAM]["state"] == "idle" and h["samples_idle"] == 20
        wait_until(lambda: value(scrape(port), "tsad_stream_state", stream=STREAM,
                                 state="idle") == 1, "Prometheus saying idle", step=0.2)
        assert value(scrape(port), "tsad_samples_idle_total") == 20
        assert rig.obs.alerts() == []
        assert agent.count("stream pump: the machine stopped (not a > 0.5)") == 1

        dev.send(WINDOW + 2, RUN)
        wait_until(lambda: _states(rig)[-1:] == [b"normal"], "normal again")
        assert agent.count("stream pump: the machine runs (a > 0.5 for 0 s): judged again") == 1

        dev.send(1, FAULT)       # an alert opens while it runs ...
        wait_until(lambda: [a["type"] for a in rig.obs.alerts()] == ["new"], "the alert")
        dev.send(3, STOP)        # ... and the machine is stopped in it
        wait_until(lambda: [a["type"] for a in rig.obs.alerts()][-1:] == ["end"], "its end")
        end = rig.obs.alerts()[-1]
        assert end["reason"] == "idle" and end["end"] == rig.obs.alerts()[0]["start"]
        wait_until(lambda: _states(rig)[-1:] == [b"idle"], "idle after the alert")
        assert _states(rig) == [b"warming_up", b"normal", b"idle", b"warming_up", b"normal",
                                b"anomaly", b"idle"]

        problems, cmps = check(HA, retained(rig.broker.port, HA))
        assert problems == [] and "idle" in cmps[f"{STREAM}_state"][1]["options"]
        assert assert_payloads_valid([(t, p, 1, r) for _, t, p, r in rig.obs.msgs]) > 0
        no_traceback(agent)
    finally:
        if pub is not None:
            pub.close()
        rig.close()

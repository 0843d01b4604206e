"""Hostile input through the real agent (issue 11): timestamps out of range or in
another unit, and line noise in `auto` mode, must neither stop the daemon nor
reset or blind the stream.  Real agent process, real Mosquitto, a real pty; the
deterministic model of agent_harness makes every alert id known in advance.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent_harness import (MOSQUITTO, NODE, SPACING, STREAM, AgentProcess, LineWriter, Observer,
                           Pty, alert_id, assert_exact, no_traceback, sample_ts, tiny_model,
                           wait_until, write_config)

pytestmark = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto not installed")

ANOMALY = [1000, 1000, 1000]


def us(i: int) -> int:
    """Sample i's timestamp in epoch microseconds."""
    return int(round(sample_ts(i) * 1e6))


def health_since(obs: Observer, since: float, pred, what: str) -> dict:
    """The first health published after `since` (monotonic) that satisfies pred."""
    def find():
        return next((h for at, h in obs.healths() if at > since and pred(h)), None)
    return wait_until(find, what)


def retained_health(port: int) -> dict:
    """What a subscriber arriving now reads on the health topic (the retained copy)."""
    got = threading.Event()
    box = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="late-reader")
    c.on_connect = lambda c, u, f, rc, p: c.subscribe(f"tsad/{NODE}/health", qos=1)
    c.on_message = lambda c, u, m: (box.append((m.retain, json.loads(m.payload))), got.set())
    c.connect("127.0.0.1", port, keepalive=5)
    c.loop_start()
    try:
        assert got.wait(10), "no retained health"
    finally:
        c.loop_stop()
        c.disconnect()
    retain, h = box[0]
    assert retain
    return h


class SerialRig:
    def __init__(self, tmp: Path, port: int, timestamp: str):
        self.pty = Pty()
        self.writer = LineWriter(self.pty)
        self.obs = Observer(port).wait_subscribed()
        src = {"type": "serial", "port": self.pty.path, "baud": 115200, "protocol": "csv",
               "timestamp": timestamp, "reconnect_min_s": 0.1, "reconnect_max_s": 2.0}
        cfg = write_config(tmp / "agent.yaml", model=tiny_model(tmp), port=port,
                           serial_port=self.pty.path, state_dir=tmp / "state",
                           streams=[{"id": STREAM, "source": src}])
        self.agent = AgentProcess(cfg, tmp / "agent.log").start()
        # the port flushes its input when opened: write only once the agent has it open
        self.agent.wait_log("open at")

    def raw(self, line: str) -> None:
        os.write(self.pty.master, line.encode() + b"\n")

    def close(self) -> None:
        self.agent.close()
        self.obs.close()
        self.pty.close()


@pytest.fixture
def serial_rig(tmp_path, broker):
    rigs = []

    def make(timestamp: str) -> SerialRig:
        rigs.append(SerialRig(tmp_path, broker.port, timestamp))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()


def stream_health(h: dict) -> dict:
    return h["streams"].get(STREAM, {})


# ---------------------------------------------------------------- MQTT
def test_mqtt_retained_bad_and_microsecond_timestamps_survive_restarts(tmp_path, broker):
    obs = Observer(broker.port).wait_subscribed()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="device")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    n, spike = 30, 15
    retained = {
        # anomalous values: if either timestamp got through, it would open an alert
        "dev/pump/neg": {"ts": -1_700_000_000, "values": ANOMALY},
        "dev/pump/huge": {"ts": 1e30, "values": ANOMALY},
        # a device stamping epoch microseconds; one anomaly in the middle
        "dev/pump/us": [{"ts": us(i), "values": ANOMALY if i == spike else [0, 0, 0]}
                        for i in range(n)],
    }
    for topic, doc in retained.items():
        pub.publish(topic, json.dumps(doc), qos=1, retain=True).wait_for_publish(10)
    pub.loop_stop()
    pub.disconnect()
    src = {"type": "mqtt", "topic": "dev/pump/#", "protocol": "json", "qos": 1}
    cfg = write_config(tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=broker.port,
                       serial_port="unused", state_dir=tmp_path / "state",
                       streams=[{"id": STREAM, "source": src}])
    expected = {alert_id(spike)}
    agents = []
    try:
        for run in (1, 2):        # the restart gets every retained message again
            started = time.monotonic()
            agent = AgentProcess(cfg, tmp_path / "agent.log").start()
            agents.append(agent)
            wait_until(lambda: obs.ids("new")[alert_id(spike)] == run
                       and obs.ids("end")[alert_id(spike)] == run, f"alert of run {run}")
            h = health_since(obs, started, lambda h: stream_health(h).get("samples") == n,
                             f"health of run {run} after all {n} samples")
            assert h["malformed"] == {"bad_timestamp": 2}
            assert stream_health(h)["ring_resets"] == 0
            assert agent.running()
            no_traceback(agent)
            agent.signal(signal.SIGTERM)
            assert agent.proc.wait(30) == 0, agent.log()
        stats = assert_exact(obs, expected)
        assert stats["duplicates"] == 2            # one "new" and one "end" per run
        h = retained_health(broker.port)
        assert h["malformed"] == {"bad_timestamp": 2} and stream_health(h)["samples"] == n
    finally:
        for a in agents:
            a.close()
        obs.close()


# ---------------------------------------------------------------- serial
def test_serial_out_of_range_timestamps_are_counted_not_fatal(serial_rig):
    rig = serial_rig("first")
    w = rig.writer
    w.normal(20)
    for ts in ("-1700000000.000", "1e30", "55840000000", "0", "1970-01-01T00:00:00Z",
               f"{time.time() + 30 * 86400:.3f}",              # a month ahead of this clock
               f"{sample_ts(w.i) - 3600:.3f}"):                # an hour behind the stream
        rig.raw(f"{ts},1000,1000,1000")
    w.normal(2)
    i = w.i                                                     # an anomaly stamped in µs
    rig.raw(f"{us(i)},1000,1000,1000")
    w.i += 1
    w.normal(SPACING - 1)
    expected = {alert_id(i)} | set(w.spikes(2))
    rig.obs.wait_ids(expected)
    print(f"serial bad timestamps: {assert_exact(rig.obs, expected)}")
    h = health_since(rig.obs, 0, lambda h: stream_health(h).get("samples") == w.i,
                     f"health after all {w.i} samples")
    assert h["malformed"] == {"bad_timestamp": 7}
    assert stream_health(h)["ring_resets"] == 0
    assert rig.agent.running()
    no_traceback(rig.agent)


def test_serial_auto_mode_line_noise_does_not_reset_the_stream(serial_rig):
    rig = serial_rig("auto")
    w = rig.writer
    w.normal(20)                                   # the first valid line: with timestamp
    i = w.i
    good = f"{sample_ts(i):.3f},0.5,0,0"
    rig.raw(good.replace(".", ",", 1))             # "." -> ",": one field too many
    rig.raw(good.replace(",0.5,", ",0.5"))         # a lost ",": no room for the timestamp
    w.i += 1
    spike = w.line(True)                           # right after: needs the unreset window
    w.normal(SPACING - 1)
    expected = {alert_id(spike)} | set(w.spikes(2))
    rig.obs.wait_ids(expected)
    print(f"auto mode line noise: {assert_exact(rig.obs, expected)}")
    h = health_since(rig.obs, 0, lambda h: stream_health(h).get("samples") == w.i - 1,
                     f"health after all {w.i - 1} samples")
    assert h["malformed"] == {"field_count": 2}
    assert stream_health(h)["ring_resets"] == 0
    assert rig.agent.running()
    no_traceback(rig.agent)


def test_serial_auto_mode_without_timestamps_keeps_values_in_place(serial_rig):
    """The issue's case: a stream without timestamps, one "." -> "," in a value."""
    rig = serial_rig("auto")
    for _ in range(20):
        rig.raw("0.5,0.5,0.5")                     # the first valid line: no timestamp
    rig.raw("0,5,0.5,0.5")                         # once read as a 1970 time + shifted values
    before = time.time()
    rig.raw(",".join(map(str, ANOMALY)))           # right after: needs the unreset window
    for _ in range(SPACING - 1):
        rig.raw("0.5,0.5,0.5")
    wait_until(lambda: rig.obs.ids("new") and rig.obs.ids("end"), "the alert")
    after = time.time()
    (aid,) = rig.obs.ids("new")
    assert rig.obs.ids("new") == rig.obs.ids("end") == {aid: 1}
    ms = int(aid.rsplit(":", 1)[1])                # stamped on arrival: between write and alert
    assert before * 1000 - 1 <= ms <= after * 1000 + 1, (aid, before, after)
    h = health_since(rig.obs, 0, lambda h: stream_health(h).get("samples") == 20 + SPACING,
                     "health after all samples")
    assert h["malformed"] == {"field_count": 1}
    assert stream_health(h)["ring_resets"] == 0
    assert rig.agent.running()
    no_traceback(rig.agent)

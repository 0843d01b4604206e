"""MQTT sink against a real mosquitto: availability/LWT, QoS and retain flags,
score rate limiting, outbox delivery across outages and restarts, auth errors."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import sqlite3

import msgspec
import paho.mqtt.client as mqtt
import pytest
from conftest import MOSQUITTO, REPO, Broker, free_port
from test_outbox import fill, tiny_fs

from agent import outbox as outbox_mod
from agent.config import AgentConfig
from agent.config_build import build
from agent.metrics import Metrics
from agent.outbox import Outbox
from agent.sinks.mqtt import MqttSink
from ha_rules import check

WAIT = 30.0      # generous: only ever waited on, never asserted as a duration
P = "tsad/n1/"


def make_cfg(state_dir, port, **mqtt_kw) -> AgentConfig:
    return build(AgentConfig, {
        "node": "n1", "state_dir": str(state_dir), "model": {"path": "m.onnx"},
        "streams": [{"id": "pump1", "source": {"type": "replay", "path": "a.csv"}},
                    {"id": "pump2", "source": {"type": "replay", "path": "b.csv"}}],
        "mqtt": {"host": "127.0.0.1", "port": port, "keepalive": 5, **mqtt_kw}})


def ev(i: int, typ: str = "new", stream: str = "pump1") -> dict:
    return {"schema": 1, "type": typ, "id": f"n1-{stream}-{i}", "node": "n1", "stream": stream,
            "start": 1000.0 + i, "end": None, "score": 0.9, "peak_score": 0.9, "threshold": 0.3,
            "top_channels": [{"name": "Current", "share": 0.7}],
            "model": {"name": "m", "sha256": "0" * 64, "ep": "cpu"}}


class Sub:
    """A test subscriber: records (topic, payload, qos, retain); resubscribes on reconnect."""

    def __init__(self, port: int, topics: list[str], client_id: str | None = None,
                 clean: bool = True, auth: tuple[str, str] | None = None):
        self.topics = topics
        self.msgs: list[tuple[str, str, int, bool]] = []
        self.cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=client_id or f"sub-{uuid.uuid4().hex[:8]}",
                             clean_session=clean)
        self.c.reconnect_delay_set(0.2, 1)
        if auth:
            self.c.username_pw_set(*auth)
        self._up = threading.Event()
        self._subacks = threading.Semaphore(0)
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = lambda *a: self._subacks.release()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port, keepalive=5)
        self.c.loop_start()
        assert self._up.wait(WAIT), "subscriber did not connect"
        # one SUBSCRIBE at a time: retained messages then arrive in topic order
        for t in topics:
            self.c.subscribe(t, qos=1)
            assert self._subacks.acquire(timeout=WAIT), "no SUBACK"

    def _on_connect(self, c, u, flags, rc, props):
        if self._up.is_set() and not flags.session_present:
            c.subscribe([(t, 1) for t in self.topics])
        self._up.set()

    def _on_message(self, c, u, m):
        with self.cond:
            self.msgs.append((m.topic, m.payload.decode(errors="replace"), m.qos, bool(m.retain)))
            self.cond.notify_all()

    def wait(self, pred, what: str) -> list:
        with self.cond:
            assert self.cond.wait_for(lambda: pred(self.msgs), WAIT), \
                f"timed out waiting for {what}; got {self.msgs}"
            return list(self.msgs)

    def on(self, topic: str) -> list:
        with self.cond:
            return [m for m in self.msgs if m[0] == topic]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def has(topic, payload=None):
    return lambda msgs: any(m[0] == topic and (payload is None or m[1] == payload) for m in msgs)


def alert_ids(msgs):
    return [json.loads(m[1])["id"] for m in msgs if m[0] == P + "alerts"]


@pytest.fixture
def sinks():
    made = []

    def make(cfg):
        s = MqttSink(cfg, Metrics())
        made.append(s)
        return s, s.outbox

    yield make
    for s in made:
        s.stop()


def wait_until(pred, what: str):
    for _ in range(int(WAIT / 0.05)):
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------- availability
def test_availability_online_offline_and_discovery(broker, tmp_path, sinks):
    cfg = make_cfg(tmp_path / "st", broker.port, homeassistant={"enabled": True})
    s, _ = sinks(cfg)
    s.start()
    sub = Sub(broker.port, [P + "availability"])
    sub.wait(has(P + "availability", "online"), "online")
    late = Sub(broker.port, [P + "availability", "homeassistant/device/n1/config"])
    msgs = late.wait(has("homeassistant/device/n1/config"), "discovery")
    assert (P + "availability", "online", 1, True) in msgs          # retained
    topic, raw = [m[:2] for m in msgs if m[0].startswith("homeassistant/")][0]
    problems, cmps = check(topic, raw)
    assert problems == []
    kinds = {k: (p, c.get("state_topic")) for k, (p, c) in cmps.items()}
    assert kinds["pump1_anomaly"] == ("binary_sensor", P + "stream/pump1/state")
    assert kinds["pump2_score"] == ("sensor", P + "stream/pump2/score")

    s.stream_status("pump1", {"online": True, "state": "normal", "shelved_until": None})
    streams = [P + "stream/pump1/availability", P + "stream/pump2/availability"]
    on = Sub(broker.port, streams)
    on.wait(has(streams[0], "online"), "the stream online")
    s.stop()
    sub.wait(has(P + "availability", "offline"), "offline after clean stop")
    after = Sub(broker.port, [P + "availability"] + streams)
    got = after.wait(lambda m: len({x[0] for x in m}) == 3, "retained")
    # every stream too: its source stopped with the agent
    assert sorted(x[:2] for x in got) == [(P + "availability", "offline"),
                                          (streams[0], "offline"), (streams[1], "offline")]
    for x in (sub, late, on, after):
        x.close()


_LWT_SCRIPT = """
import sys, time
import msgspec
from agent.config import AgentConfig
from agent.config_build import build
from agent.metrics import Metrics
from agent.sinks.mqtt import MqttSink
cfg = build(AgentConfig, msgspec.json.decode(sys.argv[1]))
s = MqttSink(cfg, Metrics())
s.start()
time.sleep(600)
"""


def test_last_will_offline_after_sigkill(broker, tmp_path):
    cfg = make_cfg(tmp_path / "st", broker.port)
    sub = Sub(broker.port, [P + "availability"])
    proc = subprocess.Popen([sys.executable, "-c", _LWT_SCRIPT, msgspec.json.encode(cfg)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        sub.wait(has(P + "availability", "online"), "online from the child")
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        msgs = sub.wait(has(P + "availability", "offline"), "the last will")
        assert msgs[-1][1] == "offline"
        after = Sub(broker.port, [P + "availability"])
        assert after.wait(has(P + "availability"), "retained will")[0][1:] == ("offline", 1, True)
        after.close()
    finally:
        proc.kill()
        sub.close()


# ---------------------------------------------------------------- message kinds
def test_alert_state_score_health_flags(broker, tmp_path, sinks):
    cfg = make_cfg(tmp_path / "st", broker.port, score_interval_s=3600)
    s, ob = sinks(cfg)
    sub = Sub(broker.port, [P + "#"])
    s.start()
    sub.wait(has(P + "availability", "online"), "online")
    s.alert(ev(1, "new"))
    s.state("pump1", "anomaly")
    for i in range(5):
        s.score("pump1", 1000.0 + i, 0.5 + i, 0.3, 1)
    s.health({"uptime_s": 1.0, "samples_in": 7})
    s.alert(ev(2, "end"))
    msgs = sub.wait(lambda m: len(alert_ids(m)) == 2 and has(P + "health")(m), "alerts + health")

    alerts = sub.on(P + "alerts")
    assert alert_ids(alerts) == ["n1-pump1-1", "n1-pump1-2"]
    assert all(q == 1 and not r for _, _, q, r in alerts)           # QoS 1, not retained
    assert json.loads(alerts[0][1]) == ev(1, "new")
    # rate limited: the first score only (the later alert proves the others had their chance)
    scores = sub.on(P + "stream/pump1/score")
    assert [json.loads(p) for _, p, _, _ in scores] == [
        {"ts": "1970-01-01T00:16:40.000Z", "score": 0.5, "threshold": 0.3, "label": 1}]
    assert scores[0][2] == 0
    health = json.loads(sub.on(P + "health")[-1][1])
    assert health["samples_in"] == 7 and health["mqtt"]["connected"] is True
    assert set(health["mqtt"]) == {"connected", "disconnects", "queued", "dropped", "outbox",
                                   "commands"}
    assert health["mqtt"]["outbox"] == {"ok": True, "error": None, "depth": 1, "memory": 0,
                                        "lost": 0}    # the end, published after this health
    assert (P + "stream/pump1/state", "anomaly", 1, False) in msgs
    wait_until(lambda: ob.depth() == 0, "outbox emptied by PUBACKs")

    # a late subscriber: retained state and health, never an alert
    late = Sub(broker.port, [P + "alerts", P + "stream/+/state"])
    got = late.wait(lambda m: len(m) == 2, "retained states")
    assert sorted(got) == [(P + "stream/pump1/state", "anomaly", 1, True),
                           (P + "stream/pump2/state", "warming_up", 1, True)]
    sub.close()
    late.close()


def test_scores_unlimited_when_interval_zero(broker, tmp_path, sinks):
    s, _ = sinks(make_cfg(tmp_path / "st", broker.port, score_interval_s=0))
    sub = Sub(broker.port, [P + "stream/pump2/score", P + "availability"])
    s.start()
    sub.wait(has(P + "availability", "online"), "online")
    for i in range(5):
        s.score("pump2", float(i), 0.1 * i, 0.3, 0)
    sub.wait(lambda m: len([x for x in m if "score" in x[0]]) == 5, "all 5 scores")
    sub.close()


# ---------------------------------------------------------------- durability
@pytest.fixture
def persistent_broker(tmp_path):
    """A broker that keeps sessions across stop()/start(), so a subscriber misses nothing."""
    if not os.path.exists(MOSQUITTO):
        pytest.skip("mosquitto not installed")
    d = tmp_path / "mq"
    d.mkdir()
    # when run as root mosquitto drops to user "mosquitto", which cannot write in tmp_path
    root = "user root\n" if os.geteuid() == 0 else ""
    b = Broker(d, extra_conf=f"persistence true\npersistence_location {d}/\n{root}").start()
    yield b
    b.stop()


def test_outage_delivers_everything_in_order(persistent_broker, tmp_path, sinks):
    b = persistent_broker
    s, ob = sinks(make_cfg(tmp_path / "st", b.port))
    sub = Sub(b.port, [P + "alerts"], client_id="outage-sub", clean=False)
    s.start()
    s.alert(ev(0))
    sub.wait(lambda m: alert_ids(m) == ["n1-pump1-0"], "first alert")
    b.stop()
    wait_until(lambda: not s.connected, "the sink to notice the outage")
    n = 30
    for i in range(1, n + 1):
        s.alert(ev(i, "update" if i % 3 else "new"))
    assert ob.depth() == n
    b.start()
    msgs = sub.wait(lambda m: len(set(alert_ids(m))) == n + 1, "all alerts after the outage")
    ids = alert_ids(msgs)
    first_seen = list(dict.fromkeys(ids))
    assert first_seen == [f"n1-pump1-{i}" for i in range(n + 1)]
    wait_until(lambda: ob.depth() == 0, "outbox emptied")
    sub.close()


def test_restart_delivers_what_an_earlier_run_queued(broker, tmp_path, sinks):
    port = broker.port
    broker.stop()
    cfg = make_cfg(tmp_path / "st", port)
    s1, ob1 = sinks(cfg)
    s1.start()
    for i in range(5):
        s1.alert(ev(i, "new"))
        s1.alert(ev(i, "end"))
    s1.stop()

    broker.start()
    sub = Sub(port, [P + "alerts"])
    s2, ob2 = sinks(cfg)
    assert ob2.depth() == 10
    s2.start()
    sub.wait(lambda m: len(alert_ids(m)) >= 10, "queued alerts from the first run")
    wait_until(lambda: ob2.depth() == 0, "outbox emptied")
    # in order, and no "restart" end: every alert had its own end
    assert [(json.loads(m[1])["id"], json.loads(m[1])["type"]) for m in sub.on(P + "alerts")] \
        == [(f"n1-pump1-{i}", t) for i in range(5) for t in ("new", "end")]
    sub.close()


_KILLED_SCRIPT = """
import sys, time
import msgspec
import numpy as np
from agent.config import AgentConfig
from agent.config_build import build
from agent.metrics import Metrics
from agent.sinks import mqtt
mqtt.PERSIST_S = 0.0
cfg = build(AgentConfig, msgspec.json.decode(sys.argv[1]))
s = mqtt.MqttSink(cfg, Metrics())
s.start()
one = np.ones(2, np.int8)
s.scores("pump1", np.array([1000.0, 1001.0]), np.array([0.9, 0.9]), 0.3, one, one)
s.alert(eval(sys.argv[2]))
s.scores("pump1", np.array([1005.5]), np.array([0.8]), 0.3, one[:1], one[:1])
time.sleep(600)
"""


def test_alert_left_open_by_a_killed_run_ends_with_reason_restart(broker, tmp_path, sinks):
    cfg = make_cfg(tmp_path / "st", broker.port)
    sub = Sub(broker.port, [P + "alerts"])
    opened = ev(1, "new")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SCRIPT, msgspec.json.encode(cfg),
                             repr(opened)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    db_path = tmp_path / "st" / "outbox.sqlite"

    def persisted():
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT id, last_ts FROM open_alerts").fetchall()
        except sqlite3.OperationalError:      # not created yet
            return []
        finally:
            db.close()
    try:
        sub.wait(lambda m: alert_ids(m) == [opened["id"]], "the new event from the child")
        wait_until(lambda: persisted() == [(opened["id"], 1005.5)], "the last sample time stored")
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
    finally:
        proc.kill()
    s, ob = sinks(cfg)
    s.start()
    sub.wait(lambda m: any(json.loads(x[1])["type"] == "end" for x in m), "the restart end")
    wait_until(lambda: ob.depth() == 0, "outbox emptied")
    # the new may come twice (at least once: the killed run may not have seen its PUBACK)
    events = [json.loads(m[1]) for m in sub.on(P + "alerts")]
    assert {json.dumps(e) for e in events[:-1]} == {json.dumps(opened)}
    assert events[-1] == {**opened, "type": "end", "end": "1970-01-01T00:16:45.500Z",
                          "reason": "restart"}
    assert persisted() == []
    s.stop()
    assert Outbox(db_path).left_open() == []     # ended once, never again
    sub.close()


def test_full_disk_alerts_still_published_and_health_says_so(broker, tmp_path, sinks,
                                                           monkeypatch):
    # no retry while the test runs: a retry truncates the WAL, and what that frees can
    # let the outbox recover with the filler still there (on a loaded machine the 30
    # alerts can take longer than RETRY_S), and health would rightly say ok
    monkeypatch.setattr(outbox_mod, "RETRY_S", 3600.0)
    with tiny_fs(tmp_path / "fs") as d:
        s, ob = sinks(make_cfg(d / "st", broker.port))
        sub = Sub(broker.port, [P + "alerts", P + "health"])
        s.start()
        fill(d)
        sent = [ev(i, ("new", "update", "end")[i % 3]) for i in range(30)]
        for e in sent:
            s.alert(e)
        msgs = sub.wait(lambda m: len(alert_ids(m)) >= 30, "every alert despite the full disk")
        assert [json.loads(m[1]) for m in msgs if m[0] == P + "alerts"] == sent
        wait_until(lambda: ob.depth() == 0, "all acknowledged")
        s.health({"x": 2})
        msgs = sub.wait(has(P + "health"), "health")
        out = json.loads(sub.on(P + "health")[-1][1])["mqtt"]["outbox"]
        assert out["ok"] is False and "full" in out["error"] and out["lost"] == 0, out
        s.stop()
        sub.close()


# ---------------------------------------------------------------- authentication
def test_wrong_password_logs_and_retries(tmp_path, sinks, caplog, monkeypatch):
    if not os.path.exists(MOSQUITTO):
        pytest.skip("mosquitto not installed")
    d = tmp_path / "mq"
    d.mkdir()
    pw = d / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "agent", "right-horse-battery"],
                   check=True, capture_output=True)
    root = "user root\n" if os.geteuid() == 0 else ""    # see persistent_broker
    b = Broker(d, extra_conf=f"allow_anonymous false\npassword_file {pw}\n{root}").start()
    try:
        secret = "Wr0ng-Secret-Value"
        monkeypatch.setenv("TSAD_TEST_PW", secret)
        caplog.set_level(logging.DEBUG)
        s, ob = sinks(make_cfg(tmp_path / "st", b.port, username="agent",
                               password_env="TSAD_TEST_PW"))
        s.start()
        s.alert(ev(1))                       # buffered, not lost, no exception
        wait_until(lambda: s.connect_failures >= 2, "a retry after the refusal")
        assert not s.connected and ob.depth() == 1
        refused = [r for r in caplog.records if "refused the connection" in r.getMessage()]
        assert refused and refused[0].levelno == logging.ERROR
        assert "username 'agent'" in refused[0].getMessage()
        assert secret not in caplog.text
        s.stop()

        # the right password through the same path connects and delivers the buffered alert
        monkeypatch.setenv("TSAD_TEST_PW", "right-horse-battery")
        s2, ob2 = sinks(make_cfg(tmp_path / "st2", b.port, username="agent",
                                 password_env="TSAD_TEST_PW", client_id="ok"))
        ob2.put(P + "alerts", json.dumps(ev(5)).encode(), "new")
        s2.start()
        wait_until(lambda: ob2.depth() == 0, "delivery with the right password")
        assert "right-horse-battery" not in caplog.text
    finally:
        b.stop()


def test_absent_broker_is_not_fatal(tmp_path, sinks, caplog):
    caplog.set_level(logging.WARNING)
    s, ob = sinks(make_cfg(tmp_path / "st", free_port()))
    s.start()
    s.alert(ev(1))
    s.state("pump1", "anomaly")
    s.score("pump1", 1.0, 0.5, 0.3, 1)
    s.health({"x": 1})
    wait_until(lambda: any("unreachable" in r.getMessage() for r in caplog.records),
               "the unreachable-broker log line")
    assert s.connect_failures >= 1 and not s.connected
    assert ob.depth() == 1
    s.stop()

"""Acknowledgement as ISA-18.2 has it (alarm audit, twenty-second session): an alert that
ends before anyone acked it is "returned to normal, unacknowledged": it stays listed and
can be acked, by its id or by its stream (a static Home Assistant button carries no id)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from agent.alerts import AlertTracker
from agent.commands import execute, parse
from agent.config import AlertConfig
from agent_harness import (MOSQUITTO, NODE, REPO, STREAM, Rig, no_traceback, retained,
                           wait_until)
from conftest import free_port
from prom_harness import scrape, value
from test_mqtt_ops import SCHEMAS

CFG = AlertConfig(open_k=1, open_n=1, close_m=2)


def tracker() -> AlertTracker:
    return AlertTracker("n", "s", CFG, ["a", "b"], {"name": "m"})


def run(t: AlertTracker, scores: list[float], t0: float = 0.0) -> list[dict]:
    ts = t0 + np.arange(len(scores), dtype=np.float64)
    return t.update(ts, np.array(scores), 1.0, np.ones((len(scores), 2)))


def test_an_alert_that_ended_unacked_waits_for_its_ack():
    t = tracker()
    new, end = run(t, [0.1, 5.0, 0.1, 0.1])
    assert end["type"] == "end" and end["acknowledged"] is False
    assert t.alarm == "rtn_unacknowledged"
    assert t.ack("someone-else", 1.0) is None
    ev = t.ack(new["id"], 1.0)
    assert ev == {**end, "acknowledged": True}       # its end again, acknowledged
    assert t.alarm == "normal" and t.ack(new["id"], 1.0) is None


def test_an_alert_acked_while_open_ends_normal_and_a_new_one_supersedes():
    t = tracker()
    new = run(t, [5.0])[0]
    assert t.ack(None, 1.0)["type"] == "update" and t.alarm == "acknowledged"
    run(t, [0.1, 0.1], 1.0)
    assert t.alarm == "normal"
    first = run(t, [5.0, 0.1, 0.1], 10.0)[0]         # ends unacked ...
    second = run(t, [5.0], 20.0)[0]                  # ... and a new alert takes its place
    assert t.alarm == "unacknowledged" and first["id"] != second["id"] != new["id"]
    assert t.ack(first["id"], 1.0) is None and t.ack(None, 1.0)["id"] == second["id"]


def test_ack_takes_an_alert_id_or_a_stream():
    assert parse('{"cmd": "ack", "stream": "pump"}').args == {"stream": "pump"}
    assert parse('{"cmd": "ack", "alert_id": "n:pump:1", "stream": "pump"}').args == \
        {"alert_id": "n:pump:1"}
    assert "needs 'alert_id'" in parse('{"cmd": "ack"}').error

    class Engine:                   # what execute needs of the engine: its ack, its streams
        streams = {"pump": None}

        def ack(self, alert_id, sid):
            return None
    res, evs = execute(parse('{"id": "r", "cmd": "ack", "stream": "pump"}'), Engine())
    assert res["error"] == "stream 'pump' has no alert to acknowledge" and evs == []
    res, _ = execute(parse('{"id": "r", "cmd": "ack", "stream": "pmup"}'), Engine())
    assert res["error"] == ("stream 'pmup' has no alert to acknowledge (no such stream runs: "
                            "check its id)")
    for doc in ({"cmd": "ack", "stream": "pump"}, {"cmd": "ack", "alert_id": "n:pump:1"}):
        SCHEMAS["command"].validate(doc)


@pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto not installed")
def test_a_dashboard_lists_and_acks_an_alert_that_ended_unacked(tmp_path):
    port = free_port()
    rig = Rig(tmp_path, metrics={"listen": f"127.0.0.1:{port}"})
    topic = f"tsad/{NODE}/stream/{STREAM}/alert"
    try:
        agent = rig.agent()
        rig.writer.normal(10)
        (aid,) = rig.writer.spikes(1)
        rig.obs.wait_ids({aid})
        end = json.loads(retained(rig.broker.port, topic))
        assert end["type"] == "end" and end["id"] == aid and end["acknowledged"] is False
        h = wait_until(lambda: (h := rig.obs.healths()) and
                       h[-1][1]["streams"][STREAM]["alarm"] == "rtn_unacknowledged" and h[-1][1],
                       "health: returned to normal, unacknowledged")
        assert h["streams"][STREAM]["state"] == "normal"
        assert h["streams_summary"]["rtn_unacknowledged"] == 1
        wait_until(lambda: value(scrape(port), "tsad_stream_unacknowledged", stream=STREAM) == 1,
                   "Prometheus: awaiting an ack", step=0.2)

        # the Home Assistant button's command: the stream's latest alert
        p = subprocess.run([sys.executable, "-m", "agent.cli", "ack", STREAM, "--host",
                            "127.0.0.1", "--port", str(rig.broker.port), "--node", NODE],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["alert_id"] == aid
        wait_until(lambda: [a["acknowledged"] for a in rig.obs.alerts() if a["type"] == "end"]
                   == [False, True], "its end again, acknowledged")
        again = [a for a in rig.obs.alerts() if a["type"] == "end"][1]
        assert {**again, "acknowledged": False} == end
        wait_until(lambda: rig.obs.topic(f"stream/{STREAM}/alert")[-1][1] == b"",
                   "the retained alert cleared")
        wait_until(lambda: rig.obs.healths()[-1][1]["streams"][STREAM]["alarm"] == "normal",
                   "health: normal")
        wait_until(lambda: value(scrape(port), "tsad_stream_unacknowledged", stream=STREAM) == 0,
                   "Prometheus: acknowledged", step=0.2)
        no_traceback(agent)
    finally:
        rig.close()


def test_an_unacked_end_outlives_its_streams_eviction(tmp_path):
    """Review (twenty-second session): idle eviction took the stream, and its alert that
    ended unacknowledged with it: ack answered "no alert" while the retained end stayed."""
    from agent.config import DetectionConfig
    from agent.config_build import build
    from agent.detector import Detector
    from agent.engine import Engine
    from agent.sources.base import Batch
    from onnx_factory import make_model
    path, _ = make_model(tmp_path / "m.onnx", window=4, channels=["a", "b"], threshold=1.0)
    e = Engine(build(DetectionConfig, {"node": "n", "scoring": {"threshold": 1.0},
                                       "alerts": {"open_k": 1, "open_n": 1, "close_m": 2},
                                       "buffer": {"idle_evict_s": 60}}), Detector(str(path)))
    v = np.zeros((20, 2), np.float32)
    v[10] = 1000.0                                   # one alert, which ends unacknowledged
    res = e.step([Batch("s", 1e9 + np.arange(20.0), v)])
    (end,) = [ev for r in res for ev in r.events if ev["type"] == "end"]
    for sid in ("s", "t"):                           # "t": only to have two held
        e.streams.get(sid) or e.step([Batch(sid, 1e9 + np.arange(20.0), v)])
    assert e.evict_idle(now=e.streams["s"].last_seen + 61) == ["s", "t"]
    assert set(e.held_rtn) == {"s", "t"}
    assert e.ack(None, "s") == {**end, "acknowledged": True} and set(e.held_rtn) == {"t"}
    assert e.ack(end["id"]) is None                  # acked once
    e.step([Batch("t", 2e9 + np.arange(3.0), v[:3])])     # "t" returns: its end with it
    assert e.streams["t"].tracker.alarm == "rtn_unacknowledged" and e.held_rtn == {}


@pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto not installed")
def test_an_unacked_end_outlives_reloads(tmp_path):
    """Review: a reload that rebuilt the MQTT sink cleared the retained end of an alert
    still unacknowledged; one that built a new engine forgot it, so no ack could reach it."""
    import signal

    import yaml
    from agent_harness import tiny_model
    rig = Rig(tmp_path)
    topic = f"tsad/{NODE}/stream/{STREAM}/alert"

    def reload(change) -> None:
        cfg = yaml.safe_load(rig.config.read_text())
        change(cfg)
        rig.config.write_text(yaml.safe_dump(cfg))
        n = agent.count("reloaded ")
        agent.signal(signal.SIGHUP)
        agent.wait_log("reloaded ", n + 1)
    try:
        agent = rig.agent()
        rig.writer.normal(10)
        (aid,) = rig.writer.spikes(1)
        rig.obs.wait_ids({aid})
        # 1. new outputs (a sink setting), the engine carried over
        reload(lambda c: c["mqtt"].update(health_interval_s=0.3))
        assert "streams carry on" in agent.log()
        assert json.loads(retained(rig.broker.port, topic))["id"] == aid
        # 2. a new model: a new engine
        v2 = tiny_model(tmp_path, "tiny_v2", scale=0.8)
        reload(lambda c: c["model"].update(path=str(v2)))
        assert json.loads(retained(rig.broker.port, topic))["id"] == aid
        p = subprocess.run([sys.executable, "-m", "agent.cli", "ack", STREAM, "--host",
                            "127.0.0.1", "--port", str(rig.broker.port), "--node", NODE],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and json.loads(p.stdout)["alert_id"] == aid, p.stdout + p.stderr
        wait_until(lambda: rig.obs.topic(f"stream/{STREAM}/alert")[-1][1] == b"",
                   "the retained alert cleared")
        no_traceback(agent)
    finally:
        rig.close()

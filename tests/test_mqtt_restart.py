"""What the agent publishes right after it comes back (a crash, a reload that rebuilds the
streams), with a real Mosquitto and the real agent process.

- A stream says `warming_up` until its first window after the restart is judged: `normal`
  there would tell Home Assistant that a fault still present had cleared.
- Home Assistant's buttons of topic-named streams, shown again at a restart, work before
  those streams' first sample: a shelve waits for it, a recalibrate deletes the saved
  baseline, and "unknown stream" stays for ids the agent never knew.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import yaml

from agent.state_store import StateStore
from agent_harness import (MOSQUITTO, NODE, STREAM, AgentProcess, Observer, Publisher, Rig,
                           alert_id, no_traceback, persistent_broker, retained, tiny_model,
                           wait_until, write_config)
from test_mqtt_ops import SCHEMAS, assert_payloads_valid

pytestmark = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto not installed")

LEARN = 30                      # calibration.samples
WINDOW = 8                      # the tiny model's
HA = f"homeassistant/device/{NODE}/config"
CAL = {"enabled": True, "samples": LEARN}


def _states(obs: Observer, sid: str = STREAM) -> list[bytes]:
    return [p for _, p, _ in obs.topic(f"stream/{sid}/state")]


def _runs(states: list[bytes]) -> list[bytes]:
    """Consecutive repeats folded: a state re-published is the same state."""
    return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]


def _health(obs: Observer, sid: str, pred, after: float = 0.0) -> None:
    wait_until(lambda: any(pred(h["streams"].get(sid, {})) for at, h in obs.healths()
                           if at >= after), f"a health snapshot of {sid} as expected")


def _shows_as_home_assistant_would(port: int, states: set[bytes]) -> None:
    """Every state published is one the state entity accepts, and the problem sensor
    shows unknown, not "cleared", for the ones that are neither normal nor anomaly."""
    cmps = json.loads(retained(port, HA))["cmps"]
    options = set(cmps[f"{STREAM}_state"]["options"])
    assert {s.decode() for s in states} <= options, (states, options)
    template = cmps[f"{STREAM}_anomaly"]["value_template"]
    try:
        import jinja2
    except ImportError:
        return
    render = jinja2.Environment().from_string(template).render
    assert render(value="warming_up") == render(value="learning") == "None"
    assert (render(value="normal"), render(value="anomaly")) == ("OFF", "ON")


def _learned_then_open(rig: Rig, agent: AgentProcess) -> str:
    rig.writer.normal(LEARN + 10)
    agent.wait_log("learned its baseline")
    # saved soon after learning: a restart finds it
    store = StateStore(rig.state)
    wait_until(lambda: store.path(STREAM).exists(), "the saved baseline")
    held = alert_id(rig.writer.line(True))
    wait_until(lambda: held in rig.obs.ids("new"), "the alert to open")
    return held


def _warming_up_until_judged(rig: Rig, since: int) -> list[bytes]:
    """Anomalous lines one short of a window: the stream is online and says warming_up;
    the line that completes the window opens an alert.  The states published since."""
    w = rig.writer
    wait_until(lambda: _states(rig.obs)[since:], "the state of the new run")
    first, t = w.i, time.monotonic()
    for _ in range(WINDOW - 1):
        w.line(True)
    _health(rig.obs, STREAM, lambda s: s.get("samples") == WINDOW - 1, after=t)
    wait_until(lambda: rig.obs.topic(f"stream/{STREAM}/availability")[-1][1] == b"online",
               "the stream online")
    assert _runs(_states(rig.obs)[since:]) == [b"warming_up"], _states(rig.obs)[since:]
    assert rig.obs.healths()[-1][1]["streams"][STREAM]["state"] == "warming_up"
    fresh = alert_id(w.line(True))
    wait_until(lambda: fresh in rig.obs.ids("new"), "the alert of the first window")
    assert fresh == alert_id(first + WINDOW - 1)
    wait_until(lambda: _states(rig.obs)[-1:] == [b"anomaly"], "the state anomaly")
    return _states(rig.obs)[since:]


def test_after_a_crash_the_state_is_warming_up_until_a_window_is_judged(tmp_path):
    rig = Rig(tmp_path, calibration=CAL, mqtt={"homeassistant": {"enabled": True}})
    try:
        agent = rig.agent()
        held = _learned_then_open(rig, agent)
        # a stream that learns says so; the start, before any sample, says warming_up
        assert _runs(_states(rig.obs)) == [b"warming_up", b"learning", b"normal", b"anomaly"]
        agent.kill()
        wait_until(lambda: rig.obs.availability()[-1:] == [b"offline"], "the last will")
        since = len(_states(rig.obs))
        again = rig.agent()
        states = _warming_up_until_judged(rig, since)
        assert _runs(states) == [b"warming_up", b"anomaly"], states
        assert "stream pump: baseline restored" in again.log()
        (end,) = [a for a in rig.obs.alerts() if a["id"] == held and a["type"] == "end"]
        assert end["reason"] == "restart"
        _shows_as_home_assistant_would(rig.broker.port, set(_states(rig.obs)))
        msgs = [(t, p, 1, r) for _, t, p, r in rig.obs.msgs]
        assert assert_payloads_valid(msgs) > 0
        assert any(h["streams"].get(STREAM, {}).get("state") == "warming_up"
                   for _, h in rig.obs.healths())
        no_traceback(again)
    finally:
        rig.close()


def test_after_a_reload_that_rebuilds_the_streams_the_state_is_warming_up(tmp_path):
    rig = Rig(tmp_path, calibration=CAL)
    try:
        agent = rig.agent()
        held = _learned_then_open(rig, agent)
        cfg = yaml.safe_load(rig.config.read_text())
        cfg["alerts"]["close_m"] = 3        # a detection setting: the streams are built anew
        rig.config.write_text(yaml.safe_dump(cfg))
        since = len(_states(rig.obs))
        agent.signal(signal.SIGHUP)
        agent.wait_log("reloaded")
        wait_until(lambda: held in rig.obs.ids("end"), "the reload's end")
        states = _warming_up_until_judged(rig, since)
        assert _runs(states) == [b"warming_up", b"anomaly"], states
        assert agent.count("stream pump: baseline restored") == 1
        no_traceback(agent)
    finally:
        rig.close()


# ---------------------------------------------------------------- topic-named streams
def _samples(sid: str, t0: float, n: int, spike_at: int | None = None) -> list:
    return [(f"plant/{sid}/sensors", json.dumps(
        {"ts": t0 + i, "values": [1000.0] * 3 if i == spike_at else [0.0] * 3}).encode())
        for i in range(n)]


def _result(obs: Observer, rid: str) -> dict:
    wait_until(lambda: any(json.loads(p).get("id") == rid for _, p, _ in obs.topic("cmd/result")),
               f"the result of {rid}")
    return next(r for _, p, _ in obs.topic("cmd/result") if (r := json.loads(p))["id"] == rid)


def _discovered(port: int) -> set[str]:
    try:
        return set(json.loads(retained(port, HA, timeout=1))["cmps"])
    except AssertionError:      # nothing retained yet
        return set()


def _press(dev: Publisher, port: int, key: str) -> str:
    """What Home Assistant sends for button `key`; the command's id."""
    press = json.loads(retained(port, HA))["cmps"][key]
    dev.send([(press["command_topic"], press["payload_press"].encode())])
    return json.loads(press["payload_press"])["id"]


def test_buttons_of_topic_named_streams_work_before_their_first_sample(tmp_path):
    broker = persistent_broker(tmp_path / "mq").start()
    obs = Observer(broker.port).wait_subscribed()
    dev = Publisher(broker.port)
    path = write_config(tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=broker.port,
                        serial_port="-", state_dir=tmp_path / "state", calibration=CAL,
                        mqtt={"homeassistant": {"enabled": True}})
    cfg = yaml.safe_load(path.read_text())
    cfg["streams"] = [{"id": "plant", "source": {"type": "mqtt", "topic": "plant/+/sensors",
                                                 "stream_from_topic": 1}}]
    path.write_text(yaml.safe_dump(cfg))
    t0 = 1.7e9
    first = AgentProcess(path, tmp_path / "agent.log").start()
    again = AgentProcess(path, tmp_path / "agent2.log")
    try:
        first.wait_log("subscribed to")
        n = LEARN + 10
        dev.send(_samples("a", t0, n + 1, spike_at=n) + _samples("b", t0, n))
        first.wait_log("learned its baseline", 2)
        wait_until(lambda: obs.ids("new"), "a's alert")
        (old,) = obs.ids("new")
        wait_until(lambda: {"a_shelve", "b_recalibrate"} <= _discovered(broker.port),
                   "a and b in Home Assistant")
        first.signal(signal.SIGTERM)      # baselines saved; the alert ends (stopped)
        assert first.proc.wait(10) == 0
        del obs.msgs[:]

        again.start()
        # the previous run's discovery read back: a and b are shown again, no verdict yet
        wait_until(lambda: _states(obs, "a") and _states(obs, "b"), "a and b shown again")
        shelve = _result(obs, _press(dev, broker.port, "a_shelve"))
        assert shelve["ok"] is True and shelve["shelved_until"], shelve
        assert _states(obs, "a") == _states(obs, "b") == [b"warming_up"]
        SCHEMAS["command-result"].validate(shelve)
        wait_until(lambda: [json.loads(p)["shelved_until"] for _, p, _ in
                            obs.topic("stream/a/shelved")][-1:] == [shelve["shelved_until"]],
                   "a shown shelved before its first sample")
        relearn = _result(obs, _press(dev, broker.port, "b_recalibrate"))
        assert relearn["ok"] is True and relearn["stream"] == "b", relearn
        assert not StateStore(tmp_path / "state").path("b").exists()
        # nothing is open after a restart: acking the earlier alert says so
        dev.send([(f"tsad/{NODE}/cmd", json.dumps(
            {"id": "k1", "cmd": "ack", "alert_id": old}).encode())])
        assert _result(obs, "k1")["error"] == \
            f"no alert {old!r} to acknowledge (open, or ended unacknowledged)"
        dev.send([(f"tsad/{NODE}/cmd", json.dumps(
            {"id": "z1", "cmd": "shelve", "stream": "zz", "for_s": 60}).encode())])
        assert _result(obs, "z1")["error"] == "unknown stream 'zz'"

        # a returns from maintenance with the fault: shelved, no alert
        dev.send(_samples("a", t0 + 1000, 14, spike_at=10))
        _health(obs, "a", lambda s: s.get("samples") == 14 and s["shelved_until"])
        again.wait_log("stream a: shelved again for the")
        assert "stream a: baseline restored" in again.log()
        # b learns afresh
        dev.send(_samples("b", t0 + 1000, 3))
        wait_until(lambda: b"learning" in _states(obs, "b"), "b learning")
        assert "stream b: learning its baseline" in again.log()
        assert "stream b: baseline restored" not in again.log()
        dev.send([(f"tsad/{NODE}/cmd", json.dumps(
            {"id": "u1", "cmd": "unshelve", "stream": "a"}).encode())])
        assert _result(obs, "u1")["ok"] is True
        assert not obs.ids("new"), obs.alerts()       # alerts go out before later results
        assert assert_payloads_valid([(t, p, 1, r) for _, t, p, r in obs.msgs]) > 0
        no_traceback(again)
    finally:
        first.close()
        again.close()
        dev.close()
        obs.close()
        broker.stop()

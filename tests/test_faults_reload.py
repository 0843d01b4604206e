"""SIGHUP storms on the real agent process (issue 11, finding 15): a reload that changes
neither the model nor the detection settings must not touch a stream's state, so an
open alert stays open and the learned baseline stays; a reload that changes the
model ends the open alert with reason "reload" and the stream learns again.

Real Mosquitto, a real pty as the serial port, a persistent-session subscriber; the
deterministic model of agent_harness makes every alert id known in advance.
"""
from __future__ import annotations

import os
import signal

import pytest

from agent_harness import (MOSQUITTO, SPACING, STREAM, AgentProcess, LineWriter, Observer, Pty,
                           alert_id, assert_exact, no_traceback, persistent_broker, tiny_model,
                           wait_until, write_config)

pytestmark = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto not installed")

LEARN = 50      # calibration.samples
STORM = 50      # SIGHUPs in a row


def _alerts(obs: Observer, aid: str, typ: str) -> list[dict]:
    return [a for a in obs.alerts() if a["id"] == aid and a["type"] == typ]


def _states(obs: Observer) -> list[bytes]:
    return [p for _, p, _ in obs.topic(f"stream/{STREAM}/state")]


def test_sighup_storm_keeps_the_open_alert_and_a_model_change_ends_it(tmp_path):
    broker = persistent_broker(tmp_path / "mq").start()
    obs = Observer(broker.port).wait_subscribed()
    pty = Pty()
    w = LineWriter(pty)
    cal = {"enabled": True, "samples": LEARN}
    cfg = write_config(tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=broker.port,
                       serial_port=pty.path, state_dir=tmp_path / "state", calibration=cal)
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        # the port flushes its input when opened: write only once the agent has it open
        agent.wait_log("open at")
        wait_until(lambda: obs.availability()[-1:] == [b"online"], "agent online")
        w.normal(LEARN + 10)
        agent.wait_log("learned its baseline")
        held = alert_id(w.line(True))
        wait_until(lambda: held in obs.ids("new"), "the alert to open")

        # Each reload waits for the one before (signals sent while one runs would merge
        # into one reload); an anomalous line between two keeps the alert's cause going
        # through every reload.
        for k in range(1, STORM + 1):
            agent.signal(signal.SIGHUP)
            agent.wait_log("reloaded", k)
            w.line(True)
        w.normal(SPACING)
        wait_until(lambda: held in obs.ids("end"), "the alert to end")
        # the issue: every reload ended the alert and the next window opened a new one
        assert obs.ids("new") == obs.ids("end") == {held: 1}, obs.alerts()
        assert _alerts(obs, held, "end")[0]["reason"] == "recovered"
        assert agent.count("model and detection settings unchanged: streams carry on") == STORM
        assert agent.count("keep running") == STORM       # the serial port stayed open
        assert agent.count("learned its baseline") == 1
        assert agent.count("learning its baseline") == 1
        expected = {held} | set(w.spikes(3))
        obs.wait_ids(expected)
        print(f"{STORM} SIGHUPs with an alert open: {assert_exact(obs, expected)}")
        assert _states(obs).count(b"learning") == 1, _states(obs)
        assert b"offline" not in obs.availability()        # the outputs were kept too

        # a new model: the open alert ends (reason "reload") and the stream learns again
        changed = alert_id(w.line(True))
        wait_until(lambda: changed in obs.ids("new"), "the second alert to open")
        write_config(cfg, model=tiny_model(tmp_path, "tiny_v2", scale=0.8), port=broker.port,
                     serial_port=pty.path, state_dir=tmp_path / "state", calibration=cal)
        agent.signal(signal.SIGHUP)
        agent.wait_log("reloaded", STORM + 1)
        wait_until(lambda: changed in obs.ids("end"), "the reload end")
        (end,) = _alerts(obs, changed, "end")
        assert end["reason"] == "reload", end
        expected.add(changed)
        w.normal(LEARN)
        agent.wait_log("learned its baseline", 2)
        expected |= set(w.spikes(3))
        obs.wait_ids(expected)
        stats = assert_exact(obs, expected)
        print(f"model changed by a reload: the open alert ended with reason reload; {stats}")
        assert stats["duplicates"] == 0
        assert _states(obs).count(b"learning") == 2, _states(obs)
        assert agent.running()
        no_traceback(agent)
    finally:
        agent.close()
        obs.close()
        broker.stop()
        pty.close()

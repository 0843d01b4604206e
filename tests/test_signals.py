"""Signals on the real agent process: SIGTERM stops cleanly, SIGHUP reloads the
config and model, and a reload that cannot work keeps the running ones."""
from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from agent_harness import (MOSQUITTO, NODE, AgentProcess, LineWriter, Observer, Pty,
                           alert_id, assert_exact, no_traceback, persistent_broker, sample_ts,
                           tiny_model, wait_until, write_config)

pytestmark = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto not installed")


@pytest.fixture
def rig(tmp_path):
    broker = persistent_broker(tmp_path / "mq").start()
    obs = Observer(broker.port).wait_subscribed()
    pty = Pty()
    made = []

    def start(config):
        a = AgentProcess(config, tmp_path / "agent.log").start()
        made.append(a)
        return a

    yield broker, obs, pty, start
    for a in made:
        a.close()
    obs.close()
    broker.stop()
    pty.close()


def test_sigterm_exits_zero_and_publishes_offline(tmp_path, rig):
    broker, obs, pty, start = rig
    cfg = write_config(tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=broker.port,
                       serial_port=pty.path, state_dir=tmp_path / "state")
    agent = start(cfg)
    agent.wait_log("open at")
    wait_until(lambda: b"online" in obs.availability(), "agent online")
    w = LineWriter(pty)
    w.normal(20)
    expected = set(w.spikes(2))
    obs.wait_ids(expected)
    still_open = alert_id(w.line(True))
    wait_until(lambda: still_open in obs.ids("new"), "an open alert")
    expected.add(still_open)

    agent.signal(signal.SIGTERM)
    assert agent.proc.wait(5) == 0
    wait_until(lambda: obs.availability()[-1:] == [b"offline"], "availability offline")
    # A clean DISCONNECT discards the will, so this "offline" is the agent's own.
    broker_log = (broker.dir / "mosquitto.log").read_text()
    assert f"Client tsad-{NODE}-sink disconnected." in broker_log, broker_log
    late = Observer(broker.port, client_id="late").wait_subscribed()
    try:
        wait_until(lambda: late.availability() == [b"offline"], "retained offline")
    finally:
        late.close()
    # the alert open at the stop was ended, not left open forever
    assert_exact(obs, expected)
    assert obs.topic("stream/pump/state")[-1][1] == b"normal"
    assert "stopping" in agent.log()
    no_traceback(agent)


def _model_names(obs: Observer, ids: set[str]) -> set[str]:
    return {a["model"]["name"] for a in obs.alerts() if a["id"] in ids}


def _running_on_v1(tmp_path, rig):
    """The agent on model tiny_v1 reading the pty, 20 normal lines in; returns it, the
    line writer, the config path, tiny_v2 to swap in and write_config's other args."""
    broker, obs, pty, start = rig
    v1 = tiny_model(tmp_path, "tiny_v1")
    v2 = tiny_model(tmp_path, "tiny_v2", scale=0.8)
    kw = dict(port=broker.port, serial_port=pty.path, state_dir=tmp_path / "state")
    cfg = write_config(tmp_path / "agent.yaml", model=v1, **kw)
    agent = start(cfg)
    agent.wait_log("open at")
    w = LineWriter(pty)
    w.normal(20)
    return agent, w, cfg, v2, kw


def _notified(s: socket.socket) -> list[str]:
    """The datagrams systemd would have had so far."""
    out = []
    s.setblocking(False)
    while True:
        try:
            out.append(s.recv(4096).decode())
        except BlockingIOError:
            return out


def test_sighup_rejects_bad_config_and_model_then_reloads(tmp_path, rig, monkeypatch):
    obs = rig[1]
    sd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)   # systemd's notification socket
    sd.bind(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    agent, w, cfg, v2, kw = _running_on_v1(tmp_path, rig)
    expected = set(w.spikes(2))
    obs.wait_ids(expected)

    # 1. a config with a YAML syntax error
    good = cfg.read_text()
    cfg.write_text(good + "alerts: {open_k: 1\n")
    agent.signal(signal.SIGHUP)
    agent.wait_log("reload rejected")
    assert "not valid YAML" in agent.log()
    # health says so too, not only the journal (ORT audit, twenty-second session)
    h = wait_until(lambda: (h := obs.healths()) and h[-1][1].get("reload") and h[-1][1],
                   "health naming the rejected reload")
    assert h["reload"]["ok"] is False and "not valid YAML" in h["reload"]["error"]
    sent = _notified(sd)
    assert sent[0].startswith("READY=1\nSTATUS=model tiny_v1 on CPUExecutionProvider")
    assert sent[-1].startswith("READY=1\nSTATUS=reload rejected: ") and "not valid YAML" in \
        sent[-1] and sent[-1].endswith("; still model tiny_v1 on CPUExecutionProvider, 1 stream(s)")
    ids = set(w.spikes(2))
    expected |= ids
    obs.wait_ids(expected)
    assert _model_names(obs, ids) == {"tiny_v1"}

    # 2. a valid config naming a password file that is not there
    write_config(cfg, model=v2, mqtt={"username": "u", "password_file": str(tmp_path / "nope")},
                 **kw)
    agent.signal(signal.SIGHUP)
    agent.wait_log("reload rejected", 2)
    assert "mqtt.password_file: cannot read" in agent.log()

    # 3. a valid config whose model file was tampered with after export
    tampered = tmp_path / "tiny_v2_bad.onnx"
    tampered.write_bytes(v2.read_bytes() + b"\0")
    (tmp_path / "tiny_v2_bad.onnx.json").write_text((tmp_path / "tiny_v2.onnx.json").read_text())
    write_config(cfg, model=tampered, **kw)
    agent.signal(signal.SIGHUP)
    agent.wait_log("reload rejected", 3)
    rejected = [ln for ln in agent.log().splitlines() if "reload rejected" in ln][-1]
    assert "sha256" in rejected or "checksum" in rejected, rejected
    ids = set(w.spikes(2))
    expected |= ids
    obs.wait_ids(expected)
    assert _model_names(obs, ids) == {"tiny_v1"}

    # 3b. a model whose metadata policy holds a value the agent does not accept: found
    # before anything stops (the engine applies the policy only when it is built)
    bad = tmp_path / "tiny_v2_policy.onnx"
    bad.write_bytes(v2.read_bytes())
    meta = json.loads((tmp_path / "tiny_v2.onnx.json").read_text())
    meta["policy"] = {"settings": {"calibration": {"samples": "many"}}}
    (tmp_path / "tiny_v2_policy.onnx.json").write_text(json.dumps(meta))
    write_config(cfg, model=bad, **kw)
    agent.signal(signal.SIGHUP)
    agent.wait_log("reload rejected", 4)
    rejected = [ln for ln in agent.log().splitlines() if "reload rejected" in ln][-1]
    assert "policy.settings.calibration.samples: value 'many' is invalid" in rejected, rejected
    ids = set(w.spikes(2))
    expected |= ids
    obs.wait_ids(expected)
    assert _model_names(obs, ids) == {"tiny_v1"} and agent.running()

    # 4. a valid config with the new model, while an alert is open: the old
    # pipeline ends it (the new one could not)
    still_open = alert_id(w.line(True))
    wait_until(lambda: still_open in obs.ids("new"), "an open alert")
    expected.add(still_open)
    write_config(cfg, model=v2, **kw)
    agent.signal(signal.SIGHUP)
    agent.wait_log("reloaded")
    assert "source(s) of pump keep running" in agent.log()
    wait_until(lambda: still_open in obs.ids("end"), "the open alert ended at the reload")
    assert _model_names(obs, {still_open}) == {"tiny_v1"}
    w.normal(10)                          # refill the new pipeline's window
    ids = set(w.spikes(2))
    expected |= ids
    obs.wait_ids(expected)
    assert _model_names(obs, ids) == {"tiny_v2"}
    wait_until(lambda: obs.healths()[-1][1]["model"]["name"] == "tiny_v2", "health model")
    assert obs.healths()[-1][1]["reload"]["ok"] is True
    assert _notified(sd)[-1] == "READY=1\nSTATUS=model tiny_v2 on CPUExecutionProvider, 1 stream(s)"
    sd.close()
    assert "reload: the alerts of pump end (reason reload)" in agent.log()
    assert_exact(obs, expected)
    assert agent.running()
    no_traceback(agent)


def test_sighup_loads_the_model_again_only_when_it_changed(tmp_path, rig):
    obs = rig[1]
    agent, w, cfg, v2, kw = _running_on_v1(tmp_path, rig)
    loads = "model tiny_v1 (test-affine"      # the line every model load logs
    assert agent.count(loads) == 1

    # the same config, and one that changes a stream but not the model: no second load
    agent.signal(signal.SIGHUP)
    agent.wait_log("reloaded")
    write_config(cfg, model=tmp_path / "tiny_v1.onnx", alerts={"close_m": 3}, **kw)
    agent.signal(signal.SIGHUP)
    agent.wait_log("reloaded", 2)
    assert agent.count("model file and settings unchanged: not loaded again") == 2
    assert agent.count(loads) == 1
    w.normal(10)                          # refill the new pipeline's window
    ids = set(w.spikes(2))
    obs.wait_ids(ids)                      # the model kept serves the new pipeline
    assert _model_names(obs, ids) == {"tiny_v1"}

    # the model file replaced in place (a retrained model copied over): loaded again
    v1 = tmp_path / "tiny_v1.onnx"
    v1.write_bytes(v2.read_bytes())
    meta = json.loads((tmp_path / "tiny_v2.onnx.json").read_text())
    (tmp_path / "tiny_v1.onnx.json").write_text(json.dumps(meta))
    agent.signal(signal.SIGHUP)
    agent.wait_log("reloaded", 3)
    assert agent.count("model tiny_v2 (test-affine") == 1
    assert agent.count("not loaded again") == 2
    # the model's settings changed, not its files: loaded again
    write_config(cfg, model=v1, **kw)
    text = cfg.read_text().replace(f"path: {v1}", f"path: {v1}\n  max_batch: 8")
    assert text != cfg.read_text()
    cfg.write_text(text)
    agent.signal(signal.SIGHUP)
    agent.wait_log("reloaded", 4)
    assert agent.count("model tiny_v2 (test-affine") == 2
    w.normal(10)                          # refill the new pipeline's window
    ids = set(w.spikes(2))
    obs.wait_ids(ids)
    assert _model_names(obs, ids) == {"tiny_v2"}
    no_traceback(agent)


def _health(obs: Observer) -> dict:
    h = obs.healths()
    return h[-1][1] if h else {}


def test_sighup_keeps_the_serial_port_open_and_loses_no_line(tmp_path, rig):
    obs = rig[1]
    agent, w, cfg, v2, kw = _running_on_v1(tmp_path, rig)
    wait_until(lambda: _health(obs).get("samples_in") == 20, "20 samples in")

    # Half a line before the reload and the rest after it: a port closed and reopened
    # would have dropped the first half and counted the rest as a malformed line.
    line = f"{sample_ts(w.i):.3f},{LineWriter.NORMAL}\n".encode()
    cut = len(line) - 4                   # "...,0," now, "0,0\n" after the reload
    os.write(w.pty.master, line[:cut])
    time.sleep(0.5)   # let the agent read it (not a timing assertion)
    write_config(cfg, model=v2, **kw)
    agent.signal(signal.SIGHUP)
    agent.wait_log("reloaded")
    os.write(w.pty.master, line[cut:])
    w.i += 1
    w.normal(10)                          # refill the new pipeline's window
    ids = set(w.spikes(2))
    obs.wait_ids(ids)
    assert _model_names(obs, ids) == {"tiny_v2"}
    wait_until(lambda: _health(obs).get("samples_in") == w.i, f"all {w.i} samples in")
    h = _health(obs)
    assert h["malformed"] == {}, h["malformed"]
    assert sum(h["dropped"].values()) == 0, h["dropped"]
    assert agent.count("open at") == 1, "the port was closed and reopened"
    assert "source(s) of pump keep running" in agent.log()
    no_traceback(agent)


def test_a_reload_that_rebuilds_the_mqtt_sink_keeps_an_open_alert_open(tmp_path, rig):
    """A SIGHUP that changes the `mqtt` section but not the model rebuilds the sink on the
    same outbox while the engine carries its open alerts on.  The new sink took the outbox's
    record of them for a killed run's and sent an end (reason restart), then their updates
    and a second end (the review)."""
    broker, obs, pty, start = rig
    kw = dict(model=tiny_model(tmp_path), port=broker.port, serial_port=pty.path,
              state_dir=tmp_path / "state")
    cfg = write_config(tmp_path / "agent.yaml", **kw)
    agent = start(cfg)
    agent.wait_log("open at")
    w = LineWriter(pty)
    w.normal(20)
    opened = alert_id(w.line(True))
    w.line(True)
    wait_until(lambda: opened in obs.ids("new"), "an open alert")
    write_config(cfg, **kw, mqtt={"host": "127.0.0.1", "port": broker.port, "keepalive": 7,
                                  "health_interval_s": 0.2})
    agent.signal(signal.SIGHUP)
    agent.wait_log("reloaded")
    assert "model and detection settings unchanged" in agent.log()
    w.line(True)                          # still anomalous, then normal: it ends once
    w.normal(5)
    wait_until(lambda: opened in obs.ids("end"), "the alert's end")
    time.sleep(0.5)
    ends = [a for a in obs.alerts() if a["id"] == opened and a["type"] == "end"]
    assert len(ends) == 1 and ends[0]["reason"] != "restart", ends
    assert "sending its end (reason restart" not in agent.log()
    no_traceback(agent)


# The real agent, with its model load held until the test lets it go: a stand-in for
# loading and warming a large model on a small board, which takes minutes.
HELD_LOAD = """
import pathlib, sys, time
from agent.detector import Detector
held, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
load = Detector.from_config.__func__

def held_load(cls, *args, **kwargs):
    held.touch()
    while not go.exists():
        time.sleep(0.01)
    return load(cls, *args, **kwargs)

Detector.from_config = classmethod(held_load)
from agent.cli import main
sys.exit(main(["run", "--config", sys.argv[3]]))
"""


def test_sighup_while_the_model_loads_reloads_once_running(tmp_path, rig):
    broker, obs, pty, _ = rig
    held, go = tmp_path / "held", tmp_path / "go"
    cfg = write_config(tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=broker.port,
                       serial_port=pty.path, state_dir=tmp_path / "state")
    agent = AgentProcess(cfg, tmp_path / "agent.log",
                         python=["-c", HELD_LOAD, str(held), str(go)]).start()
    try:
        wait_until(held.exists, "the model load to begin")
        agent.signal(signal.SIGHUP)       # SIGHUP's default action would end the process
        time.sleep(0.2)   # time for a signal to act (not a timing assertion)
        assert agent.running(), f"ended by the SIGHUP ({agent.proc.returncode}):\n{agent.log()}"
        go.touch()
        agent.wait_log("a reload (SIGHUP) came while starting")
        agent.wait_log("reloaded")
        assert agent.count("running: node") == 1
        # the config read at the start is the one reread: the model is not loaded twice
        assert agent.count("model file and settings unchanged: not loaded again") == 1
        w = LineWriter(pty)
        w.normal(20)
        ids = set(w.spikes(2))
        obs.wait_ids(ids)
        agent.signal(signal.SIGTERM)
        assert agent.proc.wait(5) == 0
        no_traceback(agent)
    finally:
        agent.close()

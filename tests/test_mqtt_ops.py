"""Operations over MQTT with a real Mosquitto and the real agent process: operator commands
on P cmd and the CLI verbs that send them, per-stream availability and shelving, Home
Assistant discovery checked against HA's own rules (tests/ha_rules.py) as topic-named
streams appear and go (reload, restart), and every JSON payload against its schema in
docs/schemas/."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import msgspec
import paho.mqtt.client as mqtt
import pytest
import yaml

from agent.config import AgentConfig
from agent.config_build import build
from agent.metrics import Metrics
from agent.sinks.homeassistant import discovery, slug
from agent.sinks.mqtt import MqttSink
from agent.sinks.mqtt_streams import configured
from agent_harness import (MOSQUITTO, NODE, STREAM, AgentProcess, LineWriter, Pty, alert_id,
                           no_traceback, tiny_model, wait_until, write_config)
from conftest import REPO, Broker
from ha_rules import Registry, check
from test_sink_mqtt import Sub

pytestmark = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto not installed")

P = f"tsad/{NODE}/"
HA = f"homeassistant/device/{NODE}/config"
SCHEMAS = {p.stem: jsonschema.Draft202012Validator(json.loads(p.read_text()))
           for p in (REPO / "docs" / "schemas").glob("*.json")}
# topic (after P) -> schema, for every JSON payload the agent publishes
PAYLOAD_SCHEMA = {"alerts": "alert", "health": "health", "cmd/result": "command-result",
                  "cmd": "command"}


def schema_for(topic: str) -> str | None:
    rest = topic[len(P):]
    if rest.startswith("stream/"):
        return {"score": "score", "shelved": "shelved", "alert": "alert"}.get(rest.rsplit("/", 1)[1])
    return PAYLOAD_SCHEMA.get(rest)


def assert_payloads_valid(msgs, skip: frozenset[bytes] = frozenset()) -> int:
    """Every JSON payload seen under P against its schema; how many were checked."""
    n, skip = 0, {b.decode(errors="replace") for b in skip}
    for topic, payload, _, _ in msgs:
        name = schema_for(topic) if topic.startswith(P) else None
        if name and payload and payload not in skip:
            SCHEMAS[name].validate(json.loads(payload))
            n += 1
    return n


def cli(port: int, *args: str, timeout: float = 20) -> tuple[int, dict | None, str]:
    """A command verb, as an operator runs it: (exit code, the printed result, stderr)."""
    p = subprocess.run([sys.executable, "-m", "agent.cli", *args, "--host", "127.0.0.1",
                        "--port", str(port), "--node", NODE, "--timeout", str(timeout)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else None, p.stderr


def publish(port: int, items: list[tuple[str, bytes | str]],
            auth: tuple[str, str] | None = None) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{time.monotonic_ns()}")
    if auth:
        c.username_pw_set(*auth)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for topic, payload in items:
            c.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def samples(t0: float, n: int) -> list[bytes]:
    return [json.dumps({"ts": t0 + i, "values": [0.0, 0.0, 0.0]}).encode() for i in range(n)]


def on(sub: Sub, suffix: str) -> list[str]:
    return [m[1] for m in sub.on(P + suffix)]


def results(sub: Sub) -> dict:
    return {r["id"]: r for r in map(json.loads, on(sub, "cmd/result"))}


def ha_view(sub: Sub) -> Registry:
    reg = Registry()
    for topic, raw, _, _ in sub.on(HA):
        assert reg.apply(topic, raw) == [], raw
    return reg


# ---------------------------------------------------------------- the agent, commands
@pytest.fixture
def serial_agent(broker, tmp_path):
    pty = Pty()
    cfg = write_config(tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=broker.port,
                       serial_port=pty.path, state_dir=tmp_path / "state",
                       mqtt={"homeassistant": {"enabled": True}, "score_interval_s": 0})
    sub = Sub(broker.port, [P + "#", "homeassistant/#"])
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    agent.wait_log("open at")
    yield agent, LineWriter(pty), sub
    agent.close()
    sub.close()
    pty.close()


def test_commands_from_the_cli_act_on_the_running_agent(serial_agent, broker):
    agent, w, sub = serial_agent
    w.normal(10)
    aid = alert_id(w.line(True))       # open_k 1: it opens, and stays open without normals
    sub.wait(lambda m: any(json.loads(x[1])["id"] == aid for x in m if x[0] == P + "alerts"),
             "the new alert")

    rc, res, err = cli(broker.port, "ack", aid)
    assert (rc, res["ok"], res["alert_id"]) == (0, True, aid), err
    sub.wait(lambda m: any(x[0] == P + "alerts" and json.loads(x[1])["type"] == "update"
                           and json.loads(x[1])["acknowledged"] for x in m), "the ack's update")
    sub.wait(lambda m: any(x[0] == P + "health" and json.loads(x[1])["streams"][STREAM]["alarm"]
                           == "acknowledged" for x in m), "health: acknowledged")
    w.normal(2)                        # close_m 2: the alert ends, still acknowledged
    sub.wait(lambda m: any(x[0] == P + "alerts" and json.loads(x[1])["type"] == "end"
                           for x in m), "the end")
    assert json.loads(on(sub, "alerts")[-1])["acknowledged"] is True

    rc, res, err = cli(broker.port, "shelve", STREAM, "--for", "1h")
    assert rc == 0 and res["shelved_until"].startswith("2023-11-14T23:"), (res, err)
    sub.wait(lambda m: any(x[0] == P + f"stream/{STREAM}/shelved" and x[3] is False
                           and json.loads(x[1])["shelved_until"] == res["shelved_until"]
                           for x in m), "the shelved topic")
    shelved_spike = alert_id(w.line(True))
    w.normal(3)
    n = w.i
    sub.wait(lambda m: any(x[0] == P + "health" and json.loads(x[1])["samples_in"] >= n
                           for x in m), "every line read while shelved")
    health = json.loads(on(sub, "health")[-1])["streams"][STREAM]
    assert health["shelved_until"] == res["shelved_until"]
    assert shelved_spike not in {json.loads(a)["id"] for a in on(sub, "alerts")}

    rc, res, err = cli(broker.port, "unshelve", STREAM)
    assert (rc, res["ok"], res["shelved_until"]) == (0, True, None), err
    sub.wait(lambda m: json.loads(sub.on(P + f"stream/{STREAM}/shelved")[-1][1])
             ["shelved_until"] is None, "shelve lifted")
    again = alert_id(w.line(True))
    sub.wait(lambda m: any(x[0] == P + "alerts" and json.loads(x[1])["id"] == again for x in m),
             "a new alert after unshelve")

    rc, res, _ = cli(broker.port, "recalibrate", "nope")
    assert rc == 1 and res["ok"] is False and "unknown stream" in res["error"]
    for usage in ("soon", "8d"):                  # not a duration; over a week
        rc, res, err = cli(broker.port, "shelve", STREAM, "--for", usage)
        assert rc == 2 and res is None and "--for" in err

    # malformed commands straight on the topic: an error result each, never a crash
    bad = [b"{not json", b'{"id": "r1", "cmd": "reboot"}', b'{"id": "r2"' + b" " * 5000 + b"}",
           b"\xff\xfe", b'{"id": "r3", "cmd": "ack"}',
           b'{"id": "r4", "cmd": "shelve", "stream": "pump", "for_s": 691200}']
    publish(broker.port, [(P + "cmd", b) for b in bad])
    got = sub.wait(lambda m: len([x for x in m if x[0] == P + "cmd/result"]) >= 4 + len(bad),
                   "a result for each malformed command")
    # (the over-long one is refused unread, so its result may come first)
    refused = sorted([json.loads(x[1]) for x in got if x[0] == P + "cmd/result"][-len(bad):],
                     key=lambda r: (r["id"] or "", r["error"]))
    assert [(r["id"], r["ok"]) for r in refused] == [(None, False)] * 3 + [
        ("r1", False), ("r3", False), ("r4", False)]
    assert sorted(r["error"][:12] for r in refused[:3]) == ["command long", "not JSON",
                                                            "not JSON"]
    assert "cmd must be" in refused[3]["error"] and "alert_id" in refused[4]["error"]
    assert "for_s" in refused[5]["error"]
    sub.wait(lambda m: any(x[0] == P + "health" and
                           json.loads(x[1])["mqtt"]["commands"]["refused"] == 1 + len(bad)
                           for x in m), "refused commands counted in health")
    assert agent.running()
    no_traceback(agent)
    checked = assert_payloads_valid(sub.msgs, skip=frozenset(bad))
    assert checked > 20
    assert any(x[0].endswith("/score") for x in sub.msgs)


def test_a_home_assistant_button_press_runs_its_command(serial_agent, broker):
    agent, w, sub = serial_agent
    w.normal(9)
    # the samples taken first: a shelve before a stream's first sample runs on the wall
    # clock and is shown on the sample clock once that sample comes
    sub.wait(lambda m: any(x[0] == P + "health" and json.loads(x[1])["samples_in"] >= 9
                           for x in m), "the samples read")
    sub.wait(lambda m: any(x[0] == HA and STREAM in json.loads(x[1])["cmps"].get(
        f"{STREAM}_shelve", {}).get("payload_press", "") for x in m), "discovery")
    reg = ha_view(sub)
    _, press = reg.entities[f"{STREAM}_shelve"]
    assert press["qos"] == 1 and press["retain"] is False
    publish(broker.port, [(press["command_topic"], press["payload_press"])])   # what HA sends
    sub.wait(lambda m: f"ha-shelve-{STREAM}" in results(sub), "the button's result")
    res = results(sub)[f"ha-shelve-{STREAM}"]
    assert res["ok"] is True and res["cmd"] == "shelve"
    sub.wait(lambda m: json.loads(x[1])["shelved_until"] == res["shelved_until"]
             if (x := (sub.on(P + f"stream/{STREAM}/shelved") or [None])[-1]) else False,
             "shown shelved")


def test_a_configured_stream_is_shelved_before_its_first_sample(serial_agent, broker):
    """HA shows a configured stream's buttons from the start, so a press before the
    stream's first sample acts on it rather than answering "unknown stream"."""
    agent, w, sub = serial_agent
    sub.wait(lambda m: any(x[0] == HA for x in m), "discovery")
    _, press = ha_view(sub).entities[f"{STREAM}_shelve"]
    publish(broker.port, [(press["command_topic"], press["payload_press"])])
    sub.wait(lambda m: f"ha-shelve-{STREAM}" in results(sub), "the button's result")
    res = results(sub)[f"ha-shelve-{STREAM}"]
    assert res["ok"] is True and res["shelved_until"], res
    sub.wait(lambda m: json.loads(x[1])["shelved_until"] == res["shelved_until"]
             if (x := (sub.on(P + f"stream/{STREAM}/shelved") or [None])[-1]) else False,
             "shown shelved")
    time.sleep(2.5)             # two presence checks: a stream without a sample stays offline
    assert on(sub, f"stream/{STREAM}/availability")[-1] == "offline"
    w.normal(9)
    sub.wait(lambda m: on(sub, f"stream/{STREAM}/availability")[-1:] == ["online"],
             "online with its first samples")


def test_a_dashboard_that_connects_late_finds_the_open_alert_and_acks_it(serial_agent, broker):
    agent, w, sub = serial_agent
    topic = P + f"stream/{STREAM}/alert"
    w.normal(10)
    aid = alert_id(w.line(True))       # open_k 1: it opens, and stays open without normals
    sub.wait(lambda m: any(x[0] == P + "alerts" and json.loads(x[1])["id"] == aid for x in m),
             "the new alert")
    late = Sub(broker.port, [topic])   # a SCADA restarted during the alert, the sensor silent
    try:
        got = late.wait(lambda m: m, "the retained open alert")
        event = json.loads(got[0][1])
        assert got[0][3] is True and (event["id"], event["type"]) == (aid, "new")
        SCHEMAS["alert"].validate(event)
        rc, res, err = cli(broker.port, "ack", event["id"])
        assert rc == 0 and res["ok"] is True, err
        late.wait(lambda m: any(json.loads(x[1])["acknowledged"] for x in m if x[1]),
                  "the acknowledged update on the retained topic")
    finally:
        late.close()
    w.normal(2)                        # close_m 2: it ends, and the retained view is cleared
    sub.wait(lambda m: any(x[0] == P + "alerts" and json.loads(x[1])["type"] == "end"
                           for x in m), "the end")
    sub.wait(lambda m: on(sub, f"stream/{STREAM}/alert")[-1:] == [""], "the view cleared")
    # subscribed one topic after the other, the retained state comes after any retained alert
    later = Sub(broker.port, [topic, P + f"stream/{STREAM}/state"])
    try:
        got = later.wait(lambda m: any(x[0].endswith("/state") for x in m), "the state")
        assert [x[0] for x in got] == [P + f"stream/{STREAM}/state"]
    finally:
        later.close()
    assert_payloads_valid(sub.msgs)


def _shelved_spike(w: LineWriter, sub: Sub) -> str:
    """A spike and a few normal lines once every line was read; its alert id, which a
    shelved stream never opens."""
    w.normal(10)
    spike = alert_id(w.line(True))
    w.normal(3)
    n = w.i
    sub.wait(lambda m: any(x[0] == P + "health" and json.loads(x[1])["samples_in"] >= n
                           and json.loads(x[1])["streams"].get(STREAM, {}).get("shelved_until")
                           for x in m), "every line read, shelved")
    return spike


def test_a_shelve_outlives_a_restart_and_a_reload_that_rebuilds_the_streams(
        serial_agent, broker, tmp_path):
    agent, w, sub = serial_agent
    rc, res, err = cli(broker.port, "shelve", STREAM, "--for", "1h")
    assert rc == 0 and res["ok"], err
    agent.close()
    del sub.msgs[:]
    again = AgentProcess(tmp_path / "agent.yaml", tmp_path / "agent2.log").start()
    try:
        again.wait_log("shelved again for the")
        again.wait_log("open at")          # lines written before the port opens are not read
        spike = _shelved_spike(w, sub)
        # a reload that changes a detection setting builds the streams anew
        cfg = yaml.safe_load((tmp_path / "agent.yaml").read_text())
        cfg["alerts"]["close_m"] = 3
        (tmp_path / "agent.yaml").write_text(yaml.safe_dump(cfg))
        again.signal(signal.SIGHUP)
        again.wait_log("reloaded")
        assert again.count("shelved again for the") == 2
        spike2 = _shelved_spike(w, sub)
        assert not {spike, spike2} & {json.loads(a)["id"] for a in on(sub, "alerts")}
        rc, res, err = cli(broker.port, "unshelve", STREAM)
        assert rc == 0 and res["ok"], err
        w.normal(10)
        spike3 = alert_id(w.line(True))
        sub.wait(lambda m: spike3 in {json.loads(a)["id"] for a in on(sub, "alerts")},
                 "an alert once unshelved")
        assert json.loads((tmp_path / "state" / "shelves.json").read_text()) == {"ends": {}, "asked": {}}
        no_traceback(again)
    finally:
        again.close()


def test_a_shelved_stream_dropped_while_silent_finds_its_shelve_when_it_returns(broker, tmp_path):
    pty = Pty()
    cfg = write_config(tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=broker.port,
                       serial_port=pty.path, state_dir=tmp_path / "state",
                       buffer={"idle_evict_s": 1})
    sub = Sub(broker.port, [P + "#"])
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        agent.wait_log("open at")
        w = LineWriter(pty)
        w.normal(10)
        rc, res, err = cli(broker.port, "shelve", STREAM, "--for", "1h")
        assert rc == 0 and res["ok"], err
        agent.wait_log("evicted 1 idle stream")      # maintenance: the machine falls silent
        spike = _shelved_spike(w, sub)
        agent.wait_log("shelved again for the")
        assert spike not in {json.loads(a)["id"] for a in on(sub, "alerts")}
        # gone again, the shelve waits for it; lifted meanwhile, it does not come back
        agent.wait_log("evicted 1 idle stream", 2)
        rc, res, err = cli(broker.port, "unshelve", STREAM)
        assert rc == 0 and res["ok"] and res["shelved_until"] is None, (res, err)
        w.normal(10)
        again = alert_id(w.line(True))
        sub.wait(lambda m: again in {json.loads(a)["id"] for a in on(sub, "alerts")},
                 "an alert once unshelved")
        no_traceback(agent)
    finally:
        agent.close()
        sub.close()
        pty.close()


def test_a_retained_command_is_carried_out_once_not_at_every_start(serial_agent, broker,
                                                                    tmp_path):
    agent, w, sub = serial_agent
    shelve = {"id": "kept", "cmd": "shelve", "stream": STREAM, "for_s": 3600}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="retainer")
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    c.publish(P + "cmd", json.dumps(shelve), qos=1, retain=True).wait_for_publish(10)
    sub.wait(lambda m: "kept" in results(sub), "the shelve's result")
    assert results(sub)["kept"]["ok"] is True          # sent live: carried out
    rc, res, err = cli(broker.port, "unshelve", STREAM)
    assert rc == 0 and res["shelved_until"] is None, err

    agent.close()                          # the next start subscribes anew
    again = AgentProcess(tmp_path / "agent.yaml", tmp_path / "agent2.log").start()
    try:
        sub.wait(lambda m: len([r for r in map(json.loads, on(sub, "cmd/result"))
                                if r["id"] == "kept"]) == 2, "the retained copy's result")
        res = results(sub)["kept"]
        assert res["ok"] is False and "a retained command is refused" in res["error"]
        assert res["cmd"] == "shelve"
        again.wait_log("open at")          # lines written before the port opens are not read
        w.normal(10)
        spike = alert_id(w.line(True))     # not shelved: the operator's unshelve stands
        w.normal(3)
        sub.wait(lambda m: spike in {json.loads(a)["id"] for a in on(sub, "alerts")},
                 "an alert after the restart")
        # an empty retained message clears it, and is no command
        n = len(on(sub, "cmd/result"))
        c.publish(P + "cmd", b"", qos=1, retain=True).wait_for_publish(10)
        rc, res, err = cli(broker.port, "unshelve", STREAM)
        assert rc == 0 and len(on(sub, "cmd/result")) == n + 1, err
        assert again.running()
        no_traceback(again)
    finally:
        c.disconnect()
        c.loop_stop()
        again.close()


# ---------------------------------------------------------------- discovery across a reload
def _write(path: Path, streams: list, **over) -> None:
    cfg = yaml.safe_load(path.read_text())
    cfg["streams"] = streams
    cfg.update(over)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_home_assistant_follows_topic_named_streams_across_a_reload(broker, tmp_path):
    wildcard = [{"id": "plant", "source": {"type": "mqtt", "topic": "plant/+/sensors",
                                           "stream_from_topic": 1}}]
    path = write_config(tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=broker.port,
                        serial_port="-", state_dir=tmp_path / "state",
                        mqtt={"homeassistant": {"enabled": True}, "stale_after_s": 1.5,
                              "score_interval_s": 0.2})
    _write(path, wildcard)
    sub = Sub(broker.port, [P + "#", "homeassistant/#"])
    agent = AgentProcess(path, tmp_path / "agent.log").start()
    try:
        agent.wait_log("subscribed to")
        publish(broker.port, [("plant/pump1/sensors", s) for s in samples(1.7e9, 12)])
        sub.wait(lambda m: "pump1" in ha_view(sub).streams(), "pump1 discovered")
        reg = ha_view(sub)
        assert reg.streams() == {"pump1"}              # no phantom entity for "plant"
        assert not any("plant" in k for k in reg.entities)
        _, score = reg.entities["pump1_score"]
        assert score["expire_after"] == 2 and score["availability_mode"] == "all"
        assert [a["topic"] for a in score["availability"]] == [
            P + "availability", P + "stream/pump1/availability"]
        late = Sub(broker.port, [P + "stream/+/state", P + "stream/+/availability"])
        got = late.wait(lambda m: len(m) >= 2, "retained state and availability of pump1")
        assert {(t, p, r) for t, p, _, r in got} >= {(P + "stream/pump1/state", "normal", True),
                                                     (P + "stream/pump1/availability", "online",
                                                      True)}
        assert not any("/plant/" in t for t, *_ in got)
        late.close()
        # no sample for stale_after_s: offline, with the node still online
        sub.wait(lambda m: on(sub, "stream/pump1/availability")[-1:] == ["offline"],
                 "pump1 offline once stale")
        assert on(sub, "availability")[-1] == "online"

        _write(path, [{"id": "press9", "source": {"type": "mqtt", "topic": "lines/press9"}}])
        agent.signal(signal.SIGHUP)
        agent.wait_log("reloaded")
        sub.wait(lambda m: ha_view(sub).streams() == {"press9"}, "pump1 dropped, press9 added")
        reg = ha_view(sub)
        assert not any(k.startswith("pump1_") for k in reg.entities)
        assert {k for k in reg.entities if k.startswith("press9_")} == {
            f"press9_{s}" for s in ("anomaly", "state", "score", "shelved", "ack",
                                   "recalibrate", "shelve", "unshelve")}
        late = Sub(broker.port, [P + "stream/+/state"])
        late.wait(lambda m: any("press9" in t for t, *_ in m), "press9's retained state")
        time.sleep(0.5)      # retained messages come in one burst on subscribe
        assert not any("pump1" in t for t, *_ in late.msgs), late.msgs
        late.close()

        # the command channel is wired to the new pipeline
        publish(broker.port, [("lines/press9", s) for s in samples(1.7e9, 3)])
        sub.wait(lambda m: on(sub, "stream/press9/availability")[-1:] == ["online"],
                 "press9 online")
        rc, res, err = cli(broker.port, "shelve", "press9", "--for", "10m")
        assert rc == 0 and res["stream"] == "press9", err

        # a reload that changes the broker settings rebuilds the sink: still wired
        cfg = yaml.safe_load(path.read_text())
        cfg["mqtt"]["score_interval_s"] = 0.3
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        agent.signal(signal.SIGHUP)
        agent.wait_log("reloaded", 2)
        agent.wait_log("MQTT connected", 2)
        rc, res, err = cli(broker.port, "unshelve", "press9")
        assert rc == 0 and res["stream"] == "press9", err
        assert ha_view(sub).streams() == {"press9"}
        no_traceback(agent)
        assert assert_payloads_valid(sub.msgs) > 5
    finally:
        agent.close()
        sub.close()


# ---------------------------------------------------------------- the documented ACL
def test_the_documented_acl_lets_operators_command_and_nobody_else(tmp_path, monkeypatch):
    d = tmp_path / "mq"
    d.mkdir()
    (d / "acl").write_text((REPO / "docs" / "mosquitto" / "acl.conf").read_text()
                           .replace("pump-hall-2", NODE))
    users = {f"tsad-{NODE}": "AGENT_PW", "operator-anna": "OP_PW",
             "homeassistant": "HA_PW", "dashboard": "DASH_PW"}
    for i, (user, env) in enumerate(users.items()):
        monkeypatch.setenv(env, f"{user}-secret")
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(d / "passwd"),
                        user, f"{user}-secret"], check=True, capture_output=True)
    root = "user root\n" if os.geteuid() == 0 else ""    # see test_sink_mqtt.persistent_broker
    b = Broker(d, extra_conf=f"allow_anonymous false\npassword_file {d / 'passwd'}\n"
                             f"acl_file {d / 'acl'}\n{root}").start()
    pty = Pty()
    cfg = write_config(tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=b.port,
                       serial_port=pty.path, state_dir=tmp_path / "state",
                       mqtt={"username": f"tsad-{NODE}", "password_env": "AGENT_PW",
                             "homeassistant": {"enabled": True}})
    op = Sub(b.port, [P + "#"], auth=("operator-anna", "operator-anna-secret"))
    ha = Sub(b.port, ["homeassistant/#"], auth=("homeassistant", "homeassistant-secret"))
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        agent.wait_log("open at")
        # scores are live values, published only while connected: samples written before
        # the agent's broker connection would be scored with nothing to show for it
        op.wait(lambda m: any(x[0] == P + "availability" for x in m), "availability")
        LineWriter(pty).normal(9)
        for topic in ("health", f"stream/{STREAM}/state",
                      f"stream/{STREAM}/score"):       # the agent writes what it must
            op.wait(lambda m: any(x[0] == P + topic for x in m), topic)
        ha.wait(lambda m: any(x[0] == HA for x in m), "discovery")

        rc, res, err = cli(b.port, "shelve", STREAM, "--for", "5m", "--username",
                           "operator-anna", "--password-env", "OP_PW")
        assert rc == 0 and res["ok"], err
        rc, res, err = cli(b.port, "unshelve", STREAM, "--username", "dashboard",
                           "--password-env", "DASH_PW", timeout=3)
        assert rc == 2 and "no result from the agent" in err    # the broker dropped it
        publish_as = ("homeassistant", "homeassistant-secret")
        _, press = ha_view(ha).entities[f"{STREAM}_unshelve"]
        publish(b.port, [(press["command_topic"], press["payload_press"])], auth=publish_as)
        op.wait(lambda m: any(x[0] == P + "cmd/result" and json.loads(x[1])["id"]
                              == f"ha-unshelve-{STREAM}" for x in m), "the HA button's result")
        answered = [json.loads(x[1]) for x in op.msgs if x[0] == P + "cmd/result"]
        assert [(r["cmd"], r["ok"]) for r in answered] == [("shelve", True), ("unshelve", True)]
        assert "refused" not in agent.log()      # neither its connection nor a subscription
        no_traceback(agent)
    finally:
        agent.close()
        op.close()
        ha.close()
        b.stop()
        pty.close()


# ---------------------------------------------------------------- discovery across a restart
def _sink_cfg(port: int, state_dir: Path, streams: list) -> AgentConfig:
    return build(AgentConfig, {
        "node": NODE, "state_dir": str(state_dir), "model": {"path": "m.onnx"},
        "streams": streams, "mqtt": {"port": port, "keepalive": 5,
                                     "homeassistant": {"enabled": True}}})


def test_a_restart_without_a_stream_removes_it_from_home_assistant(broker, tmp_path):
    fixed = {"id": "bench", "source": {"type": "replay", "path": "a.csv"}}
    wildcard = {"id": "plant", "source": {"type": "mqtt", "topic": "plant/+/sensors",
                                          "stream_from_topic": 1}}
    sub = Sub(broker.port, [P + "#", "homeassistant/#"])
    s1 = MqttSink(_sink_cfg(broker.port, tmp_path / "st", [fixed, wildcard]), Metrics())
    s1.start()
    s1.stream_status("pump1", {"state": "anomaly", "online": True, "shelved_until": None})
    sub.wait(lambda m: ha_view(sub).streams() == {"bench", "pump1"}, "bench and pump1")
    s1.stop()
    # the next run keeps a stream the wildcard still admits ...
    s2 = MqttSink(_sink_cfg(broker.port, tmp_path / "st", [fixed, wildcard]), Metrics())
    s2.start()
    time.sleep(1.5)
    assert ha_view(sub).streams() == {"bench", "pump1"}
    # a fresh run has judged no window: no verdict, and no alert a crash left
    assert on(sub, "stream/pump1/state")[-1] == "warming_up"
    s2.stop()
    # ... and one without the wildcard drops it
    s3 = MqttSink(_sink_cfg(broker.port, tmp_path / "st", [fixed]), Metrics())
    s3.start()
    sub.wait(lambda m: ha_view(sub).streams() == {"bench"}, "pump1 removed")
    sub.wait(lambda m: on(sub, "stream/pump1/state")[-1:] == [""], "pump1's state cleared")
    s3.stop()
    sub.close()


def test_a_planted_discovery_payload_adds_no_stream(broker, tmp_path):
    """The read-back takes only ids a source could have made: whoever may write the
    discovery topic must not plant streams, which the agent's own payload would keep."""
    wildcard = {"id": "plant", "source": {"type": "mqtt", "topic": "plant/+/sensors",
                                          "stream_from_topic": 1}}
    planted = {f"c{i}": {"p": "sensor", "state_topic": f"{P}stream/{sid}/state",
                         "unique_id": f"u{i}"}
               for i, sid in enumerate(["pump1", "a/b/c", "x y", "evil\u202e", "z" * 300])}
    publish_retained = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="planter")
    publish_retained.connect("127.0.0.1", broker.port)
    publish_retained.loop_start()
    publish_retained.publish(HA, json.dumps({"dev": {"ids": ["x"]}, "o": {"name": "x"},
                                             "cmps": planted}), qos=1, retain=True
                             ).wait_for_publish(10)
    publish_retained.disconnect()
    publish_retained.loop_stop()
    sub = Sub(broker.port, [P + "#", "homeassistant/#"])
    s = MqttSink(_sink_cfg(broker.port, tmp_path / "st", [wildcard]), Metrics())
    s.start()
    try:
        sub.wait(lambda m: ha_view(sub).streams() == {"pump1"}, "only pump1 adopted")
        assert {x[0] for x in sub.msgs if x[0].startswith(P + "stream/")} <= {
            P + f"stream/pump1/{k}" for k in ("state", "availability", "shelved", "alert")}
    finally:
        s.stop()
        sub.close()


def test_an_alert_a_crash_left_retained_is_cleared_when_its_stream_shows_up(broker, tmp_path):
    """A topic-named stream seen first by its status (no state entered: a baseline came
    back from the store) clears the open alert a crashed run left on its topic."""
    wildcard = {"id": "plant", "source": {"type": "mqtt", "topic": "plant/+/sensors",
                                          "stream_from_topic": 1}}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="crashed")
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    c.publish(P + "stream/pump1/alert", '{"id": "old"}', qos=1, retain=True).wait_for_publish(10)
    c.disconnect()
    c.loop_stop()
    sub = Sub(broker.port, [P + "#"])
    cfg = _sink_cfg(broker.port, tmp_path / "st", [wildcard])
    cfg = msgspec.structs.replace(cfg, mqtt=msgspec.structs.replace(
        cfg.mqtt, homeassistant=msgspec.structs.replace(cfg.mqtt.homeassistant, enabled=False)))
    s = MqttSink(cfg, Metrics())
    s.start()
    try:
        sub.wait(lambda m: any(x[0] == P + "availability" for x in m), "the sink online")
        s.stream_status("pump1", {"state": "normal", "online": True, "shelved_until": None})
        sub.wait(lambda m: on(sub, "stream/pump1/alert")[-1:] == [""], "the stale alert cleared")
    finally:
        s.stop()
        sub.close()


def test_a_stream_dropped_by_a_reload_stays_dropped_when_its_alert_ends(broker, tmp_path):
    """The reload ends the dropped stream's open alert after the new pipeline attached:
    that end (and the state "normal" with it) must not bring the stream back."""
    fixed = {"id": "bench", "source": {"type": "replay", "path": "a.csv"}}
    wildcard = {"id": "plant", "source": {"type": "mqtt", "topic": "plant/+/sensors",
                                          "stream_from_topic": 1}}
    sub = Sub(broker.port, [P + "#", "homeassistant/#"])
    s = MqttSink(_sink_cfg(broker.port, tmp_path / "st", [fixed, wildcard]), Metrics())
    s.start()
    s.stream_status("pump1", {"state": "anomaly", "online": True, "shelved_until": None})
    sub.wait(lambda m: ha_view(sub).streams() == {"bench", "pump1"}, "pump1")
    s.attach(_sink_cfg(broker.port, tmp_path / "st", [fixed]), None)
    s.state("pump1", "normal")
    s.state("bench", "learning")
    sub.wait(lambda m: on(sub, "stream/bench/state")[-1:] == ["learning"], "bench learning")
    sub.wait(lambda m: ha_view(sub).streams() == {"bench"}, "pump1 dropped")
    assert on(sub, "stream/pump1/state")[-1] == ""
    s.stop()
    sub.close()


def test_a_stream_a_reload_drops_while_the_broker_is_away_is_cleared_at_the_reconnect(
        broker, tmp_path):
    """Dropped while the sink was offline, a stream's retained topics could not be cleared
    then, and nothing cleared them later: its state stayed retained for good (review)."""
    fixed = {"id": "bench", "source": {"type": "replay", "path": "a.csv"}}
    wildcard = {"id": "plant", "source": {"type": "mqtt", "topic": "plant/+/sensors",
                                          "stream_from_topic": 1}}
    sub = Sub(broker.port, [P + "#"])
    s = MqttSink(_sink_cfg(broker.port, tmp_path / "st", [fixed, wildcard]), Metrics())
    s.start()
    try:
        s.stream_status("pump1", {"state": "anomaly", "online": True, "shelved_until": None})
        sub.wait(lambda m: on(sub, "stream/pump1/state")[-1:] == ["anomaly"], "pump1 shown")
        # the first connect's read-back of the discovery payload done: it clears what
        # the config no longer produces, at the first connect only
        wait_until(lambda: not s.streams._read_back, "the read-back")
        s.streams.on_disconnect()           # the link gone (what paho's callback does)
        s.attach(_sink_cfg(broker.port, tmp_path / "st", [fixed]), None)
        assert on(sub, "stream/pump1/state")[-1] == "anomaly"
        s.streams.on_connect()              # back (what the sender does after the gate)
        sub.wait(lambda m: on(sub, "stream/pump1/state")[-1:] == [""], "pump1 cleared")
    finally:
        s.stop()
        sub.close()


# ---------------------------------------------------------------- rules, without a broker
def _cfg(**mqtt_kw) -> AgentConfig:
    return build(AgentConfig, {
        "node": "hall.2", "model": {"path": "m.onnx"},
        "streams": [{"id": "pump.1", "source": {"type": "replay", "path": "a"}},
                    {"id": "lines", "source": {"type": "mqtt", "topic": "lines/+/x/#",
                                               "stream_from_topic": 1}}],
        "mqtt": {"homeassistant": {"enabled": True, "shelve_s": 900}, **mqtt_kw}})


def test_discovery_payload_passes_home_assistants_rules():
    cfg = _cfg()
    topic, payload = discovery(cfg, {"pump.1", "pump_1", "press7"}, {"old_score": "sensor"})
    problems, cmps = check(topic, json.dumps(payload))
    assert problems == []
    assert topic == f"homeassistant/device/{slug('hall.2')}/config" and slug("hall.2") != "hall_2"
    assert cmps["old_score"] == ("sensor", None)                   # a removal
    entities = {k: c for k, (_, c) in cmps.items() if c is not None}
    assert len({c["unique_id"] for c in entities.values()}) == len(entities) == 24
    for sid in ("pump.1", "pump_1", "press7"):
        mine = {k: c for k, c in entities.items() if c["name"].startswith(sid + " ")}
        assert len(mine) == 8
        for k, c in mine.items():
            assert c["qos"] == 1
            own = [a["topic"] for a in c["availability"]]
            if cmps[k][0] == "button" or k.endswith("_shelved"):     # the node's, inherited
                assert own == ["tsad/hall.2/availability"] and "availability_mode" not in c
            else:
                assert own == ["tsad/hall.2/availability", f"tsad/hall.2/stream/{sid}/availability"]
                assert c["availability_mode"] == "all"
            if cmps[k][0] == "button":
                cmd = json.loads(c["payload_press"])
                SCHEMAS["command"].validate(cmd)
                assert cmd["stream"] == sid and c["command_topic"] == "tsad/hall.2/cmd"
                assert cmd.get("for_s", 900) == 900
    assert entities[f"{slug('pump.1')}_score"]["expire_after"] == 61


@pytest.mark.parametrize("breakage, complaint", [
    (lambda p: p.update(availability_topic="x/availability"), "exclusive"),
    (lambda p: p["cmps"]["press7_score"].pop("unique_id"), "unique_id"),
    (lambda p: p["cmps"]["press7_shelve"].pop("command_topic"), "command_topic"),
    (lambda p: p["cmps"]["press7_state"].update(p="gauge"), "not supported"),
    (lambda p: p["cmps"]["press7_score"].update(expire_after=1.5), "expire_after"),
    (lambda p: p["cmps"]["press7_anomaly"].update(availability_mode="most"), "availability_mode"),
    (lambda p: p["dev"].pop("ids"), "identifier"),
    (lambda p: p.update(extra=1), "unknown top-level key"),
])
def test_the_rules_refuse_what_home_assistant_refuses(breakage, complaint):
    topic, payload = discovery(_cfg(), {"press7"}, {})
    breakage(payload)
    problems, _ = check(topic, json.dumps(payload))
    assert any(complaint in p for p in problems), problems


def test_which_streams_a_config_still_produces():
    cfg = _cfg()
    assert configured(cfg, "pump.1") and configured(cfg, "anything")   # lines/+/x/# admits all
    narrow = build(AgentConfig, {
        "node": "n", "model": {"path": "m.onnx"},
        "streams": [{"id": "s", "source": {"type": "mqtt", "topic": "plant/pump1/+",
                                           "stream_from_topic": 1}}]})
    assert configured(narrow, "pump1") and not configured(narrow, "pump2")
    assert not configured(narrow, "s")          # a topic-named source names no stream


def test_schemas_accept_the_documented_payloads_and_refuse_others():
    alert = {"schema": 1, "type": "new", "id": "pump-07:pump:1583750689000", "node": "pump-07",
             "stream": "pump", "start": "2020-03-09T10:44:49.000Z", "end": None, "score": 0.91,
             "peak_score": 1.25, "threshold": 0.21, "acknowledged": False, "standing": False,
             "top_channels": [{"name": "Current", "share": 0.82}],
             "model": {"name": "DLinear_ad", "sha256": "e25d", "ep": "CPUExecutionProvider"}}
    SCHEMAS["alert"].validate(alert)
    SCHEMAS["alert"].validate({**alert, "type": "end", "end": "2020-03-09T10:45:00.000Z",
                               "reason": "recovered"})
    SCHEMAS["score"].validate({"ts": "2020-03-09T10:44:49.250Z", "score": None, "threshold": 0.2,
                               "label": 0})
    SCHEMAS["command"].validate({"id": "r4", "cmd": "shelve", "stream": "p", "for_s": 60})
    for name, doc in [
            ("alert", {**alert, "type": "end"}),                          # an end needs a reason
            ("alert", {**alert, "start": 1583750689.0}),                  # epoch, not ISO
            ("score", {"ts": 1583750689.25, "score": 1, "threshold": 1, "label": 1}),
            ("command", {"cmd": "shelve", "stream": "p"}),                # for_s missing
            ("command", {"cmd": "ack"}),                                  # no alert nor stream
            ("command-result", {"id": "x", "cmd": "ack", "ok": False,     # no error
                                "ts": "2020-03-09T10:44:49.000Z"}),
            ("shelved", {"ts": "2020-03-09T10:44:49Z", "shelved_until": None})]:
        with pytest.raises(jsonschema.ValidationError):
            SCHEMAS[name].validate(doc)


def test_cli_exit_codes_without_an_agent(broker):
    rc, res, err = cli(broker.port, "unshelve", "pump", timeout=1)
    assert rc == 2 and res is None and "no result from the agent" in err
    # no agent ever subscribed here: the message names the topic, and promises no queue
    assert f"is {P}cmd its command topic" in err and "the broker dropped it" in err
    broker.stop()
    rc, res, err = cli(broker.port, "unshelve", "pump")
    assert rc == 2 and "cannot reach the broker" in err
    p = subprocess.run([sys.executable, "-m", "agent.cli", "ack", "x"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--config FILE, or --node" in p.stderr

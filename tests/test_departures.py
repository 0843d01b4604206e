"""Streams that went away for good (agent/departures.py): a topic-named stream silent for
`buffer.forget_after_s` leaves Home Assistant, its retained topics, its baseline file and
the book of last samples; a restart does not bring it back; a stream the config names
stays.  The real agent against a real Mosquitto, then the book alone."""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from agent.config import AgentConfig, ConfigError, parse_config
from agent.config_build import build
from agent.daemon import _engine_settings
from agent.departures import FILE, Departures
from agent.metrics import Metrics
from agent.shelves import ShelfBook
from agent.sinks.mqtt import MqttSink
from agent.state_store import StateStore
from agent_harness import MOSQUITTO, AgentProcess, no_traceback, tiny_model, write_config
from ha_rules import Registry
from test_mqtt_ops import P, ha_view, publish, samples
from test_sink_mqtt import Sub

needs_broker = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto not installed")

WILDCARD = {"id": "plant", "source": {"type": "mqtt", "topic": "plant/+/sensors",
                                      "stream_from_topic": 1}}
NAMED = {"id": "press9", "source": {"type": "mqtt", "topic": "lines/press9"}}
LEARN = 20


def _config(tmp_path: Path, port: int, forget_after_s: float) -> Path:
    path = write_config(tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=port,
                        serial_port="-", state_dir=tmp_path / "state",
                        calibration={"enabled": True, "samples": LEARN, "margin": 4},
                        scoring={"threshold": "model"},
                        buffer={"idle_evict_s": 1, "forget_after_s": forget_after_s},
                        mqtt={"homeassistant": {"enabled": True}, "stale_after_s": 0.5})
    cfg = yaml.safe_load(path.read_text())
    cfg["streams"] = [WILDCARD, NAMED]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _retained(port: int) -> dict[str, str]:
    """What a subscriber arriving now is handed on P stream/#: topic -> payload."""
    late = Sub(port, [P + "stream/#", P + "availability"])
    try:
        # one SUBSCRIBE at a time: the node's availability comes after every stream topic
        late.wait(lambda m: any(t == P + "availability" for t, *_ in m), "retained messages")
        return {t: p for t, p, _, r in late.msgs if r and t.startswith(P + "stream/")}
    finally:
        late.close()


def _send(port: int, sids: list[str], n: int = LEARN + 10) -> None:
    items = []
    for sid in sids:
        topic = "lines/press9" if sid == "press9" else f"plant/{sid}/sensors"
        items += [(topic, s) for s in samples(1.7e9, n)]
    publish(port, items)


@needs_broker
def test_a_departed_topic_named_stream_is_forgotten_and_a_restart_keeps_it_gone(broker,
                                                                                tmp_path):
    path = _config(tmp_path, broker.port, forget_after_s=3)
    cal = tmp_path / "state" / "calibration"
    sub = Sub(broker.port, [P + "#", "homeassistant/#"])
    agent = AgentProcess(path, tmp_path / "agent.log").start()
    try:
        agent.wait_log("subscribed to", 2)
        _send(broker.port, ["dev1", "press9"])
        sub.wait(lambda m: ha_view(sub).streams() == {"dev1", "press9"}, "both discovered")
        agent.wait_log("stream dev1: no sample since", timeout=40)
        sub.wait(lambda m: ha_view(sub).streams() == {"press9"}, "dev1 dropped from HA")
        reg = ha_view(sub)
        assert not any(k.startswith("dev1_") for k in reg.entities)
        kept = _retained(broker.port)
        assert not any("/dev1/" in t for t in kept), kept
        assert kept[P + "stream/press9/state"] == "normal"
        assert not (cal / "dev1.json").exists() and (cal / "press9.json").exists()
        sub.wait(lambda m: json.loads(on_last(sub, "health"))["dropped"].get(
            "stream_forgotten") == 1, "the forgotten stream counted")
        assert "stream press9: no sample since" not in agent.log()
        no_traceback(agent)
        agent.signal(signal.SIGTERM)
        agent.proc.wait(20)
        assert json.loads((tmp_path / "state" / FILE).read_text())["last_sample"] == {}

        # the next run reads the discovery payload back: dev1 must not come with it
        again = AgentProcess(path, tmp_path / "agent2.log").start()
        try:
            again.wait_log("subscribed to", 2)
            _send(broker.port, ["dev2"])
            sub.wait(lambda m: "dev2" in ha_view(sub).streams(), "dev2 discovered")
            assert ha_view(sub).streams() == {"press9", "dev2"}
            assert not any("/dev1/" in t for t in _retained(broker.port))
            no_traceback(again)
        finally:
            again.close()
    finally:
        agent.close()
        sub.close()


def on_last(sub: Sub, suffix: str) -> str:
    got = sub.on(P + suffix)
    return got[-1][1] if got else "{}"


@needs_broker
def test_a_restart_forgets_what_departed_while_the_agent_was_away(broker, tmp_path):
    """dev1's last sample is older than the retention when the agent starts again: the
    Home Assistant read-back does not bring it back, and its topics and baseline go.  dev2
    has no time in the book (an older agent, a wiped state_dir): it counts from the start."""
    path = _config(tmp_path, broker.port, forget_after_s=3600)
    state = tmp_path / "state"
    sub = Sub(broker.port, [P + "#", "homeassistant/#"])
    agent = AgentProcess(path, tmp_path / "agent.log").start()
    try:
        agent.wait_log("subscribed to", 2)
        _send(broker.port, ["dev1", "dev2", "press9"])
        sub.wait(lambda m: ha_view(sub).streams() == {"dev1", "dev2", "press9"}, "discovered")
        sub.wait(lambda m: json.loads(on_last(sub, "health"))["dropped"].get(
            "stream_evicted") == 3, "all three evicted")
        agent.signal(signal.SIGTERM)
        agent.proc.wait(20)
        book = json.loads((state / FILE).read_text())["last_sample"]
        assert set(book) == {"dev1", "dev2"}       # press9 is named: never in the book
        book = {"dev1": time.time() - 7200}        # two hours ago; dev2's time lost
        (state / FILE).write_text(json.dumps({"last_sample": book}))
        cfg = yaml.safe_load(path.read_text())
        cfg["buffer"]["forget_after_s"] = 3600
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))

        again = AgentProcess(path, tmp_path / "agent2.log").start()
        try:
            again.wait_log("stream dev1: no sample since")
            sub.wait(lambda m: ha_view(sub).streams() == {"dev2", "press9"}, "dev1 gone")
            kept = _retained(broker.port)
            assert not any("/dev1/" in t for t in kept), kept
            assert kept[P + "stream/dev2/state"] == "warming_up"
            cal = state / "calibration"
            assert {p.name for p in cal.glob("*.json")} == {"dev2.json", "press9.json"}
            again.signal(signal.SIGTERM)
            again.proc.wait(20)
            book = json.loads((state / FILE).read_text())["last_sample"]
            assert set(book) == {"dev2"} and time.time() - book["dev2"] < 120
            no_traceback(again)
        finally:
            again.close()
    finally:
        agent.close()
        sub.close()


# ---------------------------------------------------------------- the sink alone
def _sink_run(port: int, state: Path, before_start=None) -> MqttSink:
    """A run of the MQTT sink with its pipeline's book; `before_start(sink, book)`."""
    cfg = _cfg(state, 3600, mqtt={"port": port, "keepalive": 5,
                                  "homeassistant": {"enabled": True}})
    book = Departures(cfg)
    sink = MqttSink(cfg, Metrics())
    sink.attach(cfg, None, book)
    if before_start:
        before_start(sink, book)
    sink.start()
    return sink


@needs_broker
@pytest.mark.parametrize("when", ["read back", "swept before the connect"])
def test_the_sink_never_shows_a_departed_stream_again(broker, tmp_path, when):
    """Whichever comes first at a start, the read-back of the discovery payload or the
    first sweep (the broker may be late), dev1 is not published again, only cleared."""
    state = tmp_path / "st"
    node_p, ha = "tsad/n1/", "homeassistant/device/n1/config"
    sub = Sub(broker.port, [node_p + "#", "homeassistant/#"])
    first = _sink_run(broker.port, state)
    for sid in ("dev1", "dev2"):
        first.stream_status(sid, {"state": "normal", "online": True, "shelved_until": None})
    sub.wait(lambda m: ha_view_of(sub, ha) == {"bench", "dev1", "dev2"},
             "dev1 and dev2 in Home Assistant")
    first.stop()
    (state / FILE).write_text(json.dumps({"last_sample": {"dev1": time.time() - 7200,
                                                          "dev2": time.time()}}))
    n = len(sub.msgs)
    def sweep_first(sink, book):        # as the pipeline's first sweep does
        book.started -= 3600            # once the run is past its first idle_evict_s
        due = book.sweep(_engine(state), ShelfBook(None))
        assert due == ["dev1"]
        sink.forget(due)

    again = _sink_run(broker.port, state, sweep_first if when != "read back" else None)
    try:
        sub.wait(lambda m: any(t == node_p + "stream/dev1/state" and p == ""
                               for t, p, *_ in m[n:]), "dev1's state cleared")
        sub.wait(lambda m: ha_view_of(sub, ha) == {"bench", "dev2"},
                 "dev1 gone from Home Assistant")
        assert [(t, p) for t, p, *_ in sub.msgs[n:] if "/dev1/" in t and p] == []
    finally:
        again.stop()
        sub.close()


def ha_view_of(sub: Sub, topic: str) -> set[str]:
    reg = Registry()
    for t, raw, _, _ in sub.on(topic):
        reg.apply(t, raw)
    return reg.streams()


# ---------------------------------------------------------------- the book alone
def _cfg(state_dir: Path, forget_after_s, **over) -> AgentConfig:
    return build(AgentConfig, {
        "node": "n1", "state_dir": str(state_dir), "model": {"path": "m.onnx"},
        "buffer": {"forget_after_s": forget_after_s},
        "streams": [{"id": "bench", "source": {"type": "replay", "path": "a.csv"}},
                    WILDCARD], **over})


def _engine(state_dir: Path, **streams: float) -> SimpleNamespace:
    """What the book reads of an engine: streams with their last sample (monotonic), and
    the alerts of dropped streams still to ack."""
    return SimpleNamespace(streams={sid: SimpleNamespace(last_seen=t) for sid, t in streams.items()},
                           store=StateStore(state_dir), metrics=Metrics(), held_rtn={})


def test_the_book_forgets_only_unnamed_streams_that_left_memory(tmp_path, caplog):
    store = StateStore(tmp_path)
    for sid in ("bench", "dev1", "dev2", "dev.3"):
        store.save(sid, "sha", {"mean": [0.0], "std": [1.0], "threshold": 1.0})
    shelves = ShelfBook(tmp_path)
    shelves.record("dev1", 3600)
    book = Departures(_cfg(tmp_path, 5))
    book.started -= 3600                              # past a run's first idle_evict_s
    now = time.monotonic()
    engine = _engine(tmp_path, bench=now - 60, dev1=now - 60, dev2=now - 60)
    book.note(engine.streams)
    assert book.sweep(engine, shelves) == []          # all still in memory
    del engine.streams["dev1"], engine.streams["bench"]
    with caplog.at_level(logging.INFO, "tsad.departures"):
        assert book.sweep(engine, shelves) == ["dev1"]
    assert "stream dev1: no sample since" in caplog.text
    assert sorted(store.streams()) == ["bench", "dev.3", "dev2"]
    assert "dev1" not in shelves.ends and "dev1" not in json.loads(
        (tmp_path / "shelves.json").read_text())["ends"]
    assert engine.metrics.dropped["stream_forgotten"] == 1
    # found only as a baseline file: counts from the book's start, not forgotten at once
    assert not book.gone("dev.3") and "dev.3" in json.loads(
        (tmp_path / FILE).read_text())["last_sample"]
    assert not book.gone("bench") and "bench" not in book.seen


def test_the_book_keeps_wall_times_across_a_restart(tmp_path, caplog):
    book = Departures(_cfg(tmp_path, 3600))
    now = time.monotonic()
    book.note({"dev1": SimpleNamespace(last_seen=now - 7200),
               "dev2": SimpleNamespace(last_seen=now - 60)})
    book.save(force=True)
    again = Departures(_cfg(tmp_path, 3600))
    assert again.gone("dev1") and not again.gone("dev2")
    # a time ahead of the clock (the clock went back meanwhile) counts from now
    (tmp_path / FILE).write_text(json.dumps({"last_sample": {"dev1": time.time() + 1e6}}))
    assert not Departures(_cfg(tmp_path, 1)).gone("dev1")
    (tmp_path / FILE).write_text('{"last_sample": {"dev1": "yesterday"}}')
    with caplog.at_level(logging.WARNING, "tsad.departures"):
        assert Departures(_cfg(tmp_path, 1)).seen == {}
    assert "cannot be read" in caplog.text


@pytest.mark.parametrize("after", [0, None])
def test_a_retention_of_0_or_null_forgets_nothing(tmp_path, after):
    book = Departures(_cfg(tmp_path, after))
    engine = _engine(tmp_path, dev1=1.0)
    book.note(engine.streams)
    engine.streams.clear()
    assert book.sweep(engine, ShelfBook(None)) == [] and not book.gone("dev1")


def test_the_retention_is_validated_and_changing_it_keeps_the_engine(tmp_path):
    with pytest.raises(ConfigError, match=r"buffer.forget_after_s: value -1 is invalid"):
        parse_config(yaml.safe_dump({"node": "n", "model": {"path": "m.onnx"},
                                     "buffer": {"forget_after_s": -1},
                                     "streams": [WILDCARD]}))
    assert _cfg(tmp_path, 5).buffer.forget_after_s == 5
    assert _engine_settings(_cfg(tmp_path, 5)) == _engine_settings(_cfg(tmp_path, 50))


def test_nothing_is_forgotten_before_the_agent_has_run_idle_evict_s(tmp_path):
    """A plant that stood for a season powers up with the agent: its devices reconnect
    minutes later and must find their baselines, not a sweep that ran at the start."""
    StateStore(tmp_path).save("dev1", "sha", {"mean": [0.0], "std": [1.0], "threshold": 1.0})
    (tmp_path / FILE).write_text(json.dumps({"last_sample": {"dev1": time.time() - 90 * 86400}}))
    book = Departures(_cfg(tmp_path, 30 * 86400, buffer={"forget_after_s": 30 * 86400,
                                                          "idle_evict_s": 600}))
    engine = _engine(tmp_path)
    assert book.gone("dev1") and book.sweep(engine, ShelfBook(None)) == []
    assert StateStore(tmp_path).streams() == ["dev1"]
    book.started -= 601
    assert book.sweep(engine, ShelfBook(None)) == ["dev1"]
    assert StateStore(tmp_path).streams() == []

"""The Prometheus endpoints: the daemon's (`metrics.listen`) end to end with the real agent
process (a pty serial line, the tiny model, a real Mosquitto), and `serve`'s GET
/metrics, both read with prometheus_client's text parser."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from agent.config import ConfigError, DetectionConfig, parse_config
from agent.config_build import build
from agent.detector import Detector
from agent.engine import Engine
from agent.metrics import Metrics
from agent.prom import DaemonCollector, take_snapshot
from agent.sinks.prometheus import PrometheusSink
from agent.sources.base import Batch
from agent_harness import MOSQUITTO, STREAM, THRESHOLD, Pty, no_traceback, tiny_model, \
    write_config
from conftest import REPO, free_port
from http_harness import call, start, stop
from prom_harness import MetricsRig, value
from prometheus_client.parser import text_string_to_metric_families

needs_broker = pytest.mark.skipif(not Path(MOSQUITTO).exists(),
                                  reason="mosquitto not installed (apt-get install mosquitto)")


def _state(f: dict, state: str) -> float | None:
    return value(f, "tsad_stream_state", stream=STREAM, state=state)


# ---------------------------------------------------------------- the daemon, end to end
@needs_broker
def test_endpoint_tracks_streams_and_alerts_and_survives_a_reload(tmp_path, broker):
    rig = MetricsRig(tmp_path, broker.port).ready()
    w = rig.writer
    try:
        f = rig.scrape()
        for family in ("process_cpu_seconds", "process_resident_memory_bytes", "python_info",
                       "tsad_build_info", "tsad_inference_seconds", "tsad_samples"):
            assert family in f, f"{family} missing from /metrics"
        assert f["tsad_inference_seconds"].type == "histogram"
        assert value(f, "tsad_build_info", model="tiny_v1", ep="CPUExecutionProvider") == 1

        w.normal(20)
        f = rig.wait(lambda f: value(f, "tsad_stream_samples_total", stream=STREAM) == 20,
                     "the stream's 20 samples")
        assert _state(f, "normal") == 1 and _state(f, "anomaly") == 0
        assert value(f, "tsad_stream_score", stream=STREAM) < THRESHOLD
        assert value(f, "tsad_stream_threshold", stream=STREAM) == THRESHOLD
        assert value(f, "tsad_stream_shelved", stream=STREAM) == 0
        assert 0 <= value(f, "tsad_stream_last_sample_age_seconds", stream=STREAM) < 30
        assert value(f, "tsad_samples_total") == 20
        assert value(f, "tsad_windows_total") == 13      # 20 samples, window 8
        steps = value(f, "tsad_engine_steps_total")
        assert 1 <= steps <= 20 and value(f, "tsad_engine_stream_steps_total") == steps
        assert value(f, "tsad_inference_seconds_count") >= 1
        assert value(f, "tsad_alerts_total", stream=STREAM, type="new") is None

        # one anomalous line opens an alert; the stream stays in it until normal lines come
        w.line(True)
        f = rig.wait(lambda f: value(f, "tsad_alerts_total", stream=STREAM, type="new") == 1
                     and _state(f, "anomaly") == 1, "alerts_total new 1 and state anomaly")
        assert value(f, "tsad_stream_score", stream=STREAM) >= THRESHOLD
        w.normal(3)
        rig.wait(lambda f: value(f, "tsad_alerts_total", stream=STREAM, type="end") == 1
                 and _state(f, "normal") == 1, "alerts_total end 1, state normal again")

        # reload, asking for another listen address: refused with a warning, the endpoint
        # serves on, and its counters carry on counting
        cfg = yaml.safe_load(rig.config.read_text())
        cfg["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
        rig.config.write_text(yaml.safe_dump(cfg))
        before = rig.value("tsad_samples_total")
        rig.agent.signal(signal.SIGHUP)
        rig.agent.wait_log("reloaded")
        assert "metrics: changes take effect at the next start" in rig.agent.log()
        w.normal(5)
        w.line(True)
        w.normal(3)
        f = rig.wait(lambda f: value(f, "tsad_alerts_total", stream=STREAM, type="new") == 2
                     and value(f, "tsad_alerts_total", stream=STREAM, type="end") == 2,
                     "a second alert counted after the reload")
        assert value(f, "tsad_samples_total") >= before + 9
        rig.agent.signal(signal.SIGTERM)
        assert rig.agent.proc.wait(30) == 0
        no_traceback(rig.agent)
    finally:
        rig.close()


@needs_broker
def test_outbox_depth_and_source_up_follow_the_outages(tmp_path, broker):
    rig = MetricsRig(tmp_path, broker.port).ready()
    w = rig.writer
    try:
        w.normal(20)
        rig.wait(lambda f: value(f, "tsad_mqtt_connected") == 1
                 and value(f, "tsad_outbox_depth") == 0, "connected, outbox empty")
        broker.stop()
        rig.wait(lambda f: value(f, "tsad_mqtt_connected") == 0, "broker gone")
        w.spikes(3)
        f = rig.wait(lambda f: (value(f, "tsad_outbox_depth") or 0) >= 6,
                     "3 alerts (new + end) waiting in the outbox")
        assert value(f, "tsad_alerts_total", stream=STREAM, type="new") == 3
        broker.start()
        rig.wait(lambda f: value(f, "tsad_outbox_depth") == 0, "outbox drained", 30)
        # a gauge scraped every 15 s misses a flapping link: the losses are counted
        assert value(f, "tsad_mqtt_disconnects_total") == 1
        assert value(f, "tsad_source_disconnects_total", source=STREAM, type="serial") == 0

        rig.pty.close()        # the serial device goes away
        f = rig.wait(lambda f: value(f, "tsad_source_up", source=STREAM, type="serial") == 0,
                     "tsad_source_up 0")
        assert value(f, "tsad_source_disconnects_total", source=STREAM, type="serial") == 1
        assert rig.agent.running()
        no_traceback(rig.agent)
    finally:
        rig.close()


def test_a_port_in_use_is_a_one_line_startup_error(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    pty = Pty()
    try:
        cfg = write_config(tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=1,
                           serial_port=pty.path, state_dir=tmp_path / "state",
                           mqtt={"enabled": False}, metrics={"listen": f"127.0.0.1:{port}"})
        p = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        taken.close()
        pty.close()
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[-1] == f"error: metrics.listen: cannot listen on 127.0.0.1:{port}: " \
                        f"Address already in use", p.stderr
    assert "Traceback" not in p.stderr


# ---------------------------------------------------------------- config
BASE = "node: n\nmodel: {path: m.onnx}\nstreams: [{id: a, source: {type: serial, port: /x}}]\n"


@pytest.mark.parametrize("listen, expected", [
    (None, None), ("9108", "127.0.0.1:9108"), ("0.0.0.0:9108", "0.0.0.0:9108"),
    ("'[::1]:9108'", "[::1]:9108"), ("localhost:9108", "localhost:9108")])
def test_listen_is_off_by_default_and_a_bare_port_means_loopback(listen, expected, monkeypatch):
    monkeypatch.setattr("agent.config.resolve_model", lambda v: v)
    text = BASE if listen is None else BASE + f"metrics:\n  listen: {listen}\n"
    assert parse_config(text).metrics.listen == expected


@pytest.mark.parametrize("listen", ["0", "70000", "'host:'", "':9108'", "'a:b:9108'", "true",
                                    "'x y:1'", "[9108]"])
def test_a_bad_listen_value_is_a_config_error_with_its_line(listen, monkeypatch):
    monkeypatch.setattr("agent.config.resolve_model", lambda v: v)
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + f"metrics:\n  listen: {listen}\n")
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith("<config>:5: metrics.listen: value ")
    assert "expected host:port" in e.value.problems[0]


# ---------------------------------------------------------------- the snapshot, in process
def test_series_of_a_dropped_stream_go_with_it(tmp_path):
    """Cardinality follows the engine: a stream it no longer holds (evicted, removed by a
    reload) leaves no score, state or alert series behind."""
    m = Metrics()
    det = Detector(str(tiny_model(tmp_path)), metrics=m)
    e = Engine(build(DetectionConfig, {
        "node": "t", "scoring": {"threshold": THRESHOLD},
        "alerts": {"open_k": 1, "open_n": 1, "close_m": 2}}), det, metrics=m,
        max_streams={"bus": 3})
    sink = PrometheusSink(m)
    for sid in ("s1", "s2", "s3", "s4"):      # the fourth is over the source's cap
        v = np.zeros((10, 3), np.float32)
        v[9] = 1000
        for r in e.step([Batch(sid, 1e9 + np.arange(10.0), v, source="bus")]):
            sink.scores(r.stream, r.ts, r.scores, r.threshold, r.labels, r.alert_open)
            for ev in r.events:
                sink.alert(ev)
    col = DaemonCollector(m)
    col.publish(e, [], [])
    assert [s.id for s in col.snapshot.streams] == ["s1", "s2", "s3"]
    assert set(col.snapshot.alerts) == {(s, "new") for s in ("s1", "s2", "s3")}
    e.drop("s2")
    col.snapshot = take_snapshot(e, [], [], m)
    assert "s2" not in m.stream_scores and ("s2", "new") not in m.stream_alerts
    streams = {s.labels.get("stream") for f in col.collect() for s in f.samples}
    assert streams == {None, "s1", "s3"}


# ---------------------------------------------------------------- serve's /metrics
def test_serve_metrics_parse_with_the_prometheus_parser():
    srv = start(calibrate=0)
    try:
        call(srv, "POST", "/anomaly", b"not json")
        code, _, body = call(srv, "GET", "/metrics")
    finally:
        stop(srv)
    assert code == 200
    f = {x.name: x for x in text_string_to_metric_families(body.decode())}
    assert f["tsad_malformed"].type == "counter" and f["tsad_inference_seconds"].type == "histogram"
    assert value(f, "tsad_malformed_total", reason="http_json") == 1
    assert value(f, "tsad_http_requests_total", path="/anomaly", code="400") == 1
    assert value(f, "process_cpu_seconds_total") > 0 and "python_info" in f
    assert "tsad_outbox_depth" not in f


def test_a_learning_stream_shows_no_old_score_and_an_unsampled_one_no_age(tmp_path):
    """A re-baseline's learning period shows neither the last score nor the threshold it
    is replacing (a panel would show a score over a threshold that no longer holds), and a
    stream a command made before its first sample shows no sample age."""
    m = Metrics()
    det = Detector(str(tiny_model(tmp_path)), metrics=m)
    e = Engine(build(DetectionConfig, {
        "node": "t", "scoring": {"threshold": THRESHOLD},
        "calibration": {"enabled": True, "samples": 10},
        "alerts": {"open_k": 1, "open_n": 1, "close_m": 2}}), det, metrics=m,
        named={"s1", "idle"})
    sink = PrometheusSink(m)
    v = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)
    v[29] = 1000
    for r in e.step([Batch("s1", 1e9 + np.arange(30.0), v)]):
        sink.scores(r.stream, r.ts, r.scores, r.threshold, r.labels, r.alert_open)
    assert e.shelve("idle", 60) is not None
    col = DaemonCollector(m)

    def series():
        col.snapshot = take_snapshot(e, [], [], m)
        return {(f.name, s.labels.get("stream")) for f in col.collect() for s in f.samples}

    got = series()
    assert {("tsad_stream_score", "s1"), ("tsad_stream_threshold", "s1"),
            ("tsad_stream_last_sample_age_seconds", "s1")} <= got
    assert ("tsad_stream_last_sample_age_seconds", "idle") not in got
    assert e.rebaseline("s1")[0] and e.streams["s1"].baseline.learning
    got = series()
    assert ("tsad_stream_score", "s1") not in got and ("tsad_stream_threshold", "s1") not in got
    assert ("tsad_stream_state", "s1") in got


def test_uptime_counts_running_time_not_wall_clock_steps(monkeypatch):
    """NTP stepping a Pi's clock by days (it booted without a real-time clock) is no time
    running: uptime read 259,205 s after a 3-day step forward, and went negative back."""
    import time as _time
    from agent.metrics import Metrics
    m = Metrics()
    real = _time.time
    for step in (3 * 86400, -86400):
        monkeypatch.setattr(_time, "time", lambda: real() + step)
        assert 0 <= m.snapshot()["uptime_s"] < 60

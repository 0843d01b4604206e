"""Console (text / json) and JSON-lines sinks: one time convention (sample time, ISO 8601
UTC with ms) on every console line, and update lines only on request or for an ack."""
from __future__ import annotations

import json
import re

import numpy as np

from agent.metrics import Metrics
from agent.sinks.console import ConsoleSink
from agent.sinks.jsonl import JsonLinesSink, to_json


ISO = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z"


def _alert(typ="new", **kw):
    a = {"schema": 1, "type": typ, "id": "n1-pump1-1", "node": "n1", "stream": "pump1",
         "start": "1970-01-01T00:16:40.000Z",
         "end": None if typ != "end" else "1970-01-01T00:17:22.500Z", "score": 0.8123,
         "peak_score": 1.25, "threshold": 0.3,
         "top_channels": [{"name": "Current", "share": 0.61}, {"name": "Pressure", "share": 0.22}],
         "model": {"name": "conv_ae", "sha256": "ab" * 32, "ep": "cpu"}}
    a.update(kw)
    return a


def test_text_lines(capsys):
    s = ConsoleSink("text")
    s.alert(_alert("new"))
    s.alert(_alert("end"))
    s.state("pump1", "anomaly")           # text mode prints alerts only
    s.score("pump1", 1.0, 0.5, 0.3, 1)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert out[0] == ("1970-01-01T00:16:40.000Z ALERT new    pump1 score=0.8123 thr=0.3 "
                      "top=Current(0.61),Pressure(0.22) id=n1-pump1-1")
    assert out[1] == "1970-01-01T00:17:22.500Z ALERT end    pump1 peak=1.25 thr=0.3 dur=42.5s " \
                     "id=n1-pump1-1"


def test_every_line_carries_sample_time_in_one_format(capsys):
    """new: its start, end: its end, update: the stream's newest sample time; epoch
    numbers (older events) are shown the same way."""
    s = ConsoleSink("text", updates=True)
    s.scores("pump1", np.array([1500.0, 1500.25]), np.array([0.9, 0.9]), 0.3,
             np.ones(2, np.int8), np.ones(2, np.int8))
    s.alert(_alert("new", start=1000.0))
    s.alert(_alert("update"))
    s.alert(_alert("end"))
    lines = capsys.readouterr().out.splitlines()
    stamps = [line.split(" ", 1)[0] for line in lines]
    assert stamps == ["1970-01-01T00:16:40.000Z", "1970-01-01T00:25:00.250Z",
                      "1970-01-01T00:17:22.500Z"]
    assert all(re.fullmatch(ISO, t) for t in stamps)


def test_updates_are_quiet_by_default_but_an_ack_shows(capsys):
    s = ConsoleSink("text")
    s.alert(_alert("new", acknowledged=False))
    for _ in range(3):
        s.alert(_alert("update", acknowledged=False))
    s.alert(_alert("update", acknowledged=True))     # the operator's ack
    s.alert(_alert("update", acknowledged=True))     # later periodic updates: quiet again
    s.alert(_alert("end", acknowledged=True))
    s.alert(_alert("new", id="second", acknowledged=False))
    s.alert(_alert("update", id="second", acknowledged=True))
    kinds = [(line.split()[2], "acknowledged" in line) for line in
             capsys.readouterr().out.splitlines()]
    assert kinds == [("new", False), ("update", True), ("end", True), ("new", False),
                     ("update", True)]


def test_updates_true_prints_every_update(capsys):
    s = ConsoleSink("text", updates=True)
    for _ in range(3):
        s.alert(_alert("update"))
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_text_tolerates_missing_fields(capsys):
    ConsoleSink("text", updates=True).alert(
        {"type": "update", "stream": "p", "top_channels": [{"name": "x"}]})
    line = capsys.readouterr().out.strip()
    assert line == "? ALERT update p score=? thr=? top=x(?) id=?"


def test_json_format_prints_alerts_and_states(capsys):
    s = ConsoleSink("json")
    s.alert(_alert("new", score=float("nan")))
    s.state("pump1", "anomaly")
    s.score("pump1", 1.0, 0.5, 0.3, 1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    a, st = (json.loads(x) for x in lines)
    assert a["id"] == "n1-pump1-1" and a["score"] is None     # NaN is not valid JSON
    assert st == {"type": "state", "stream": "pump1", "state": "anomaly", "ts": None}
    s.scores("pump1", np.array([1000.5]), np.array([0.9]), 0.3, np.ones(1, np.int8),
             np.ones(1, np.int8))
    s.state("pump1", "normal")
    assert json.loads(capsys.readouterr().out)["ts"] == "1970-01-01T00:16:40.500Z"


def test_jsonl_appends_one_line_per_event(tmp_path):
    path = tmp_path / "out" / "alerts.jsonl"
    s = JsonLinesSink(path, Metrics())
    s.start()
    s.alert(_alert("new"))
    # flushed per line: readable before stop()
    assert json.loads(path.read_text().splitlines()[0])["type"] == "new"
    s.alert(_alert("end", peak_score=np.float32(2.5)))
    s.stop()
    s = JsonLinesSink(path)
    s.start()
    s.alert(_alert("new", id="second"))
    s.stop()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["type"] for r in rows] == ["new", "end", "new"]
    assert rows[1]["peak_score"] == 2.5 and rows[2]["id"] == "second"


def test_jsonl_write_error_is_counted(tmp_path):
    m = Metrics()
    s = JsonLinesSink("/dev/full", m)
    s.start()
    s.alert(_alert("new"))
    s.alert(_alert("end"))
    assert m.dropped["jsonl_write"] == 2
    s.stop()


def test_to_json_plain_values():
    doc = json.loads(to_json({"a": np.int64(3), "b": [np.float64(1.5), float("inf")],
                              "c": np.array([1, 2])}))
    assert doc == {"a": 3, "b": [1.5, None], "c": [1, 2]}

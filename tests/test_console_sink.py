"""Console (text / json) and JSON-lines sinks."""
from __future__ import annotations

import json

import numpy as np

from agent.metrics import Metrics
from agent.sinks.console import ConsoleSink
from agent.sinks.jsonl import JsonLinesSink, to_json


def _alert(typ="new", **kw):
    a = {"schema": 1, "type": typ, "id": "n1-pump1-1", "node": "n1", "stream": "pump1",
         "start": 1000.0, "end": None if typ != "end" else 1042.5, "score": 0.8123,
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
    assert " ALERT new    pump1 score=0.8123 thr=0.3 top=Current(0.61),Pressure(0.22) id=n1-pump1-1" \
        in out[0]
    assert out[0][:4].isdigit() and out[0][4] == "-"
    assert " ALERT end    pump1 peak=1.25 thr=0.3 dur=42.5s id=n1-pump1-1" in out[1]


def test_text_tolerates_missing_fields(capsys):
    ConsoleSink("text").alert({"type": "update", "stream": "p", "top_channels": [{"name": "x"}]})
    line = capsys.readouterr().out.strip()
    assert "ALERT update p score=? thr=? top=x(?) id=?" in line


def test_json_format_prints_alerts_and_states(capsys):
    s = ConsoleSink("json")
    s.alert(_alert("new", score=float("nan")))
    s.state("pump1", "anomaly")
    s.score("pump1", 1.0, 0.5, 0.3, 1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    a, st = (json.loads(x) for x in lines)
    assert a["id"] == "n1-pump1-1" and a["score"] is None     # NaN is not valid JSON
    assert st["type"] == "state" and st["stream"] == "pump1" and st["state"] == "anomaly"


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

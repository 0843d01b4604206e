"""Operator commands (agent.commands) carried out on the engine: every command gets one
result, malformed ones an error, never an exception."""
from __future__ import annotations

import numpy as np
import pytest

from agent.commands import execute, parse
from agent.config import DetectionConfig
from agent.config_build import build
from agent.detector import Detector
from agent.engine import Engine
from agent.sources.base import Batch
from onnx_factory import make_model

W = 8


@pytest.fixture
def engine(tmp_path):
    path, _ = make_model(tmp_path / "m.onnx", window=W, channels=["a", "b", "c"])
    cfg = build(DetectionConfig, {"node": "n", "scoring": {"threshold": 1.0},
                                          "alerts": {"open_k": 1, "open_n": 1, "close_m": 2}})
    return Engine(cfg, Detector(str(path)))


def feed(e: Engine, values, t0: float) -> list:
    v = np.asarray(values, np.float32)
    return e.step([Batch("pump", t0 + np.arange(len(v), dtype=np.float64), v)])


def quiet(n):
    return np.zeros((n, 3))


def loud(n):
    return np.full((n, 3), 100.0)


def events(results):
    return [ev for r in results for ev in r.events]


@pytest.mark.parametrize("payload, error", [
    (b"{not json", "not JSON"), (b"[1]", "JSON object"), (b'{"cmd": "reboot"}', "cmd must be"),
    (b'{"id": "r", "cmd": "ack"}', "needs 'alert_id'"),
    (b'{"cmd": "shelve", "stream": "pump"}', "for_s"),
    (b'{"cmd": "shelve", "stream": "pump", "for_s": -1}', "for_s"),
    (b'{"cmd": "shelve", "stream": "pump", "for_s": 1e99}', "for_s"),
    (b'{"cmd": "recalibrate", "stream": 7}', "needs 'stream'"),
    # an id the result could not echo (the schema: a string of 1-128 chars) is refused,
    # not carried out
    (b'{"id": "", "cmd": "unshelve", "stream": "pump"}', "'id' must be"),
    (b'{"id": 5, "cmd": "unshelve", "stream": "pump"}', "'id' must be"),
    (b'{"id": "%s", "cmd": "unshelve", "stream": "pump"}' % (b"x" * 129), "'id' must be")])
def test_malformed_commands_get_an_error_result(engine, payload, error):
    result, evs = execute(parse(payload), engine)
    assert result["ok"] is False and error in result["error"] and evs == []
    assert result["id"] is None or result["id"] == "r"


def test_a_command_without_an_id_is_carried_out(engine):
    feed(engine, quiet(5), 1e9)
    result, _ = execute(parse(b'{"cmd": "unshelve", "stream": "pump"}'), engine)
    assert result["id"] is None and result["ok"] is True


def test_unknown_targets_are_errors_not_crashes(engine):
    for p in (b'{"id": "1", "cmd": "recalibrate", "stream": "nope"}',
              b'{"id": "2", "cmd": "unshelve", "stream": "nope"}',
              b'{"id": "3", "cmd": "ack", "alert_id": "n:pump:1"}'):
        result, _ = execute(parse(p), engine)
        assert result["ok"] is False and result["id"] in ("1", "2", "3")


def test_ack_shows_in_an_update_and_in_the_end(engine):
    feed(engine, quiet(W), 1e9)
    new = events(feed(engine, loud(1), 1e9 + W))[0]
    assert new["type"] == "new" and new["acknowledged"] is False
    assert engine.streams["pump"].tracker.alarm == "unacknowledged"
    result, evs = execute(parse(f'{{"id": "a", "cmd": "ack", "alert_id": "{new["id"]}"}}'), engine)
    assert result == {"id": "a", "cmd": "ack", "ok": True, "alert_id": new["id"]}
    assert [(e["type"], e["acknowledged"]) for e in evs] == [("update", True)]
    assert engine.streams["pump"].tracker.alarm == "acknowledged"
    end = events(feed(engine, quiet(3), 1e9 + W + 1))
    assert [(e["type"], e["acknowledged"]) for e in end] == [("end", True)]
    # the next alert starts unacknowledged again
    again = events(feed(engine, loud(1), 1e9 + W + 10))
    assert again[0]["type"] == "new" and again[0]["acknowledged"] is False


def test_shelve_blocks_new_alerts_until_it_runs_out(engine):
    feed(engine, quiet(W), 1e9)
    result, _ = execute(parse(b'{"id": "s", "cmd": "shelve", "stream": "pump", "for_s": 60}'),
                        engine)
    assert result["ok"] and result["shelved_until"].startswith("2001-09-09T01:47:")
    assert events(feed(engine, loud(3), 1e9 + W)) == []            # shelved: silence
    feed(engine, quiet(60), 1e9 + W + 3)
    assert [e["type"] for e in events(feed(engine, loud(1), 1e9 + W + 63))] == ["new"]


def test_unshelve_lifts_it_at_once(engine):
    feed(engine, quiet(W), 1e9)
    execute(parse(b'{"cmd": "shelve", "stream": "pump", "for_s": 3600}'), engine)
    assert events(feed(engine, loud(1), 1e9 + W)) == []
    feed(engine, quiet(3), 1e9 + W + 1)
    result, _ = execute(parse(b'{"cmd": "unshelve", "stream": "pump"}'), engine)
    assert result["ok"] and result["shelved_until"] is None
    assert [e["type"] for e in events(feed(engine, loud(1), 1e9 + W + 4))] == ["new"]


def test_recalibrate_ends_the_alert_and_reports_learning(tmp_path):
    path, _ = make_model(tmp_path / "m.onnx", window=W, channels=["a", "b", "c"])
    e = Engine(build(
        DetectionConfig,
        {"node": "n", "calibration": {"enabled": True, "samples": 20, "margin": 5.0},
         "alerts": {"open_k": 1, "open_n": 1, "close_m": 50}}), Detector(str(path)))
    rng = np.random.default_rng(0)
    feed(e, rng.normal(0, 1, (40, 3)), 1e9)
    assert events(feed(e, loud(2), 1e9 + 40))[0]["type"] == "new"
    result, evs = execute(parse(b'{"id": "c", "cmd": "recalibrate", "stream": "pump"}'), e)
    assert result == {"id": "c", "cmd": "recalibrate", "ok": True, "stream": "pump"}
    assert [(ev["type"], ev["reason"]) for ev in evs] == [("end", "rebaseline")]
    assert ("pump", "learning") in e.take_entered()
    assert e.pending("pump") == {"status": "learning", "needed": 20}

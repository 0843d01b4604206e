"""A model that goes wrong at run time (ORT audit, twenty-second session), through the real
engine and a real ONNX model whose run fails, or returns NaN or infinity, on a trigger
(tests/onnx_factory.py, kind "glitch": channel d NaN, c infinity, b a failed run)."""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from agent.config import DetectionConfig
from agent.config_build import build
from agent.detector import Detector, DetectorError
from agent.engine import Engine
from agent.metrics import Metrics
from agent.sources.base import Batch
from onnx_factory import make_model

CH = ["a", "b", "c", "d"]
W = 8
FAIL, INF, NAN = 1, 2, 3          # the channel whose value over the trigger does it
ALERTS = {"open_k": 2, "open_n": 3, "close_m": 3}


@pytest.fixture
def glitch(tmp_path):
    path, _ = make_model(tmp_path / "g.onnx", window=W, channels=CH, kind="glitch", trigger=5.0,
                         threshold=1.0)
    return str(path)


def engine(model: str, **over) -> Engine:
    m = Metrics()
    cfg = {"node": "t", "alerts": ALERTS, "scoring": {"threshold": 1.0}, **over}
    return Engine(build(DetectionConfig, cfg), Detector(model, metrics=m), metrics=m)


def quiet(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.3, (n, len(CH))).astype(np.float32)


def step(e: Engine, blocks: dict[str, np.ndarray], t0: float) -> list:
    return e.step([Batch(sid, t0 + np.arange(len(v), dtype=np.float64), v)
                   for sid, v in blocks.items()])


def events(res) -> list[tuple[str, str]]:
    return [(r.stream, ev["type"]) for r in res for ev in r.events if ev["type"] != "update"]


def test_a_failed_run_drops_one_streams_windows_not_the_daemon_nor_the_others(glitch):
    e = engine(glitch)
    bad = quiet(40)
    bad[20, FAIL] = 9.0          # windows holding it fail the model's run
    ok = quiet(40, seed=1)
    ok[10:, 0] = 30.0            # a fault: this stream's alert opens and stays open
    res = step(e, {"bad": bad, "ok": ok}, 1e9)
    assert events(res) == [("ok", "new")]
    got = {r.stream: len(r.ts) for r in res if len(r.ts)}
    # the step's windows of the stream whose own call failed are dropped, the others' not
    assert got == {"ok": 40 - W + 1}
    assert e.metrics.errors["inference"] == 1 and "nonfinite_output" not in e.metrics.errors
    assert e.metrics.windows_inferred == 40 - W + 1
    # the next step goes on as usual, the alert still open
    res = step(e, {"bad": quiet(10, 2), "ok": ok[10:20]}, 1e9 + 40)
    assert events(res) == [] and e.streams["ok"].state == "anomaly"
    assert {r.stream: len(r.ts) for r in res} == {"bad": 10, "ok": 10}


def test_nan_windows_neither_close_an_open_alert_nor_count_as_normal(glitch):
    e = engine(glitch)
    v = quiet(200)
    v[50:150, 0] = 30.0          # one fault of 100 s ...
    v[90, NAN] = 9.0             # ... in which W windows come back NaN
    res = []
    for i in range(0, 200, 10):
        res += step(e, {"s": v[i:i + 10]}, 1e9 + i)
    assert events(res) == [("s", "new"), ("s", "end")]
    end = [ev for r in res for ev in r.events if ev["type"] == "end"][0]
    assert end["reason"] == "recovered" and end["end"] >= "2001-09-09T01:49:10"  # after row 150
    assert e.metrics.errors["nonfinite_output"] == W
    assert sum(len(r.ts) for r in res) == 200 - W + 1 - W


def test_an_infinite_output_opens_no_alert(glitch):
    e = engine(glitch)
    v = quiet(100)
    v[50, INF] = 9.0
    res = step(e, {"s": v}, 1e9)
    assert events(res) == [] and e.metrics.errors["nonfinite_output"] == W
    assert all(np.isfinite(r.scores).all() for r in res)


def test_nan_in_the_learning_period_is_left_out_of_the_baseline(glitch):
    e = engine(glitch, scoring={"normalize": "channel"},
               calibration={"enabled": True, "samples": 100})
    v = quiet(300)
    v[40, NAN] = 9.0
    step(e, {"s": v}, 1e9)
    st = e.streams["s"]
    assert not st.baseline.learning and np.isfinite(st.baseline.level).all()
    assert np.isfinite(st.threshold) and st.threshold > 0


def test_a_learning_period_whose_fit_fails_learns_again(glitch, caplog):
    e = engine(glitch, calibration={"enabled": True, "samples": 100})
    v = quiet(400)
    v[40, FAIL] = 9.0            # the fit's own model call fails
    res = step(e, {"s": v[:150]}, 1e9)
    st = e.streams["s"]
    assert st.baseline.learning and st.state == "learning"      # not "normal" at threshold 0
    assert e.metrics.errors["learning"] == 1
    assert "its learning period could not be fitted" in caplog.text
    assert sum(len(r.ts) for r in res) == 0
    step(e, {"s": v[150:]}, 1e9 + 150)
    assert not st.baseline.learning and st.threshold > 0
    assert st.baseline.samples_used == 100      # samples 100-149 and 50 more


def test_a_model_that_cannot_reproduce_its_mean_is_refused_at_load(tmp_path):
    path, _ = make_model(tmp_path / "nan.onnx", window=W, channels=CH, bias=float("nan"))
    with pytest.raises(DetectorError, match="returns NaN or infinity for a window at its "
                                            "scaler's mean"):
        Detector(str(path))


def test_the_thread_pool_does_not_spin(glitch):
    opts = Detector(glitch, threads=2).session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_serve_blames_the_model_not_the_input_for_a_nan_score(glitch):
    from agent.http.service import AnomalyService, InputError
    svc = AnomalyService(glitch, calibrate=0)
    w = np.zeros((W, len(CH)))           # JSON numbers: float64
    assert svc.score_window(w)["status"] == "normal"
    w[3, NAN] = 9.0              # 9 overflows nothing: the model's output is NaN
    with pytest.raises(DetectorError, match="the model returned NaN or infinity"):
        svc.score_window(w)
    w[3, NAN], w[-1, 0] = 0.0, 1e39     # this one does overflow float32
    with pytest.raises(InputError, match="values overflow float32"):
        svc.score_window(w)


def test_a_nan_window_dropped_from_an_adapted_block_breaks_no_other_stream(glitch):
    """Review (twenty-second session): dropping windows from a block that spans two adapted
    levels left it one window with a per-window level, and the shared normalisation of a
    step where every other stream had one window too raised out of Engine.step."""
    m = Metrics()
    e = Engine(build(DetectionConfig, {"node": "t", "scoring": {"normalize": "channel"},
                                       "calibration": {"enabled": True, "samples": 200},
                                       "adaptation": {"enabled": True}}),
               Detector(glitch, metrics=m), metrics=m, default_max_streams=2)
    v, u = quiet(1000), quiet(1000, seed=1)
    step(e, {"s": v[:200], "o": u[:200]}, 1e9)
    e.step([Batch("s", 1e9 + np.arange(200, 380.0), v[200:380]),
            Batch("o", 1e9 + np.arange(200, 300.0), u[200:300])])
    for r in (0, 8, 15):
        v[380 + r, NAN] = 9.0
    res = e.step([Batch("s", 1e9 + np.arange(380, 404.0), v[380:404]),
                  Batch("o", 1e9 + np.arange(300, 301.0), u[300:301])])
    assert {r.stream: len(r.ts) for r in res if len(r.ts)} == {"s": 1, "o": 1}
    assert e.metrics.errors["nonfinite_output"] == 23 and "stream_inference" not in m.errors


def test_dropped_windows_do_not_move_a_refinement_forward(glitch, caplog):
    """Review (twenty-second session): the NaN windows of a later block were counted into
    the threshold refinement before an earlier block was judged, so the refinement ran a
    block early, on fewer of the span's windows."""
    caplog.set_level(logging.INFO, logger="tsad")
    counted = []
    for nan in (False, True):
        caplog.clear()
        e = engine(glitch, scoring={}, calibration={
            "enabled": True, "samples": 200, "refine": {"after_s": 0, "span_s": 100}})
        v = quiet(600)
        if nan:
            v[300, NAN] = v[305, NAN] = 9.0     # every window of the block after the span
        for a, b in ((0, 200), (200, 290), (290, 310), (310, 330)):
            e.step([Batch("s", 1e9 + np.arange(a, b, dtype=np.float64), v[a:b])])
        counted += re.findall(r"the (\d+) normal windows of its refinement span", caplog.text)
    assert len(counted) == 2 and counted[0] == counted[1]


def test_a_failure_in_what_a_step_shares_drops_its_windows_not_the_daemon(glitch, caplog,
                                                                          monkeypatch):
    import agent.engine
    e = engine(glitch)
    step(e, {"a": quiet(20), "b": quiet(20, 1)}, 1e9)

    def broken(due, scores, err):
        raise RuntimeError("a bug")
    monkeypatch.setattr(agent.engine, "normalized", broken)
    res = step(e, {"a": quiet(5, 2), "b": quiet(5, 3)}, 1e9 + 20)
    assert sum(len(r.ts) for r in res) == 0 and e.metrics.errors["stream_inference"] == 1
    assert "the model call shared by a, b failed (1 so far)" in caplog.text
    monkeypatch.undo()
    res = step(e, {"a": quiet(5, 4), "b": quiet(5, 5)}, 1e9 + 25)
    assert {r.stream: len(r.ts) for r in res} == {"a": 5, "b": 5}

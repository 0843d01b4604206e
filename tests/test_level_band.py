"""scoring.level_band (agent/scoring.level_excess): a sustained level shift that the model
reproduces is still scored, through the real engine and a real ONNX model; off, the
scores are the model's own, bit for bit; and the key travels in a model's policy."""
from __future__ import annotations

import numpy as np
import pytest

from agent.config import DetectionConfig
from agent.config_build import build
from agent.contract import score_windows
from agent.detector import Detector
from agent.engine import Engine
from agent.model_meta import ModelMetaError, load_meta, meta_path_for
from agent.policy import effective
from agent.scoring import level_excess
from agent.sources.base import Batch
from onnx_factory import make_model

CH = ["a", "b", "c"]
W = 16
STEP_AT = 300


def shifted(n: int = 2000, size: float = 8.0, seed: int = 0) -> np.ndarray:
    """Small noise around the model's mean; channel a steps by `size` stds at STEP_AT and
    stays there (a disturbance a controller holds: a new level, no transient)."""
    v = np.random.default_rng(seed).normal(0, 0.1, (n, len(CH))).astype(np.float32)
    v[STEP_AT:, 0] += size
    return v


def run(model, values: np.ndarray, **scoring) -> tuple[dict, Engine]:
    # adaptation as the TEP policies run it, faster and with the gate wide open: without
    # an alert, the step would be learned as the new normal within minutes
    cfg = build(DetectionConfig, {
        "node": "t", "scoring": scoring,
        "adaptation": {"enabled": True, "time_constant_s": 60, "gate": 100.0}})
    e = Engine(cfg, Detector(str(model)))
    ts = 1e9 + np.arange(len(values), dtype=np.float64)
    out = {"ts": [], "score": [], "alert": []}
    events = []
    for a in range(0, len(values), 64):
        for r in e.step([Batch("s", ts[a:a + 64], values[a:a + 64])]):
            out["ts"].append(r.ts)
            out["score"].append(r.scores)
            out["alert"].append(r.alert_open)
            events += r.events
    table = {k: np.concatenate(v) for k, v in out.items()}
    table["events"] = events
    return table, e


@pytest.fixture
def identity(tmp_path):
    """recon = x: a model that reproduces any level, in range or not."""
    path, _ = make_model(tmp_path / "id.onnx", window=W, channels=CH, scale=1.0, bias=0.0,
                         threshold=0.05)
    return path


def test_a_reproduced_level_shift_is_caught_only_with_the_band(identity):
    off, e_off = run(identity, shifted())
    assert not off["alert"].any() and float(off["score"].max()) == 0.0
    # unseen by the score, the step was learned as normal
    assert e_off.streams["s"].adapter.shift()[0] > 7.5

    on, e_on = run(identity, shifted(), level_band=4.0)
    after = on["ts"] >= 1e9 + STEP_AT
    assert not on["alert"][~after].any()
    # open within open_k windows of the step, and held to the end: the alert freezes the
    # adaptation, so the new level is never learned while it is reported
    assert on["alert"][after][4:].all()
    assert abs(e_on.streams["s"].adapter.shift()[0]) < 0.1
    new = [ev for ev in on["events"] if ev["type"] == "new"]
    assert len(new) == 1 and new[0]["top_channels"][0]["name"] == "a"


def test_inside_the_band_nothing_is_added(identity):
    on, _ = run(identity, shifted(size=3.0), level_band=4.0)
    assert float(on["score"].max()) == 0.0 and not on["alert"].any()


def test_the_band_adds_the_squared_excess_and_off_is_the_models_score(tmp_path):
    path, _ = make_model(tmp_path / "tm.onnx", window=W, channels=CH, kind="timemix")
    v = shifted(600)
    # no adaptation: every window is scaled by the model's own scaler (mean 0, std 1)
    cfg = {"node": "t"}
    det = Detector(str(path))
    x = np.lib.stride_tricks.sliding_window_view(v, (W, len(CH)))[:, 0]
    scores, err = score_windows(x, det.infer(np.ascontiguousarray(x)))
    got = {}
    for band in (None, 4.0):
        e = Engine(build(DetectionConfig, {**cfg, "scoring": {"level_band": band}}), det)
        got[band] = np.concatenate([r.scores for r in e.step(
            [Batch("s", 1e9 + np.arange(len(v), dtype=np.float64), v)])])
    np.testing.assert_array_equal(got[None], scores)
    want = (err + level_excess(x[:, -1, :].astype(np.float64), 4.0)).mean(axis=1)
    np.testing.assert_allclose(got[4.0], want, rtol=1e-12)
    assert (got[4.0][STEP_AT - W + 1:] > scores[STEP_AT - W + 1:] + 16 / 3 - 1).all()


def test_level_excess_by_hand():
    out = level_excess(np.array([[0.0, 3.9, -5.0, 6.5]], np.float32), 4.0)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [[0.0, 0.0, 1.0, 6.25]])


def test_the_band_travels_in_a_models_policy_and_the_config_wins(identity):
    meta = load_meta(identity)
    meta.policy = {"settings": {"scoring": {"level_band": 4.5}}, "reason": "test"}
    meta.save(meta_path_for(identity))
    meta = load_meta(identity)
    assert meta.policy["settings"]["scoring"]["level_band"] == 4.5
    assert effective(DetectionConfig(), meta).scoring.level_band == 4.5
    mine = build(DetectionConfig, {"scoring": {"level_band": 6.0}})
    assert effective(mine, meta).scoring.level_band == 6.0
    assert DetectionConfig().scoring.level_band is None


@pytest.mark.parametrize("bad", [-1.0, 0, "wide"])
def test_a_bad_band_in_a_policy_is_refused_by_name(identity, bad):
    meta = load_meta(identity)
    meta.policy = {"settings": {"scoring": {"level_band": bad}}}
    meta.save(meta_path_for(identity))
    with pytest.raises(ModelMetaError, match=r"policy\.settings\.scoring\.level_band"):
        Engine(DetectionConfig(), Detector(str(identity)))

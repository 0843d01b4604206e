"""The training rows' sampling interval (metadata `training.interval_s`): recorded by
`tsad-export train`, and a stream sampled far off it is told so, at start (a configured
interval_s: agent/preflight.py) and when its interval is learned (agent/pace.py).
fit-policy refuses a learning period by duration, which its count by rows would not
follow."""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from agent.config import AgentConfig, DetectionConfig
from agent.config_build import build
from agent.detector import Detector
from agent.engine import Engine
from agent.metrics import Metrics
from agent.model_meta import ModelMeta, ModelMetaError, load_meta, meta_path_for
from agent.pace import RATE_FACTOR, rate_mismatch
from agent.policy_fit import fit_policy
from agent.preflight import check
from agent.sources.base import Batch
from conftest import MODELS
from onnx_factory import make_model

CH = ["a", "b"]


def _csv(path, n: int, step_s: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    ts = pd.Timestamp("2024-05-10T08:00:00Z") + pd.to_timedelta(t * step_s, unit="s")
    pd.DataFrame({"timestamp": ts.strftime("%Y-%m-%d %H:%M:%S"),
                  "a": np.sin(t / 5) + 0.05 * rng.standard_normal(n),
                  "b": 10 + np.cos(t / 7) + 0.05 * rng.standard_normal(n)}).to_csv(path, index=False)
    return path


def test_train_records_the_median_interval_of_its_rows(tmp_path):
    pytest.importorskip("torch")
    from export.cli import main
    a = _csv(tmp_path / "a.csv", 120, 5.0)
    b = _csv(tmp_path / "b.csv", 120, 5.0, seed=1)
    # a sensor that skipped a few samples does not move the median
    df = pd.read_csv(b).drop(index=[30, 31, 60])
    df.to_csv(b, index=False)
    out = tmp_path / "m.onnx"
    assert main(["train", "--model", "DLinear_ad", "--data", str(a), str(b), "--window", "8",
                 "--epochs", "1", "--hparam", "moving_avg=3", "--out", str(out)]) == 0
    assert json.loads(meta_path_for(out).read_text())["training"]["interval_s"] == 5.0
    assert load_meta(out).interval_s == 5.0


@pytest.mark.parametrize("value", [0, -5.0, "5", True, float("nan")])
def test_a_training_interval_that_is_no_positive_number_is_refused(tmp_path, value):
    _, meta = make_model(tmp_path / "m.onnx", channels=CH)
    d = meta.to_dict()
    d["training"]["interval_s"] = value
    with pytest.raises(ModelMetaError, match="training.interval_s"):
        ModelMeta.from_dict(d)


def test_metadata_without_an_interval_stays_valid(tmp_path):
    path, _ = make_model(tmp_path / "m.onnx", channels=CH)
    meta = load_meta(path)
    assert "interval_s" not in meta.training and meta.interval_s is None
    assert rate_mismatch(30.0, None) is None


def test_the_rate_rule_allows_jitter_within_its_factor():
    assert rate_mismatch(5.0 * RATE_FACTOR, 5.0) is None
    assert rate_mismatch(5.0 / RATE_FACTOR, 5.0) is None
    assert "0.2x" in rate_mismatch(1.0, 5.0) and "resample the stream to 5 s" in rate_mismatch(1.0, 5.0)
    assert "6x" in rate_mismatch(30.0, 5.0)


@pytest.fixture
def model_5s(tmp_path):
    """A model trained on rows 5 s apart, whose policy learns on 360 samples (30 min)."""
    path, meta = make_model(tmp_path / "m5.onnx", window=8, channels=CH, kind="timemix")
    meta.training["interval_s"] = 5.0
    meta.policy = {"settings": {"calibration": {"enabled": True, "samples": 360}}}
    meta.save(meta_path_for(path))
    return path


def _cfg(path, interval_s=None) -> AgentConfig:
    return build(AgentConfig, {
        "node": "t", "state_dir": None, "model": {"path": str(path)}, "mqtt": {"enabled": False},
        "streams": [{"id": "s", "interval_s": interval_s,
                     "source": {"type": "serial", "port": "/dev/null"}}]})


def test_check_config_tells_the_learning_period_at_the_model_rate(model_5s):
    f = check(_cfg(model_5s), load_meta(model_5s))
    assert f.warnings == []
    assert len(f.notes) == 1
    assert ("first 360 samples (30 min at the model's training interval of 5 s)"
            in f.notes[0]), f.notes


def test_check_config_warns_about_a_configured_interval_off_the_training_one(model_5s):
    f = check(_cfg(model_5s, interval_s=1.0), load_meta(model_5s))
    rate = [w for w in f.warnings if "trained on rows" in w]
    assert rate == ["streams[0] (s): interval_s: " + rate_mismatch(1.0, 5.0)]
    assert "a sample every 1 s, but the model was trained on rows 5 s apart" in rate[0]
    # the learning period at that interval is short as well, and said so
    assert any("learns on its first 360 samples, under 30 min" in w for w in f.warnings)
    assert check(_cfg(model_5s, interval_s=6.0), load_meta(model_5s)).warnings == []


def _engine(path) -> Engine:
    m = Metrics()
    return Engine(build(DetectionConfig, {"node": "t"}), Detector(str(path), metrics=m),
                  metrics=m)


@pytest.mark.parametrize("step_s, warned", [(1.0, True), (30.0, True), (5.0, False),
                                            (7.0, False)])
def test_a_stream_learned_off_the_training_rate_is_warned_once(model_5s, caplog, step_s, warned):
    e = _engine(model_5s)
    rng = np.random.default_rng(0)
    caplog.set_level(logging.WARNING, logger="tsad.stream")
    for k in range(10):          # one sample a message, as a daemon receives them, then blocks
        n = 1 if k < 5 else 64
        ts = 1e9 + step_s * (np.arange(n) + (k if k < 5 else 5 + 64 * (k - 5)))
        e.step([Batch("s", ts, rng.normal(0, 1, (n, 2)).astype(np.float32)),
                Batch("other", ts, rng.normal(0, 1, (n, 2)).astype(np.float32))])
    assert e.streams["s"].pace.interval == pytest.approx(step_s)
    lines = [r.getMessage() for r in caplog.records if "trained on rows" in r.getMessage()]
    if warned:
        assert sorted(lines) == sorted(f"stream {sid}: {rate_mismatch(step_s, 5.0)}"
                                       for sid in ("s", "other"))
    else:
        assert lines == []


def test_fit_policy_refuses_a_learning_period_by_duration(model_5s, tmp_path):
    data = _csv(tmp_path / "normal.csv", 200, 5.0)
    with pytest.raises(ValueError, match=r"--set calibration.duration_s: the fit learns on "
                       r"each recording's first --learn rows .*--learn 360"):
        fit_policy(str(model_5s), [data], {"calibration": {"duration_s": 300}}, 60, "t")


def test_shipped_models_record_the_interval_their_training_rows_have(skab_dir):
    """SKAB's rows are 1 s apart (measured here from the recorded files and rows); the
    TEP recipe samples every SAMPLING_MIN minutes (its data is generated, not stored)."""
    from agent.shipped import shipped_models
    from export import data as D
    from export.recipes.tep_data import SAMPLING_MIN
    for name in shipped_models():
        meta = load_meta(MODELS / f"{name}.onnx")
        if name.startswith("tep/"):
            assert meta.interval_s == SAMPLING_MIN * 60, name
            continue
        root = skab_dir.parent / meta.training["data_root"]
        files, _ = D.load_files([f"{root / f['path']}:{f['rows']}" for f in meta.training["files"]],
                                meta.channels, None)
        assert meta.interval_s == D.interval_s(files) == 1.0, name

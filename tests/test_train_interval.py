"""The training rows' sampling interval (metadata `training.interval_s`), recorded by
`tsad-export train`."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from agent.model_meta import ModelMeta, ModelMetaError, load_meta, meta_path_for
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

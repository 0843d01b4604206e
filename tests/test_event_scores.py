"""benchmarks/event_scores.py: per labeled event, through the real engine and a shipped model."""
import numpy as np
import pandas as pd

from agent.detector import Detector
from agent.shipped import resolve_model

import benchmark_module


def test_runs_are_the_labeled_stretches():
    es = benchmark_module.load("event_scores")
    assert es.runs(np.array([0, 1, 1, 0, 0, 1, 0, 1], np.int8)) == [(1, 3), (5, 6), (7, 8)]
    assert es.runs(np.zeros(4, np.int8)) == []


def test_a_visible_fault_and_a_label_with_nothing_behind_it(tmp_path):
    es = benchmark_module.load("event_scores")
    det = Detector(resolve_model("DLinear_ad"))
    rng = np.random.default_rng(3)
    n, c = 1400, len(det.meta.channels)
    values = rng.normal(size=(n, c)) * np.array(det.meta.scaler.std) + np.array(det.meta.scaler.mean)
    labels = np.zeros(n, np.int8)
    labels[700:900] = 1     # the sensors move 30 s after the label starts
    flow = det.meta.channels.index("Volume Flow RateRMS")
    values[730:900, flow] -= 20 * det.meta.scaler.std[flow]
    labels[1100:1200] = 1   # labeled, but nothing changes
    df = pd.DataFrame(values, columns=det.meta.channels)
    df.insert(0, "datetime", pd.date_range("2024-01-01", periods=n, freq="s").strftime("%Y-%m-%d %H:%M:%S"))
    df["anomaly"] = labels
    f = tmp_path / "f.csv"
    df.to_csv(f, sep=";", index=False)

    fault, quiet = es.event_rows(f, det)
    assert (fault["rows"], quiet["rows"]) == (200, 100)
    assert fault["moved"] == 30.0
    assert fault["delay"] is not None and fault["delay"] >= 30
    assert fault["max"] > 1 > fault["pre_max"]
    assert quiet["moved"] is None and quiet["delay"] is None and quiet["open"] == 0
    assert quiet["max"] < 1

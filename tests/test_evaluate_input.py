"""`evaluate` on files that cannot give a score: undefined figures say n/a (not 0), a
file with no scored row is named, and columns that cannot be read are errors naming
them, through the real `tsad-agent evaluate` on a real ONNX model."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from agent.evaluate import Counts
from agent.jobs import rows_prediction
from conftest import REPO
from onnx_factory import make_model

CH = ["a", "b", "c"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_model(tmp_path_factory.mktemp("m") / "m.onnx", window=8, channels=CH)
    return str(path)


def table(path, n: int, labels=None, **cols):
    rng = np.random.default_rng(0)
    d = {"timestamp": 1.6e9 + np.arange(n), **{c: rng.normal(size=n) for c in CH}, **cols}
    if labels is not None:
        d["anomaly"] = labels
    pd.DataFrame(d).to_csv(path, index=False)
    return path


def evaluate(model, *args):
    r = subprocess.run([sys.executable, "-m", "agent.cli", "evaluate", "-m", model,
                        "--calibration", "20", *map(str, args)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def test_undefined_figures_are_none_not_zero():
    c = Counts()
    c.add(np.zeros(5, int), np.zeros(5, int))      # normal rows only, nothing flagged
    s = c.summary()
    assert s["far"] == 0.0 and s["precision"] is None and s["recall"] is None
    assert s["f1"] is None and s["mar"] is None


def test_a_file_with_no_scored_row_is_named_and_its_figures_are_n_a(model, tmp_path):
    short = table(tmp_path / "short.csv", 15, labels=[0] * 15)
    r = evaluate(model, short)
    assert r.returncode == 0, r.stderr
    assert "P=n/a R=n/a F1=n/a FAR=n/a MAR=n/a  (TP=0 FP=0 TN=0 FN=0)" in r.stdout
    assert f"{short}: no row scored (no more rows than its learning period, 20)" in r.stdout
    unlabeled = table(tmp_path / "unlabeled.csv", 15)
    r = evaluate(model, unlabeled)
    assert r.returncode == 0, r.stderr
    assert f"{unlabeled}: no row scored (no more rows than its learning period, 20)" in r.stdout
    assert "0.0 h" not in r.stdout


@pytest.mark.parametrize("cols, labels, error", [
    ({"b": ["x"] * 60}, None, "column(s) ['b'] hold no number (a decimal comma? text?)"),
    ({}, [0] * 30 + ["yes"] + [0] * 29, "column 'anomaly': row 31 holds 'yes', not 0 or 1"),
    ({}, [0] * 30 + [None] + [0] * 29, "column 'anomaly': row 31 is empty, not 0 or 1"),
    ({}, [0] * 30 + [2] + [0] * 29, "column 'anomaly': row 31 holds 2"),
])
def test_columns_that_cannot_be_read_are_errors_naming_them(model, tmp_path, cols, labels, error):
    bad = table(tmp_path / "bad.csv", 60, labels=labels, **cols)
    r = evaluate(model, bad)
    assert r.returncode == 2 and error in r.stderr, r.stderr


def test_a_file_job_whose_engine_failed_ends_with_an_error(model, monkeypatch):
    """A daemon's engine logs a failing stream and goes on; a file job's figures would
    then describe part of the file, so `run_table` raises (the CLIs exit 2)."""
    from agent.config import DetectionConfig
    from agent.config_build import build
    from agent.detector import Detector
    from agent.engine import Engine
    from agent.jobs import run_table
    from agent.stream import Stream
    e = Engine(build(DetectionConfig, {"node": "t"}), Detector(model))

    def broken(self, *a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Stream, "conclude", broken)
    ts, v = 1.6e9 + np.arange(100.0), np.zeros((100, 3), np.float32)
    with pytest.raises(ValueError, match=r"stream s: the engine failed \d+ time\(s\) on it"):
        run_table(e, "s", ts, v)


@pytest.mark.parametrize("row_ts", [
    1.6e9 + np.arange(40) // 2,                  # 2 Hz logged to the second: each time twice
    1.6e9 + np.arange(40) - 0.5 * (np.arange(40) % 5 == 4),     # a clock's jitter back
    np.full(40, 1.6e9),                          # one time for every row
], ids=["repeated", "jitter", "frozen"])
def test_rows_get_their_own_windows_where_times_repeat_or_jitter(row_ts):
    # windows from row 9 on (a warm-up before), every third one alerting
    alert = (np.arange(31) % 3 == 0).astype(np.int8)
    table = {"ts": row_ts[9:], "alert": alert}
    want = np.concatenate([np.zeros(9, np.int8), alert])
    assert rows_prediction(row_ts, table, "alert").tolist() == want.tolist()


def test_a_folder_with_a_subfolder_evaluates_its_own_files_too(model, tmp_path):
    (tmp_path / "old").mkdir()
    own = table(tmp_path / "a.csv", 60)
    below = table(tmp_path / "old" / "c.csv", 60)
    r = evaluate(model, tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"{own}: " in r.stdout and f"{below}: " in r.stdout, r.stdout


def test_a_label_column_is_found_whatever_its_case(model, tmp_path):
    """`Anomaly` labels a file for training (export/data.py): evaluate scores it too."""
    f = table(tmp_path / "cap.csv", 60, labels=[0] * 40 + [1] * 20)
    pd.read_csv(f).rename(columns={"anomaly": "Anomaly"}).to_csv(f, index=False)
    r = evaluate(model, f)
    assert r.returncode == 0, r.stderr
    assert "files=1" in r.stdout and "P=" in r.stdout, r.stdout


def test_two_inputs_that_would_share_an_out_file_are_refused_before_any_work(model, tmp_path):
    (tmp_path / "x1" / "v").mkdir(parents=True)
    (tmp_path / "x2" / "v").mkdir(parents=True)
    a = table(tmp_path / "x1" / "v" / "1.csv", 60)
    b = table(tmp_path / "x2" / "v" / "1.csv", 60)
    r = evaluate(model, a, b, "--out", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    assert f"error: --out: {a} and {b} would both write v_1.csv" in r.stderr
    assert not (tmp_path / "out").exists()

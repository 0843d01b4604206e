"""`tsad-agent predict`: PaddleX-style outputs, both modes checked against hand-computed scores,
agreement with `evaluate --by label`, and one-line errors for bad input."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from agent.cli import DEMO_CSV, main
from agent.detector import Detector
from agent.evaluate import predict_file
from agent.jobs import detection_config, rows_prediction
from agent.prediction import LEGEND_CHANNELS, PredictError, figure, predict
from agent.contract import StreamScaler
from conftest import MODELS
from onnx_factory import make_model

W = 8
CHANNELS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = make_model(tmp_path_factory.mktemp("m") / "tiny.onnx", window=W, channels=CHANNELS,
                         kind="timemix", threshold=0.5)
    return Detector(str(path))


@pytest.fixture(scope="module")
def dlinear():
    p = MODELS / "DLinear_ad.onnx"
    if not p.exists():
        pytest.skip(f"shipped model {p} not built")
    return Detector(str(p))


def write_csv(path: Path, n: int, step: float = 60.0, sep: str = ",", seed: int = 0,
              spike_at: int | None = None, times: list[str] | None = None) -> Path:
    """A PaddleX-style file: `timestamp` strings, then the channels."""
    rng = np.random.default_rng(seed)
    v = rng.normal(0, 0.3, (n, len(CHANNELS)))
    if spike_at is not None:
        v[spike_at] += 25.0
    t0 = np.datetime64("2024-05-01T00:00:00")
    times = times or [str(t0 + np.timedelta64(int(i * step), "s")).replace("T", " ") for i in range(n)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=sep)
        w.writerow(["timestamp", *CHANNELS])
        w.writerows([t, *map(float, row)] for t, row in zip(times, v))
    return path


def read_result(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def by_hand_last_step(det: Detector, values: np.ndarray) -> np.ndarray:
    """score_t = mean_c (recon - x)^2 at the newest step of the window ending at t."""
    x = StreamScaler.from_meta(det.meta).apply(values)
    win = np.stack([x[t - W + 1:t + 1] for t in range(W - 1, len(x))])
    recon = det.infer(win)
    d = recon[:, -1].astype(np.float64) - win[:, -1].astype(np.float64)
    return np.concatenate([np.full(W - 1, np.nan), (d * d).mean(axis=1)])


# ---------------------------------------------------------------- sliding mode
def test_sliding_outputs_match_scores_computed_by_hand(tiny, tmp_path):
    src = write_csv(tmp_path / "plant.csv", 60, spike_at=40)
    out = tmp_path / "out"
    assert main(["predict", "--input", str(src), "--model", str(tiny.path), "--save_path", str(out),
                 "--calibrate", "0"]) == 0
    rows = read_result(out / "plant_res.csv")
    original = read_result(src)
    assert rows[0] == ["timestamp", "label"]
    assert [r[0] for r in rows[1:]] == [r[0] for r in original[1:]]   # the input's own format
    doc = json.loads((out / "plant_res.json").read_text())
    assert doc["mode"] == "sliding" and doc["threshold"] == 0.5 and doc["window"] == W
    values = np.array([[float(x) for x in r[1:]] for r in original[1:]])
    want = by_hand_last_step(tiny, values)
    got = np.array([np.nan if a["score"] is None else a["score"] for a in doc["anomaly"]])
    assert np.isnan(got[:W - 1]).all()
    np.testing.assert_allclose(got[W - 1:], want[W - 1:], rtol=1e-9)
    labels = np.array([int(r[1]) for r in rows[1:]])
    np.testing.assert_array_equal(labels, np.nan_to_num(want) >= 0.5)
    assert labels[40] == 1 and labels[:W - 1].sum() == 0


def test_sliding_labels_equal_evaluate_by_label(dlinear, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", "--input", str(DEMO_CSV), "--model", str(dlinear.path),
                 "--save_path", str(out), "--calibrate", "400"]) == 0
    labels = np.array([int(r[1]) for r in read_result(out / f"{DEMO_CSV.stem}_res.csv")[1:]])
    table, row_ts, _, _ = predict_file(DEMO_CSV, dlinear, detection_config(dlinear.meta, 400))
    want = rows_prediction(row_ts, table, "label")
    np.testing.assert_array_equal(labels, want)
    assert labels[:400].sum() == 0 and 0 < labels.sum() < len(labels)


def test_default_calibration_comes_from_model_metadata(dlinear, tmp_path):
    pred = predict(DEMO_CSV, dlinear)
    assert pred.calibration_rows == dlinear.meta.training["calibration_rows"] == 400
    assert np.isnan(pred.score[:400]).all() and np.isfinite(pred.score[400:]).all()


# ---------------------------------------------------------------- PaddleX-compatible mode
def test_paddlex_compat_scores_only_the_last_window(tiny, tmp_path):
    src = write_csv(tmp_path / "p.csv", 30, spike_at=27)
    out = tmp_path / "out"
    assert main(["predict", "--input", str(src), "--model", str(tiny.path), "--save_path", str(out),
                 "--calibrate", "0", "--paddlex-compat"]) == 0
    rows = read_result(out / "p_res.csv")
    original = read_result(src)
    assert [r[0] for r in rows[1:]] == [r[0] for r in original[-W:]]
    values = np.array([[float(x) for x in r[1:]] for r in original[-W:]])
    x = StreamScaler.from_meta(tiny.meta).apply(values)
    recon = tiny.infer(x[None])[0]
    want = ((recon.astype(np.float64) - x.astype(np.float64)) ** 2).mean(axis=1)
    doc = json.loads((out / "p_res.json").read_text())
    np.testing.assert_allclose([a["score"] for a in doc["anomaly"]], want, rtol=1e-9)
    assert [int(r[1]) for r in rows[1:]] == (want >= 0.5).astype(int).tolist()
    assert int(rows[1 + 27 - (30 - W)][1]) == 1


# ---------------------------------------------------------------- inputs
def test_semicolon_file_without_time_column_uses_row_numbers(tiny, tmp_path):
    src = tmp_path / "plain.csv"
    rng = np.random.default_rng(1)
    src.write_text("a;b;c\n" + "".join(f"{x:.4f};{y:.4f};{z:.4f}\n" for x, y, z in rng.normal(size=(12, 3))))
    pred = predict(src, tiny, calibrate=0)
    assert pred.result_csv().splitlines()[1:3] == ["0,0", "1,0"]


def test_folder_input_keeps_going_past_a_bad_file(tiny, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    write_csv(d / "good.csv", 20)
    (d / "bad.csv").write_text("timestamp,a,b\n2024-01-01 00:00:00,1,2\n")
    out = tmp_path / "out"
    assert main(["predict", "--input", str(d), "--model", str(tiny.path), "--save_path", str(out),
                 "--calibrate", "0"]) == 1
    assert (out / "good_res.csv").exists() and not (out / "bad_res.csv").exists()
    assert "missing column(s) ['c']" in capsys.readouterr().err


def _error(args, capsys) -> str:
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


@pytest.mark.parametrize("case, expect", [
    ("missing", "missing column(s) ['b', 'c']"),
    ("gap", "irregular timestamps: 600 s between data rows 10 and 11"),
    ("backwards", "timestamps do not increase at data rows 5-6"),
    ("short", "5 data row(s), needs at least 8 (window 8)"),
    ("binary", "cannot read"),
    ("empty", "cannot read"),
    ("badtime", "no readable timestamp"),
])
def test_bad_input_is_one_clear_line(tiny, tmp_path, capsys, case, expect):
    f = tmp_path / f"{case}.csv"
    if case == "missing":
        f.write_text("timestamp,a\n2024-01-01 00:00:00,1\n")
    elif case == "gap":
        times = [f"2024-01-01 00:{m:02d}:00" for m in range(10)] + \
                [f"2024-01-01 00:{m:02d}:00" for m in range(19, 30)]
        write_csv(f, len(times), times=times)
    elif case == "backwards":
        times = [f"2024-01-01 00:{m:02d}:00" for m in (0, 1, 2, 3, 4, 4, 5, 6, 7, 8)]
        write_csv(f, len(times), times=times)
    elif case == "short":
        write_csv(f, 5)
    elif case == "binary":
        f.write_bytes(bytes(range(256)) * 8)
    elif case == "empty":
        f.write_bytes(b"")
    elif case == "badtime":
        write_csv(f, 12, times=["2024-01-01 00:00:00"] * 11 + ["not a time"])
    msg = _error(["predict", "--input", str(f), "--model", str(tiny.path),
                  "--save_path", str(tmp_path / "o"), "--calibrate", "0"], capsys)
    assert expect in msg, msg


def test_gap_check_tolerance_is_settable(tiny, tmp_path):
    times = [f"2024-01-01 00:{m:02d}:00" for m in range(10)] + \
            [f"2024-01-01 00:{m:02d}:00" for m in range(12, 30)]   # one 3-minute step
    f = write_csv(tmp_path / "g.csv", len(times), times=times)
    with pytest.raises(PredictError, match="over 2.5x the median"):
        predict(f, tiny, calibrate=0)
    assert len(predict(f, tiny, calibrate=0, max_gap=0).label) == len(times)
    assert len(predict(f, tiny, calibrate=0, max_gap=4).label) == len(times)


def test_empty_folder_and_missing_path(tiny, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no *.csv files" in _error(["predict", "--input", str(tmp_path / "empty"),
                                       "--model", str(tiny.path)], capsys)
    assert "no such file" in _error(["predict", "--input", str(tmp_path / "nope.csv"),
                                     "--model", str(tiny.path)], capsys)


def test_calibration_longer_than_file_is_an_error(tiny, tmp_path):
    f = write_csv(tmp_path / "c.csv", 50)
    with pytest.raises(PredictError, match="needs at least 101 .*100 calibration rows"):
        predict(f, tiny, calibrate=100)


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_names_each_channel_and_shades_the_learning_period(tiny, tmp_path):
    pytest.importorskip("matplotlib", reason="plotting needs the optional [plot] extra")
    src = write_csv(tmp_path / "v.csv", 40, spike_at=30)
    out = tmp_path / "out"
    assert main(["predict", "--input", str(src), "--model", str(tiny.path), "--save_path", str(out),
                 "--calibrate", "20", "--plot"]) == 0
    png = (out / "v_res.png").read_bytes()
    assert png[:8] == PNG and len(png) > 5000
    fig = figure(pred := predict(src, tiny, calibrate=20))
    channels, score = fig.axes
    assert _legend(channels) == CHANNELS
    assert _legend(score) == ["score", f"threshold {pred.threshold:.4g}",
                              "learning period (20 rows)", "predicted anomaly"]
    # the grey band ends at the last learning row
    band = score.collections[0].get_paths()[0].vertices[:, 0]
    assert band.max() == pytest.approx((pred.table.ts[19] + pred.table.ts[20]) / 2 / 86400)


def test_plot_draws_the_files_labels_apart_from_the_predicted_ones(tiny, tmp_path):
    pytest.importorskip("matplotlib", reason="plotting needs the optional [plot] extra")
    import pandas as pd
    src = write_csv(tmp_path / "l.csv", 40, spike_at=30)
    df = pd.read_csv(src)
    df["anomaly"] = ((df.index >= 28) & (df.index <= 33)).astype(int)
    df.to_csv(src, index=False)
    out = tmp_path / "out"
    assert main(["predict", "--input", str(src), "--model", str(tiny.path), "--save_path", str(out),
                 "--calibrate", "0", "--plot"]) == 0
    assert (out / "l_res.png").read_bytes()[:8] == PNG
    fig = figure(predict(src, tiny, calibrate=0))
    channels, score, lanes = fig.axes
    assert _legend(channels) == CHANNELS
    assert "learning period" not in " ".join(_legend(score))
    assert _legend(lanes) == ["labeled (anomaly column)", "predicted"]
    assert [t.get_text() for t in lanes.get_yticklabels()] == ["labeled", "predicted"]
    assert fig.axes[0].get_title().endswith("6 labeled")


def test_plot_of_many_channels_names_each_heatmap_row(tmp_path):
    pytest.importorskip("matplotlib", reason="plotting needs the optional [plot] extra")
    names = [f"sensor_{i}" for i in range(LEGEND_CHANNELS + 3)]
    path, _ = make_model(tmp_path / "wide.onnx", window=W, channels=names, kind="timemix")
    f = tmp_path / "w.csv"
    rng = np.random.default_rng(0)
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", *names])
        w.writerows([i, *rng.normal(size=len(names))] for i in range(1_700_000_000, 1_700_000_040))
    fig = figure(predict(f, Detector(str(path)), calibrate=0))
    heat = fig.axes[0]
    assert len(heat.images) == 1 and heat.get_legend() is None
    assert [t.get_text() for t in heat.get_yticklabels()] == names
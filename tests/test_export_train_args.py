"""tsad-export train: option values and data that cannot train a model are refused (exit 2)
before any training, in one line naming the flag, column or file."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")
from export.cli import main  # noqa: E402
from export.onnx_export import opset_range  # noqa: E402
from test_export_cli import make_csv, no_model_files  # noqa: E402


def run(tmp_path, *extra: str, data=None) -> tuple[int, str]:
    data = data or [str(make_csv(tmp_path / "d.csv"))]
    out = tmp_path / "out" / "m.onnx"
    rc = main(["train", "--model", "DLinear_ad", "--data", *data, "--window", "8",
               "--epochs", "1", "--hparam", "moving_avg=3", *extra, "--out", str(out)])
    assert no_model_files(out.parent)
    return rc, out


@pytest.mark.parametrize("flag, value, expect", [
    ("--batch-size", "-4", "--batch-size -4: expected an integer >= 1"),
    ("--batch-size", "0", "--batch-size 0: expected an integer >= 1"),
    ("--lr", "0", "--lr 0.0: expected a finite number > 0"),
    ("--lr", "-0.1", "--lr -0.1: expected a finite number > 0"),
    ("--lr", "nan", "--lr nan: expected a finite number > 0"),
    ("--lr", "inf", "--lr inf: expected a finite number > 0"),
    ("--threads", "0", "--threads 0: expected an integer >= 1"),
    ("--epochs", "0", "--epochs 0: expected an integer >= 1"),
    ("--epochs", "-1", "--epochs -1: expected an integer >= 1"),
    ("--patience", "-1", "--patience -1: expected an integer >= 0"),
    ("--noise", "-1", "--noise -1.0: expected a finite number >= 0"),
    ("--level-noise", "nan", "--level-noise nan: expected a finite number >= 0"),
    ("--block-std-floor", "-0.1", "--block-std-floor -0.1: expected a finite number >= 0"),
    ("--rows-per-file", "0", "--rows-per-file 0: expected an integer >= 1"),
    ("--scale-rows", "-5", "--scale-rows -5: expected 0 (off) or an integer >= 10"),
    ("--scale-rows", "1", "--scale-rows 1: expected 0 (off) or an integer >= 10"),
    ("--margin", "nan", "--quantile must be in (0, 1] and --margin > 0"),
    ("--columns", "a,b,a", "--columns: 'a' given more than once"),
])
def test_bad_option_value_is_a_usage_error(tmp_path, capsys, monkeypatch, flag, value, expect):
    import export.fit as F

    def never(*a, **k):
        raise AssertionError("training must not start")
    monkeypatch.setattr(F, "fit", never)
    rc, _ = run(tmp_path, flag, value)
    err = capsys.readouterr().err
    assert rc == 2
    assert f"tsad-export: error: {expect}" in err
    assert len(err.strip().splitlines()) == 1


def test_opset_outside_the_exporters_range_is_a_usage_error(tmp_path, capsys):
    lo, hi = opset_range()
    assert 9 <= lo <= 17 <= hi
    for opset in (lo - 1, hi + 1):
        rc, _ = run(tmp_path, "--opset", str(opset))
        err = capsys.readouterr().err
        assert rc == 2
        assert f"--opset {opset}: expected {lo} to {hi}" in err
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("hparam, expect", [
    ("foo=1", "--hparam foo: DLinear_ad has no such hyperparameter; it accepts moving_avg"),
    ("window=8", None),     # set by --window: ignored, as a checkpoint's copy is
    ("moving_avg=0", "--hparam moving_avg=0: moving_avg must be an odd integer >= 1, got 0 "
                     "(DLinear_ad accepts moving_avg)"),
])
def test_bad_hparam_is_a_usage_error(tmp_path, capsys, monkeypatch, hparam, expect):
    import export.fit as F

    def never(*a, **k):
        raise AssertionError("training must not start")
    monkeypatch.setattr(F, "fit", never)
    if expect is None:
        with pytest.raises(AssertionError, match="training must not start"):
            run(tmp_path, "--hparam", hparam)
        return
    rc, _ = run(tmp_path, "--hparam", hparam)
    err = capsys.readouterr().err
    assert rc == 2
    assert f"tsad-export: error: {expect}" in err
    assert len(err.strip().splitlines()) == 1


def test_bad_hparam_value_from_torch_names_the_accepted_keys(tmp_path, capsys):
    rc = main(["train", "--model", "PatchTST_ad", "--data", str(make_csv(tmp_path / "d.csv")),
               "--window", "8", "--hparam", "d_model=-1", "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--hparam d_model=-1:" in err and "(PatchTST_ad accepts patch_len," in err


def _edit_csv(tmp_path, case: str):
    f = make_csv(tmp_path / "d.csv")
    if case == "duplicate_header":
        lines = f.read_text().splitlines()
        lines[0] = lines[0].replace(",b,", ",a,")
        f.write_text("\n".join(lines) + "\n")
        return f
    df = pd.read_csv(f)
    if case == "huge_value":
        df["b"] = df["b"].astype(object)
        df.loc[40, "b"] = "1e308"
    elif case == "labelled_rows":
        df.loc[50:54, "anomaly"] = 1
    df.to_csv(f, index=False)
    return f


@pytest.mark.parametrize("case, expect", [
    ("duplicate_header", "column 'a' appears 2 times in the header"),
    ("huge_value", "column 'b' has value 1e+308 at data row 40 (line 42), beyond the float32"),
    ("labelled_rows", "5 row(s) labelled anomalous (column 'anomaly', first at data row 50, "
                      "line 52)"),
])
def test_training_data_that_is_not_normal_sensor_data_is_refused(tmp_path, capsys, monkeypatch,
                                                                  case, expect):
    import export.fit as F

    def never(*a, **k):
        raise AssertionError("training must not start")
    monkeypatch.setattr(F, "fit", never)
    f = _edit_csv(tmp_path, case)
    rc, _ = run(tmp_path, data=[str(f)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"tsad-export: error: {f}: {expect}" in err
    assert len(err.strip().splitlines()) == 1


def test_duplicate_header_outside_the_chosen_columns_is_no_obstacle(tmp_path, capsys,
                                                                    monkeypatch):
    import export.fit as F

    def stop(*a, **k):
        raise AssertionError("reached training")
    monkeypatch.setattr(F, "fit", stop)
    f = _edit_csv(tmp_path, "duplicate_header")
    with pytest.raises(AssertionError, match="reached training"):
        run(tmp_path, "--columns", "c", data=[str(f)])
    assert "appears 2 times" not in capsys.readouterr().err


def test_a_constant_channel_trains_with_a_warning(tmp_path, capsys):
    f = make_csv(tmp_path / "d.csv")
    df = pd.read_csv(f)
    df["c"] = 100.0
    df.to_csv(f, index=False)
    out = tmp_path / "out" / "m.onnx"
    rc = main(["train", "--model", "DLinear_ad", "--data", str(f), "--window", "8", "--epochs",
               "1", "--hparam", "moving_avg=3", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0 and out.exists()
    assert "tsad-export: warning: channel(s) 'c' never change in the training data" in err


def test_a_blown_up_run_is_reported_as_diverged_not_as_an_export_fault(tmp_path, capsys):
    rc, _ = run(tmp_path, "--lr", "1e6", "--noise", "1")
    err = capsys.readouterr().err
    assert rc == 1
    assert "tsad-export: error: DLinear_ad: training diverged:" in err
    assert "disagree" not in err


def test_divergence_rule_leaves_an_untrained_model_alone():
    from export.train import TrainError, check_not_diverged
    rng = np.random.default_rng(0)
    val = rng.standard_normal((50, 8, 3)).astype(np.float32)
    mean_model = np.repeat(val.mean(axis=1, keepdims=True), 8, axis=1)
    check_not_diverged("m", val, mean_model, float(np.mean((mean_model - val) ** 2)))
    with pytest.raises(TrainError, match="training diverged"):
        check_not_diverged("m", val, mean_model * 1e4, 1.0)
    with pytest.raises(TrainError, match="training diverged"):
        check_not_diverged("m", val, mean_model, 1e4)
    with pytest.raises(TrainError, match="validation error is nan: training diverged"):
        check_not_diverged("m", val, mean_model, float("nan"))


def test_labelled_rows_are_refused_only_for_training(tmp_path):
    from export.data import DataError, load_files
    f = _edit_csv(tmp_path, "labelled_rows")
    files, channels = load_files([str(f)], None, None)      # quantize, parity: real data
    assert channels == ["a", "b", "c"] and files[0].rows == 120
    with pytest.raises(DataError, match="labelled anomalous"):
        load_files([str(f)], None, None, normal_only=True)


@pytest.mark.parametrize("flag, value, expect", [
    ("--opset", "99", "--opset 99: expected"),
    ("--threads", "0", "--threads 0: expected an integer >= 1"),
])
def test_convert_refuses_bad_option_values_first(tmp_path, capsys, flag, value, expect):
    rc = main(["convert", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.onnx"),
               flag, value])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"tsad-export: error: {expect}" in err

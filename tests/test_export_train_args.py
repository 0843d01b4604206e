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
    ("--scale-rows", "-5", "--scale-rows -5: expected 0 (off) or an integer >= 2"),
    ("--scale-rows", "1", "--scale-rows 1: expected 0 (off) or an integer >= 2"),
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

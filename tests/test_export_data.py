"""tsad-export train: which columns of a file become channels, and the messages for data
that cannot train (a decimal comma, a label or time column, no rows, no training windows)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")
from agent.model_meta import load_meta  # noqa: E402
from test_export_cli import make_csv, no_model_files, train  # noqa: E402


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if "tsad-export: error:" in ln]
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1, err
    return lines[0]


def test_decimal_comma_columns_are_refused_not_dropped(tmp_path, capsys):
    f = make_csv(tmp_path / "d.csv")
    df = pd.read_csv(f)
    df["c"] = df["c"].round(0).astype(int)       # logged as integers: still a number
    df.to_csv(f, sep=";", index=False, decimal=",")
    rc, out = train(tmp_path, data=[str(f)])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and no_model_files(out.parent)
    assert f"{f}: column(s) 'a', 'b' hold no number (a decimal comma? convert the file to '.' " \
           "decimals, or leave them out with --columns)" in line


def test_a_channel_name_with_a_control_character_is_refused(tmp_path, capsys):
    """A newline in a column name passed training and split the agent's log and console
    lines in two (the wide-stream audit); a tab likewise."""
    f = make_csv(tmp_path / "d.csv")
    df = pd.read_csv(f).rename(columns={"b": "flow\nrate"})
    df.to_csv(f, index=False)
    rc, out = train(tmp_path, data=[str(f)])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and no_model_files(out.parent)
    assert "channel names are printable text" in line and "'flow\\nrate'" in line, line


def test_a_model_whose_channel_names_hold_a_control_character_does_not_load(tmp_path):
    import json
    from agent.model_meta import ModelMetaError
    from onnx_factory import make_model
    path, _ = make_model(tmp_path / "m.onnx", channels=["a", "b\tc", "d"])
    with pytest.raises(ModelMetaError, match="printable text"):
        load_meta(path)
    # a no-break space inside a name (a spreadsheet's header) is text, not a control
    ok, _ = make_model(tmp_path / "ok.onnx", channels=["a", "Temp\u00a0C", "d"])
    assert load_meta(ok).channels[1] == "Temp\u00a0C"
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert meta["channels"][1] == "b\tc"


def test_decimal_comma_columns_left_out_with_columns_train(tmp_path):
    f = make_csv(tmp_path / "d.csv")
    df = pd.read_csv(f)
    df["c"] = df["c"].round(0).astype(int)
    df["d"] = np.arange(len(df)) % 7
    df.to_csv(f, sep=";", index=False, decimal=",")
    rc, out = train(tmp_path, "--columns", "c,d", data=[str(f)])
    assert rc == 0 and load_meta(out).channels == ["c", "d"]


def test_empty_and_text_columns_are_named_in_a_warning(tmp_path, capsys):
    f = make_csv(tmp_path / "d.csv")
    df = pd.read_csv(f)
    df["offline"] = np.nan
    df["batch"] = "B-17"
    df.to_csv(f, index=False)
    rc, out = train(tmp_path, data=[str(f)])
    err = capsys.readouterr().err
    assert rc == 0 and load_meta(out).channels == ["a", "b", "c"]
    warning = [ln for ln in err.splitlines() if "not used as channels" in ln]
    assert warning == [f"tsad-export: warning: {f}: not used as channels: 'offline', 'batch' "
                       "(no number in them: empty or text)"]


def test_a_file_of_plain_numbers_warns_of_nothing(tmp_path, capsys):
    rc, _ = train(tmp_path)
    assert rc == 0 and "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("columns, expect", [
    ("a,anomaly", "--columns: 'anomaly' is a label column, not a sensor"),
    ("Changepoint,a", "--columns: 'Changepoint' is a label column, not a sensor"),
    ("datetime,a", "--columns: 'datetime': the time column cannot be a channel"),
])
def test_columns_that_are_no_sensor_are_refused(tmp_path, capsys, columns, expect):
    rc, out = train(tmp_path, "--columns", columns)
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and no_model_files(out.parent)
    assert line == f"tsad-export: error: {expect}"


def test_zero_rows_are_refused_as_such(tmp_path, capsys):
    f = make_csv(tmp_path / "d.csv")
    rc, _ = train(tmp_path, data=[f"{f}:0"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"{f}:0: ROWS must be >= 1" in line
    header = tmp_path / "header.csv"
    header.write_text(f.read_text().splitlines()[0] + "\n")
    rc, _ = train(tmp_path, data=[str(header)])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and line == f"tsad-export: error: {header}: no data rows"


def test_val_frac_that_leaves_no_training_windows_says_so(tmp_path, capsys):
    rc, _ = train(tmp_path, "--val-frac", "0.95")      # 114 of 120 rows held out, window 8
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert "--val-frac 0.95 leaves no training windows: it holds out 114 of the longest " \
           "file's 120 rows, leaving 6, fewer than the window (8); lower --val-frac" in line


def test_an_infinite_cell_is_shown_as_written(tmp_path, capsys):
    f = make_csv(tmp_path / "d.csv")
    df = pd.read_csv(f)
    df.loc[9, "b"] = np.inf
    df.to_csv(f, index=False)
    rc, _ = train(tmp_path, data=[str(f)])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert "column 'b' has non-numeric or infinite value inf at data row 9 (line 11)" in line


def test_a_stop_or_outage_in_a_training_file_is_warned_of(tmp_path, capsys):
    """Training audit (twenty-second session): a training window across a stop joins the
    running before and after it, and nothing said so."""
    from export.data import load_files
    t = pd.date_range("2024-01-01", periods=600, freq="10s")
    t = t.append(pd.date_range(t[-1] + pd.Timedelta(hours=2), periods=600, freq="10s"))
    v = np.random.default_rng(0).normal(0, 1, (len(t), 2))
    pd.DataFrame({"datetime": t.strftime("%Y-%m-%d %H:%M:%S"), "a": v[:, 0], "b": v[:, 1]}) \
        .to_csv(tmp_path / "gap.csv", index=False)
    pd.DataFrame({"datetime": t[:600].strftime("%Y-%m-%d %H:%M:%S"), "a": v[:600, 0],
                  "b": v[:600, 1]}).to_csv(tmp_path / "steady.csv", index=False)
    load_files([str(tmp_path / "steady.csv")], None, None)
    assert capsys.readouterr().err == ""
    load_files([str(tmp_path / "gap.csv")], None, None)
    err = capsys.readouterr().err
    assert "gap.csv: 1 time gap(s) over 10x its 10 s sampling interval (the longest 2 h)" in err

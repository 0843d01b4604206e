"""tsad-export end to end: real CSVs, real torch training, real ONNX files and onnxruntime."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agent.model_meta import ModelMetaError, load_meta, meta_path_for, sha256_file
from conftest import MODELS
from onnx_factory import make_model

pytest.importorskip("torch")
from export.cli import main  # noqa: E402

CHANNELS = ["a", "b", "c"]
TINY = ["--window", "8", "--epochs", "2", "--batch-size", "32", "--val-frac", "0.25",
        "--patience", "2", "--seed", "3"]


def make_csv(path: Path, rows: int = 120, sep: str = ",", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    df = pd.DataFrame({
        "datetime": pd.date_range("2024-01-01", periods=rows, freq="s").strftime("%Y-%m-%d %H:%M:%S"),
        "a": np.sin(t / 5) + 0.05 * rng.standard_normal(rows),
        "b": 10 + np.cos(t / 7) + 0.05 * rng.standard_normal(rows),
        "c": 100 + 0.1 * rng.standard_normal(rows),
        "anomaly": 0.0,
    })
    df.to_csv(path, sep=sep, index=False)
    return path


def train(tmp_path: Path, *extra: str, data: list[str] | None = None, name: str = "m.onnx",
          model: str = "DLinear_ad") -> tuple[int, Path]:
    out = tmp_path / "out" / name
    data = data or [str(make_csv(tmp_path / "d.csv"))]
    hp = ["--hparam", "moving_avg=3"] if model == "DLinear_ad" else []
    rc = main(["train", "--model", model, "--data", *data, *TINY, *hp, *extra,
               "--out", str(out)])
    return rc, out


def no_model_files(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def test_train_then_verify_and_convert(tmp_path, capsys):
    ckpt = tmp_path / "out" / "m.pt"
    rc, out = train(tmp_path, "--save-checkpoint", str(ckpt))
    assert rc == 0
    meta = load_meta(out)
    assert meta.channels == CHANNELS          # datetime and anomaly are not channels
    assert meta.window == 8 and meta.opset == 17 and meta.parameters > 0
    assert meta.threshold.value > 0 and meta.threshold.quantile == 0.99
    assert meta.training["files"][0]["rows"] == 120
    assert meta.training["files"][0]["sha256"] == sha256_file(tmp_path / "d.csv")
    assert meta.training["seed"] == 3 and meta.tool["name"] == "tsad-export"
    assert meta.hyperparameters == {"moving_avg": 3}
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.json", "m.pt"]

    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True

    converted = tmp_path / "conv" / "c.onnx"
    assert main(["convert", str(ckpt), "--out", str(converted)]) == 0
    assert sha256_file(converted) == sha256_file(out)
    assert load_meta(converted).threshold.value == meta.threshold.value


def test_same_seed_same_onnx(tmp_path):
    data = [str(make_csv(tmp_path / "d.csv"))]
    _, a = train(tmp_path, data=data, name="a.onnx")
    _, b = train(tmp_path, data=data, name="b.onnx")
    _, c = train(tmp_path, "--seed", "4", data=data, name="c.onnx")
    assert sha256_file(a) == sha256_file(b)
    assert sha256_file(a) != sha256_file(c)


def test_semicolon_csv_columns_and_row_limit(tmp_path):
    f = make_csv(tmp_path / "skab_like.csv", rows=200, sep=";")
    rc, out = train(tmp_path, "--columns", "c,a", "--train-stride", "2", data=[f"{f}:150"])
    assert rc == 0
    meta = load_meta(out)
    assert meta.channels == ["c", "a"]
    assert meta.training["files"][0]["rows"] == 150
    # 150 rows, last 38 held out: 112 - 8 + 1 = 105 training windows, every 2nd kept.
    assert meta.training["train_windows"] == 53


def test_per_block_scaling_records_model_unit(tmp_path):
    f1 = make_csv(tmp_path / "one.csv", rows=160, seed=1)
    f2 = make_csv(tmp_path / "two.csv", rows=160, seed=2)
    df = pd.read_csv(f2)
    df["c"] += 500           # a second operating point
    df.to_csv(f2, index=False)
    rc, out = train(tmp_path, "--scale-rows", "40", data=[str(f1), str(f2)])
    assert rc == 0
    meta = load_meta(out)
    glob = meta.training["global_scaler"]["std"]
    # The metadata unit is the within-block std, far below the std across operating points.
    assert meta.scaler.std[2] < glob[2] / 50
    assert meta.training["calibration_rows"] == 40


def test_drift_rows_learns_calibration_std_scale_and_margin(tmp_path):
    f = make_csv(tmp_path / "drift.csv", rows=400, seed=4)
    df = pd.read_csv(f)
    df["c"] += np.linspace(0.0, 10.0, len(df))     # c wanders far beyond any 40-row block
    df.to_csv(f, index=False)
    rc, out = train(tmp_path, "--scale-rows", "40", "--drift-rows", "80", data=[str(f)])
    assert rc == 0
    meta = load_meta(out)
    k = meta.calibration_std_scale
    assert len(k) == 3 and min(k) >= 1.0
    assert k[2] > 3 * max(k[0], k[1])
    # The model's unit includes the drift allowance, so the runtime floor scales with it.
    assert meta.scaler.std[2] > 3 * meta.training["global_scaler"]["std"][2] / 20
    assert meta.calibration_margin is not None and meta.calibration_margin >= 1.0
    assert meta.training["drift_rows"] == 80
    assert meta.training["drift_quantile"] == 0.5


def test_drift_quantile_trusts_a_channel_with_heavy_tailed_drift_less():
    from export.drift import drift_std_scale
    rng = np.random.default_rng(0)
    blocks = []
    for i in range(20):
        v = rng.standard_normal((80, 2))
        if i % 4 == 0:           # channel 1 jumps in one block in four, like a cooling motor
            v[40:, 1] += 8.0
        blocks.append(v)
    floor = np.full(2, 1e-6)
    # Each array is one calibration block (shorter than block + horizon): half against half.
    median = drift_std_scale(blocks, 80, 100, floor)
    q90 = drift_std_scale(blocks, 80, 100, floor, quantile=0.9)
    # The median block never jumps, so the median cannot see the jumps; the 0.9 quantile does.
    assert median[1] < 2.0 < 3 * median[1] < q90[1]
    assert q90[0] < 1.5             # a channel that never jumps keeps a factor near 1


def test_drift_quantile_out_of_range_is_rejected(tmp_path, capsys):
    rc, _ = train(tmp_path, "--scale-rows", "40", "--drift-rows", "80", "--drift-quantile", "1.5")
    assert rc == 2
    assert "--drift-quantile 1.5: expected a fraction between 0 and 1" in capsys.readouterr().err


def test_drift_rows_needs_scale_rows(tmp_path, capsys):
    rc, _ = train(tmp_path, "--drift-rows", "80")
    assert rc == 2
    assert "only with --scale-rows" in capsys.readouterr().err


@pytest.mark.parametrize("case, expect", [
    ("missing_column", "missing column(s) 'nope'"),
    ("nan", "column 'b' has empty/NaN at data row 17 (line 19)"),
    ("too_short", "too few rows for window 8"),
    ("text_cell", "column 'a' has non-numeric"),
    ("newest_first", "row 3 (1700000000) is 2 s before row 1 (1700000002), more than the 1 s"),
])
def test_bad_training_data_fails_cleanly(tmp_path, capsys, case, expect):
    f = make_csv(tmp_path / "d.csv")
    extra: list[str] = []
    if case == "missing_column":
        extra = ["--columns", "a,nope"]
    elif case == "nan":
        df = pd.read_csv(f)
        df.loc[17, "b"] = np.nan
        df.to_csv(f, index=False)
    elif case == "too_short":
        make_csv(f, rows=5)
    elif case == "text_cell":
        df = pd.read_csv(f, dtype=str)
        df.loc[3, "a"] = "oops"
        df.to_csv(f, index=False)
    elif case == "newest_first":
        df = pd.read_csv(f)
        df.insert(0, "time", 1_700_000_002 - np.arange(len(df)))
        df.to_csv(f, index=False)
    rc, out = train(tmp_path, *extra, data=[str(f)])
    err = capsys.readouterr().err
    assert rc == 2
    assert expect in err and "tsad-export: error:" in err
    assert no_model_files(out.parent)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output_fails_before_training(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc = main(["train", "--model", "DLinear_ad", "--data", str(make_csv(tmp_path / "d.csv")),
                   *TINY, "--out", str(locked / "m.onnx")])
    finally:
        locked.chmod(0o700)
    assert rc == 2
    assert "not writable" in capsys.readouterr().err
    assert list(locked.iterdir()) == []


def test_output_path_that_cannot_be_a_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["train", "--model", "DLinear_ad", "--data", str(make_csv(tmp_path / "d.csv")),
               *TINY, "--out", str(blocker / "sub" / "m.onnx")])
    assert rc == 2
    assert "not writable" in capsys.readouterr().err


def test_parity_failure_leaves_nothing_and_names_the_output(tmp_path, capsys, monkeypatch):
    import export.onnx_export as ox
    real = ox.parity_check

    def strict_parity(*args, **kwargs):   # the real check; no difference is small enough
        return real(*args, **kwargs, tol=-1.0)
    monkeypatch.setattr(ox, "parity_check", strict_parity)
    rc, out = train(tmp_path)
    assert rc == 1
    err = capsys.readouterr().err
    # The error names the file the user asked for, not the temporary file it was checked in.
    assert f"error: {out}: ONNX Runtime and torch disagree" in err
    assert ".tmp" not in err
    assert no_model_files(out.parent)


@pytest.fixture
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    rc, out = train(d)
    assert rc == 0
    return out


def test_verify_rejects_corrupt_bytes(tiny_model, tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    data = bytearray(tiny_model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    meta_path_for(bad).write_text(meta_path_for(tiny_model).read_text())
    assert main(["verify", str(bad)]) == 1
    assert "does not match metadata" in capsys.readouterr().err


def test_verify_rejects_unloadable_file_with_matching_checksum(tiny_model, tmp_path, capsys):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"not an onnx model at all")
    meta = json.loads(meta_path_for(tiny_model).read_text())
    meta["onnx_sha256"] = sha256_file(bad)
    meta_path_for(bad).write_text(json.dumps(meta))
    assert main(["verify", str(bad)]) == 1
    assert "onnxruntime cannot load the model" in capsys.readouterr().err


def test_verify_rejects_missing_and_mismatched_metadata(tiny_model, tmp_path, capsys):
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(tiny_model.read_bytes())
    assert main(["verify", str(lone)]) == 1
    assert "metadata not found" in capsys.readouterr().err

    meta = json.loads(meta_path_for(tiny_model).read_text())
    meta["channels"] = meta["channels"] + ["extra"]
    meta["scaler"] = {"mean": [0.0] * 4, "std": [1.0] * 4}
    meta_path_for(lone).write_text(json.dumps(meta))
    assert main(["verify", str(lone)]) == 1
    assert "model expects 3 channels but metadata lists 4" in capsys.readouterr().err

    meta = json.loads(meta_path_for(tiny_model).read_text())
    meta["window"] = 16
    meta_path_for(lone).write_text(json.dumps(meta))
    assert main(["verify", str(lone)]) == 1
    assert "model expects window 8 but metadata says 16" in capsys.readouterr().err


def test_quantize_writes_a_verified_int8_model(tmp_path, capsys):
    rc, ae = train(tmp_path, model="AutoEncoder_ad")
    assert rc == 0
    data = make_csv(tmp_path / "q.csv", rows=100, seed=9)
    out = tmp_path / "q" / "m-int8.onnx"
    capsys.readouterr()
    assert main(["quantize", str(ae), "--out", str(out), "--data", str(data),
                 "--calib-rows", "50"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert -1.0 <= report["spearman_scores"] <= 1.0
    assert report["nodes_int8"] >= 2 and report["nodes_fp32_kept"] == 0
    assert report["latency_ms_median_int8"] > 0 and report["bytes_int8"] == out.stat().st_size
    meta = load_meta(out)
    assert meta.name.endswith("-int8")
    assert meta.threshold.value == pytest.approx(report["threshold_int8"])
    assert meta.training["quantization"]["from_sha256"] == load_meta(ae).onnx_sha256
    assert main(["verify", str(out)]) == 0


def test_quantize_refuses_a_model_with_nothing_to_quantize(tmp_path, capsys):
    # recon = M @ x: the stored matrix is on the left, like DLinear_ad's folded map,
    # and dynamic int8 would hand back an unchanged fp32 graph under an int8 name
    model, _ = make_model(tmp_path / "tm.onnx", window=8, channels=["a", "b", "c"],
                          kind="timemix")
    data = make_csv(tmp_path / "q.csv", rows=100, seed=9)
    out = tmp_path / "tm-int8.onnx"
    assert main(["quantize", str(model), "--out", str(out), "--data", str(data)]) == 1
    assert "nothing to quantize" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.csv", "tm.onnx", "tm.onnx.json"]


@pytest.mark.skipif(not (MODELS / "TimesNet_ad.onnx").exists(),
                    reason=f"no shipped TimesNet_ad in {MODELS}")
def test_quantize_keeps_computed_conv_weights_in_fp32(tmp_path, capsys):
    # TimesNet_ad's Inception block averages its kernels in the graph; the quantizer
    # used to raise on those Convs ("... to be an initializer")
    src = MODELS / "TimesNet_ad.onnx"
    meta = load_meta(src)
    rng = np.random.default_rng(3)
    data = tmp_path / "normal.csv"
    pd.DataFrame(rng.normal(np.asarray(meta.scaler.mean), np.asarray(meta.scaler.std),
                            (meta.window + 200, meta.n_channels)),
                 columns=meta.channels).to_csv(data, index=False)
    out = tmp_path / "tn-int8.onnx"
    capsys.readouterr()
    assert main(["quantize", str(src), "--out", str(out), "--data", str(data)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["nodes_int8"] >= 1 and report["nodes_fp32_kept"] >= 6
    assert load_meta(out).training["quantization"]["nodes_fp32_kept"] == report["nodes_fp32_kept"]
    assert main(["verify", str(out)]) == 0


# the SKAB models and the Tennessee Eastman ones (export/recipes/tep_models.py)
SHIPPED = sorted([*MODELS.glob("*.onnx"), *MODELS.glob("tep/*.onnx")]) if MODELS.is_dir() else []


@pytest.mark.skipif(not SHIPPED, reason=f"no shipped models in {MODELS} (build: python -m export.recipes.build_models)")
@pytest.mark.parametrize("model", SHIPPED, ids=[str(p.relative_to(MODELS).with_suffix("")) for p in SHIPPED])
def test_shipped_models_verify(model, capsys):
    assert main(["verify", str(model)]) == 0
    meta = load_meta(model)
    assert meta.name == model.stem
    assert meta.training["files"] and all(f["rows"] > 0 for f in meta.training["files"])


def test_train_refuses_a_model_that_reproduces_its_input(tmp_path, capsys):
    # Without input noise a DLinear map converges to the identity on any data: it would
    # copy every anomaly through and its threshold would sit at numerical noise.
    rc, out = train(tmp_path, "--noise", "0", "--level-noise", "0", "--lr", "0.02",
                    "--epochs", "40", "--patience", "40",
                    data=[str(make_csv(tmp_path / "d.csv", rows=200))])
    err = capsys.readouterr().err
    assert rc == 1
    assert "degenerate model: it reproduces its input" in err
    assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1
    assert no_model_files(out.parent)


def test_the_same_data_trains_with_the_default_noise(tmp_path):
    rc, out = train(tmp_path, "--lr", "0.02", "--epochs", "40", "--patience", "40",
                    data=[str(make_csv(tmp_path / "d.csv", rows=200))])
    assert rc == 0
    meta = load_meta(out)
    from export.train import DEGENERATE_REL
    assert meta.threshold.value > 10 * DEGENERATE_REL
    assert meta.training["noise"] > 0


def test_degenerate_rule_is_relative_to_the_data_variance():
    from export.train import TrainError, check_not_degenerate
    val = np.random.default_rng(0).normal(scale=3.0, size=(50, 8, 4)).astype(np.float32)
    check_not_degenerate("m", val, val_loss=0.2, threshold=0.5)          # a real model
    with pytest.raises(TrainError, match="degenerate"):
        check_not_degenerate("m", val, val_loss=0.2, threshold=1e-9)     # threshold at noise
    with pytest.raises(TrainError, match="degenerate"):
        check_not_degenerate("m", val, val_loss=5e-5, threshold=0.5)     # near-zero error
    with pytest.raises(TrainError, match="diverged"):
        check_not_degenerate("m", val, val_loss=float("nan"), threshold=0.5)
    with pytest.raises(TrainError, match="do not vary"):
        check_not_degenerate("m", np.zeros((5, 8, 4), np.float32), 0.0, 1e-9)


SHORTEST = "(the runtime's shortest learning period)"


@pytest.mark.parametrize("flag, value, expect", [
    ("--scale-rows", "5", f"--scale-rows 5: expected 0 (off) or an integer >= 10 {SHORTEST}"),
    ("--scale-rows", "9", f"--scale-rows 9: expected 0 (off) or an integer >= 10 {SHORTEST}"),
    ("--seed", "-1", "--seed -1: expected an integer 0..4294967295"),
    ("--seed", "4294967296", "--seed 4294967296: expected an integer 0..4294967295"),
    ("--margin", "1e308", "--margin 1e+308: expected at most 1e+06"),
])
def test_train_option_the_runtime_or_numpy_cannot_take_is_refused_first(tmp_path, capsys,
                                                                         flag, value, expect):
    rc, out = train(tmp_path, flag, value)
    assert rc == 2 and no_model_files(out.parent)
    assert capsys.readouterr().err.strip() == f"tsad-export: error: {expect}"


def test_scale_rows_longer_than_every_file_trains_with_a_warning(tmp_path, capsys):
    rc, out = train(tmp_path, "--scale-rows", "500")
    err = capsys.readouterr().err
    assert rc == 0 and load_meta(out).training["calibration_rows"] == 500
    assert "tsad-export: warning: --scale-rows 500 is longer than every training file " \
           "(longest has 120 rows)" in err
    rc, _ = train(tmp_path, "--scale-rows", "100", name="fits.onnx")
    assert rc == 0 and "warning" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    rc, _ = train(d, "--save-checkpoint", str(d / "out" / "m.pt"))
    assert rc == 0
    return d / "out" / "m.pt"


def _damaged(ckpt, edit):
    import torch
    c = torch.load(ckpt, weights_only=True)
    edit(c)
    return c


@pytest.mark.parametrize("edit, why", [
    (lambda c: c.pop("scaler"), "'scaler' missing, expected a dict"),
    (lambda c: c.pop("parity_windows"), "'parity_windows' missing or not a tensor"),
    (lambda c: c.update(model="Foo_ad"), "unknown model 'Foo_ad'; known: "),
    # saved before train --name, when the name was the model
    (lambda c: (c.pop("model"), c.update(name="Foo_ad")), "unknown model 'Foo_ad'; known: "),
    (lambda c: c["threshold"].update(zzz=1), "invalid 'scaler' or 'threshold': "),
    (lambda c: c["scaler"].pop("std"), "invalid 'scaler' or 'threshold': "),
    (lambda c: c.update(training=None), "'training' a NoneType, expected a dict"),
])
def test_convert_names_what_a_damaged_checkpoint_lacks(checkpoint, tmp_path, capsys, edit, why):
    import torch
    bad = tmp_path / "bad.pt"
    torch.save(_damaged(checkpoint, edit), bad)
    rc = main(["convert", str(bad), "--out", str(tmp_path / "o" / "c.onnx")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and no_model_files(tmp_path / "o")
    assert err.startswith(f"tsad-export: error: {bad}: not a complete tsad-export checkpoint "
                          f"({why}")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("content, why", [
    (b"", "empty file"),
    (b"hello world\n", "cut short, or some other format"),
])
def test_convert_says_why_a_file_is_no_checkpoint(tmp_path, capsys, content, why):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    rc = main(["convert", str(bad), "--out", str(tmp_path / "c.onnx")])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err == f"tsad-export: error: {bad}: not a readable torch checkpoint: {why}"


def test_name_names_the_model_and_survives_convert(tmp_path, capsys):
    import torch
    ckpt = tmp_path / "out" / "m.pt"
    rc, out = train(tmp_path, "--name", "pump 3 DLinear", "--save-checkpoint", str(ckpt))
    assert rc == 0
    meta = load_meta(out)
    assert meta.name == "pump 3 DLinear" and meta.architecture == "DLinear"
    assert meta.training["model"] == "DLinear_ad"     # what was trained stays on record
    converted = tmp_path / "conv" / "c.onnx"
    assert main(["convert", str(ckpt), "--out", str(converted)]) == 0
    assert load_meta(converted).name == "pump 3 DLinear"
    assert sha256_file(converted) == sha256_file(out)
    # a checkpoint saved before --name had no "model": its name was the model
    old = _damaged(ckpt, lambda c: (c.pop("model"), c.update(name="DLinear_ad")))
    torch.save(old, tmp_path / "old.pt")
    assert main(["convert", str(tmp_path / "old.pt"), "--out", str(tmp_path / "o.onnx")]) == 0
    assert load_meta(tmp_path / "o.onnx").name == "DLinear_ad"


@pytest.mark.parametrize("name", ["", "  ", "two\nlines", "x" * 129])
def test_a_name_that_cannot_name_a_model_is_refused_before_training(tmp_path, capsys, name):
    rc, out = train(tmp_path, "--name", name)
    err = capsys.readouterr().err
    assert rc == 2 and "error: --name: a model name is" in err
    assert "channels, window" not in err          # refused before any training
    assert no_model_files(out.parent)


def test_metadata_with_a_bad_name_is_refused(tiny_model, tmp_path):
    d = json.loads(meta_path_for(tiny_model).read_text())
    d["name"] = "a\tb"
    bad = tmp_path / "m.onnx"
    bad.write_bytes(tiny_model.read_bytes())
    meta_path_for(bad).write_text(json.dumps(d))
    with pytest.raises(ModelMetaError, match="'name': a model name is at most 128 printable"):
        load_meta(bad)

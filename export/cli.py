"""``tsad-export``: the offline model tool (train, convert, verify, quantize).

Every failure ends in one ``tsad-export: error: ...`` line on stderr and exit 1,
with no partial model files left behind.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from agent.model_meta import ModelMetaError
from export.data import DataError, check_writable


class CliError(Exception):
    """A usage problem the user can fix; printed without a traceback."""


def _parse_hparams(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CliError(f"--hparam {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _build(name: str, window: int, n_channels: int, hparams: dict):
    from export.models import REGISTRY, build_model
    if name not in REGISTRY:
        raise CliError(f"unknown model {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    kwargs = {k: v for k, v in hparams.items() if k not in ("window", "n_channels")}
    try:
        return build_model(name, window, n_channels, **kwargs)
    except (TypeError, ValueError) as e:
        raise CliError(str(e)) from None


def cmd_train(a: argparse.Namespace) -> int:
    from export import data as D
    from export import train as T
    from export.models import ARCHITECTURE
    from export.onnx_export import count_parameters

    out = Path(a.out)
    check_writable(out)
    ckpt_path = Path(a.save_checkpoint) if a.save_checkpoint else None
    if ckpt_path is not None:
        check_writable(ckpt_path, suffix=".pt")
    if not 0 < a.val_frac < 1:
        raise CliError(f"--val-frac {a.val_frac}: expected a fraction between 0 and 1")
    if not 0 < a.quantile <= 1 or a.margin <= 0:
        raise CliError("--quantile must be in (0, 1] and --margin > 0")
    if a.train_stride < 1:
        raise CliError(f"--train-stride {a.train_stride}: expected at least 1")
    if a.window < 2:
        raise CliError(f"--window {a.window}: expected at least 2")
    if a.drift_rows < 0 or (a.drift_rows and not a.scale_rows):
        raise CliError(f"--drift-rows {a.drift_rows}: expected >= 0, and only with --scale-rows")
    if not 0 < a.drift_quantile < 1:
        raise CliError(f"--drift-quantile {a.drift_quantile}: expected a fraction between 0 and 1")
    hparams = _parse_hparams(a.hparam)
    columns = [c.strip() for c in a.columns.split(",") if c.strip()] if a.columns else None

    files, channels = D.load_files(a.data, columns, a.rows_per_file)
    D.check_lengths(files, a.window)
    cfg = T.TrainConfig(window=a.window, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                        patience=a.patience, val_frac=a.val_frac, seed=a.seed,
                        quantile=a.quantile, margin=a.margin, noise=a.noise,
                        level_noise=a.level_noise, threads=a.threads)
    T.seed_everything(cfg.seed, cfg.threads)

    g_mean, g_std = D.fit_scaler([f.values for f in files])
    global_scaler = {"mean": g_mean.tolist(), "std": g_std.tolist()}
    std_scale = None
    if a.scale_rows:
        # The model's unit is normal within-block variability; the runtime floors a
        # calibrated std at std_floor x scaler.std, so scaler.std must be that unit, not a
        # std inflated by the gaps between operating points.
        m_mean, m_std = g_mean, D.pooled_block_std([f.values for f in files], a.scale_rows)
        if a.drift_rows:
            # Calibration rows understate later normal drift: learn by how much per channel,
            # widen the unit by it (metadata tells the runtime) and train on calibration
            # blocks followed by the rows after them, as a calibrated stream runs.
            k = T.drift_std_scale([f.values for f in files], a.scale_rows, a.drift_rows,
                                  a.block_std_floor * m_std, a.drift_quantile)
            std_scale, m_std = k.tolist(), m_std * k
            split = T.runtime_split([f.values for f in files], [f.path for f in files], cfg.window,
                                    cfg.val_frac, a.scale_rows, a.drift_rows, k,
                                    a.block_std_floor * m_std, a.train_stride)
            scaled = [s for v in [f.values for f in files]
                      for s in T.calibration_segments(v, a.scale_rows, 0, k, a.block_std_floor * m_std)]
            scaling = (f"calibrate-then-run: each {a.scale_rows}-row block scales itself and the "
                       f"{a.drift_rows} rows after it with its mean and max(own std x "
                       f"calibration_std_scale, {a.block_std_floor} x scaler.std), as the runtime's "
                       f"per-stream calibration does with calibration.std_floor = {a.block_std_floor}. "
                       f"calibration_std_scale: per channel, quantile {a.drift_quantile} over blocks "
                       "of the RMS deviation "
                       f"of the next {a.drift_rows} rows from the block mean / block std (>= 1). "
                       "scaler.std is the pooled within-block std x calibration_std_scale (the "
                       "model's unit). Validation: each file's last rows scaled by the block before "
                       "them. global_scaler is the plain mean/std of all training rows")
        else:
            scaled = [D.scale_per_block(f.values, a.scale_rows, a.block_std_floor * m_std)
                      for f in files]
            scaling = (f"per-block z-score: each file cut into blocks of {a.scale_rows} rows, each "
                       f"block scaled with its own mean and max(own std, {a.block_std_floor} x "
                       "scaler.std), as the runtime's per-stream calibration does with "
                       f"calibration.std_floor = {a.block_std_floor}. scaler.mean is the global mean, "
                       "scaler.std the pooled within-block std (the model's unit); use with "
                       "per-stream calibration. global_scaler is the plain mean/std of all training rows")
    else:
        m_mean, m_std = g_mean, g_std
        scaled = [D.scale(f.values, g_mean, g_std) for f in files]
        scaling = "global z-score: the metadata scaler (mean/std of all training rows)"
    if not (a.scale_rows and a.drift_rows):
        split = D.chronological_split(scaled, [f.path for f in files], cfg.window, cfg.val_frac,
                                      a.train_stride)

    model = _build(a.model, cfg.window, len(channels), hparams)
    try:
        model.prepare(np.concatenate(scaled).astype(np.float32))
    except ValueError as e:
        raise CliError(f"{a.model}: {e}") from None
    print(f"{a.model}: {len(channels)} channels, window {cfg.window}, "
          f"{len(split.train)} train / {len(split.val)} validation windows", file=sys.stderr)
    result = T.fit(model, split.train, split.val, cfg, desc=a.model)

    cal_margin = None
    if a.scale_rows and a.drift_rows:
        cal_margin = T.calibration_margin(model, [f.values for f in files], cfg.window,
                                          a.scale_rows, a.drift_rows, np.asarray(std_scale),
                                          a.block_std_floor * m_std, cfg.quantile)
    scores = T.window_scores(split.val, T.reconstruct(model, split.val))
    threshold = T.calibrate(scores, cfg.quantile, cfg.margin)
    training = {
        "files": [f.describe() for f in files],
        "validation": {"method": f"chronological: last {cfg.val_frac} of the rows of each file "
                                 "long enough to hold a full window on both sides of the cut",
                       "files": split.held_out_files, "windows": int(len(split.val))},
        "train_windows": int(len(split.train)), "train_stride": a.train_stride,
        "scaling": scaling,
        "global_scaler": global_scaler,
        "std_floor": {"abs": D.STD_FLOOR_ABS, "rel_to_mean": D.STD_FLOOR_REL},
        "calibration_std_floor": a.block_std_floor if a.scale_rows else None,
        "calibration_rows": a.scale_rows or None,
        "drift_rows": a.drift_rows or None,
        "drift_quantile": a.drift_quantile if a.drift_rows else None,
        "seed": cfg.seed, "epochs": result.epochs_run, "best_epoch": result.best_epoch,
        "max_epochs": cfg.epochs, "patience": cfg.patience, "batch_size": cfg.batch_size,
        "lr": cfg.lr, "noise": cfg.noise, "level_noise": cfg.level_noise, "val_loss": result.best_val_loss,
        "train_seconds": round(result.seconds, 1), "threads": cfg.threads,
    }
    meta = T.build_meta(a.model, ARCHITECTURE[a.model], cfg.window, channels,
                        T.Scaler(mean=m_mean.tolist(), std=m_std.tolist()), threshold,
                        model.hparams(), training, int(count_parameters(model)), std_scale,
                        cal_margin)
    idx = np.linspace(0, len(split.val) - 1, min(T.PARITY_WINDOWS, len(split.val))).astype(int)
    parity = split.val[idx]
    meta = T.write_model(model, meta, out, parity, opset=a.opset)
    if ckpt_path is not None:
        T.save_checkpoint(T.make_checkpoint(model, meta, parity), ckpt_path)
    print(json.dumps({"model": str(out), "val_loss": result.best_val_loss,
                      "threshold": threshold.value, "epochs": result.epochs_run,
                      "train_seconds": round(result.seconds, 1), "parameters": meta.parameters,
                      "onnx_bytes": out.stat().st_size, "onnx_sha256": meta.onnx_sha256}))
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    import torch

    from export import train as T
    from export.onnx_export import count_parameters

    path = Path(a.checkpoint)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CliError(f"{path}: checkpoint not found") from None
    except Exception as e:  # torch raises many types for a bad pickle/zip
        raise CliError(f"{path}: not a readable torch checkpoint: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != T.CHECKPOINT_FORMAT:
        raise CliError(f"{path}: not a tsad-export checkpoint (save one with train --save-checkpoint)")
    out = Path(a.out)
    check_writable(out)
    T.seed_everything(0, a.threads)
    model = _build(ckpt["name"], ckpt["window"], len(ckpt["channels"]), ckpt["hparams"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CliError(f"{path}: weights do not fit {ckpt['name']}{ckpt['hparams']}: {e}") from None
    training = dict(ckpt["training"], converted_from=str(path))
    meta = T.build_meta(ckpt["name"], ckpt["architecture"], ckpt["window"], ckpt["channels"],
                        T.Scaler(**ckpt["scaler"]), T.Threshold(**ckpt["threshold"]),
                        ckpt["hparams"], training, int(count_parameters(model)),
                        ckpt.get("calibration_std_scale"), ckpt.get("calibration_margin"))
    meta = T.write_model(model, meta, out, ckpt["parity_windows"].numpy(), opset=a.opset)
    print(json.dumps({"model": str(out), "onnx_sha256": meta.onnx_sha256, "opset": meta.opset}))
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from export.verify import verify_model
    report = verify_model(Path(a.model))
    print(json.dumps(report, indent=2))
    return 0


def cmd_quantize(a: argparse.Namespace) -> int:
    from export.quantize import quantize_model
    report = quantize_model(Path(a.model), Path(a.out), a.data, calib_rows=a.calib_rows)
    print(json.dumps(report, indent=2))
    return 0


def cmd_paddlex(a: argparse.Namespace) -> int:
    from export.paddlex_import import import_folder
    meta = import_folder(Path(a.folder), Path(a.out), name=a.name, opset=a.opset, data=a.data)
    print(json.dumps({"model": a.out, "name": meta.name, "window": meta.window,
                      "channels": meta.channels, "threshold": meta.threshold.value,
                      "opset": meta.opset, "onnx_sha256": meta.onnx_sha256,
                      "parity_max_abs_diff": meta.training["parity_max_abs_diff"]}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tsad-export", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on normal data, export ONNX + metadata")
    t.add_argument("--model", required=True, help="architecture name, e.g. DLinear_ad")
    t.add_argument("--data", required=True, nargs="+", metavar="FILE[:ROWS]",
                   help="CSV files (';' or ',' separated); FILE:ROWS uses only the first ROWS rows")
    t.add_argument("--columns", help="comma-separated channel names, in model input order "
                   "(default: every numeric column except anomaly/changepoint and the time column)")
    t.add_argument("--rows-per-file", type=int, help="use only the first N rows of each file")
    t.add_argument("--window", type=int, default=96)
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--patience", type=int, default=5, help="early stopping: epochs without improvement")
    t.add_argument("--val-frac", type=float, default=0.2,
                   help="chronological hold-out: last fraction of each file")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quantile", type=float, default=0.99)
    t.add_argument("--margin", type=float, default=1.0)
    t.add_argument("--noise", type=float, default=0.0,
                   help="std of input noise (scaled units) for a denoising objective")
    t.add_argument("--level-noise", type=float, default=0.0,
                   help="std of a random per-window, per-channel input offset (scaled units): "
                   "teaches the model the normal levels so sustained shifts are not copied")
    t.add_argument("--scale-rows", type=int, default=0, metavar="N",
                   help="scale each N-row block of each file with its own mean/std, like the "
                   "runtime's per-stream calibration (default 0: one global scaler)")
    t.add_argument("--block-std-floor", type=float, default=0.1, metavar="F",
                   help="with --scale-rows: floor each block std at F x the global std; match the "
                   "runtime's calibration.std_floor")
    t.add_argument("--drift-rows", type=int, default=0, metavar="H",
                   help="with --scale-rows: learn per-channel normal drift over the H rows after "
                   "each calibration block (metadata calibration_std_scale) and train on those rows "
                   "scaled by the block before them (default 0: off)")
    t.add_argument("--drift-quantile", type=float, default=0.5, metavar="Q",
                   help="with --drift-rows: the std covers the drift of this fraction of normal "
                   "blocks (default 0.5, the median block)")
    t.add_argument("--train-stride", type=int, default=1, metavar="K",
                   help="keep every K-th training window (faster epochs)")
    t.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture hyperparameter (JSON value), repeatable")
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    t.add_argument("--opset", type=int, default=17)
    t.add_argument("--save-checkpoint", metavar="FILE.pt",
                   help="also save a torch checkpoint that `convert` can export")
    t.add_argument("--out", required=True, help="output .onnx (metadata goes to OUT.json)")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("convert", help="export a checkpoint saved by train to ONNX + metadata")
    c.add_argument("checkpoint")
    c.add_argument("--out", required=True)
    c.add_argument("--opset", type=int, default=17)
    c.add_argument("--threads", type=int, default=1)
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("verify", help="check a model file against its metadata and run it")
    v.add_argument("model")
    v.set_defaults(func=cmd_verify)

    q = sub.add_parser("quantize", help="dynamic int8 copy of a model, with an agreement report")
    q.add_argument("model")
    q.add_argument("--out", required=True)
    q.add_argument("--data", required=True, nargs="+", metavar="FILE[:ROWS]",
                   help="real CSV data for the latency/agreement report and threshold rescaling")
    q.add_argument("--calib-rows", type=int, default=400,
                   help="scale each file with the mean/std of its first N rows (0: metadata scaler)")
    q.set_defaults(func=cmd_quantize)

    x = sub.add_parser("paddlex", help="import a PaddleX time-series anomaly-detection inference "
                       "folder (needs paddlepaddle + paddle2onnx: export/recipes/paddle_env.sh); "
                       "it unpickles scaler.pkl, so import only folders you trust")
    x.add_argument("folder", help="e.g. DLinear_ad_infer/ (inference.json|.pdmodel, "
                   "inference.pdiparams, inference.yml, scaler.pkl)")
    x.add_argument("--out", required=True, help="output .onnx (metadata goes to OUT.json)")
    x.add_argument("--name", help="model name in the metadata (default: from inference.yml)")
    x.add_argument("--opset", type=int, default=17,
                   help="minimum opset; paddle2onnx raises it where an operator needs more")
    x.add_argument("--data", nargs="+", metavar="FILE[:ROWS]",
                   help="CSV files for the parity check on real windows (default: random windows)")
    x.set_defaults(func=cmd_paddlex)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from export.verify import VerifyError
    errors: tuple[type[BaseException], ...] = (CliError, DataError, ModelMetaError, VerifyError,
                                               OSError)
    try:
        from export.onnx_export import ExportError
        errors += (ExportError,)
    except ImportError:
        pass
    from export.paddlex_import import PaddleXImportError
    errors += (PaddleXImportError,)
    started = time.monotonic()
    try:
        rc = args.func(args)
    except errors as e:
        print(f"tsad-export: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tsad-export: interrupted; no model written", file=sys.stderr)
        return 130
    print(f"tsad-export {args.command}: done in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())

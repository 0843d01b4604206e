"""``tsad-export``: the offline model tool (train, convert, verify, quantize).

Every failure ends in one ``tsad-export: error: ...`` line on stderr, never a traceback,
with no partial model files left behind.  Exit 2: the command cannot start (a bad flag
or option value, an unknown architecture, an input that is missing or unusable, an
output path that cannot be written); exit 1: the work itself failed (training diverged,
the export or its parity check failed, a model that does not verify).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from agent import __version__
from agent.contract import DEFAULT_STD_FLOOR
from agent.model_meta import ModelMetaError
from export.data import DEFAULT_NOISE, DataError


# A runtime-only install (a plant's) verifies models; the rest needs these.
EXPORT_EXTRA = {"torch", "onnx", "onnxscript", "tqdm"}


class CliError(Exception):
    """A usage problem the user can fix; printed without a traceback, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors in one line too (the usage itself is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"tsad-export: error: {message} (see {self.prog} --help)\n")


def _need(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CliError(f"{path}: no such {what}")
    return p


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


def cmd_train(a: argparse.Namespace) -> int:
    from export.models import REGISTRY
    from export.train import OptionError, TrainError, TrainOptions, check_hparam_keys, train
    if a.model not in REGISTRY:
        raise CliError(f"--model {a.model!r}: unknown architecture; known: {', '.join(REGISTRY)}")
    opts = TrainOptions(
        model=a.model, data=a.data, out=a.out,
        columns=[c.strip() for c in a.columns.split(",") if c.strip()] if a.columns else None,
        data_root=a.data_root, rows_per_file=a.rows_per_file, window=a.window, epochs=a.epochs,
        batch_size=a.batch_size, lr=a.lr, patience=a.patience, val_frac=a.val_frac,
        seed=a.seed, quantile=a.quantile, margin=a.margin, noise=a.noise,
        level_noise=a.level_noise, scale_rows=a.scale_rows,
        block_std_floor=a.block_std_floor, drift_rows=a.drift_rows,
        drift_quantile=a.drift_quantile, train_stride=a.train_stride,
        hparams=_parse_hparams(a.hparam), threads=a.threads, opset=a.opset,
        save_checkpoint=a.save_checkpoint, name=a.name)
    try:
        opts.check()
        check_hparam_keys(a.model, opts.hparams)
    except TrainError as e:
        raise CliError(str(e)) from None
    try:
        summary = train(opts)
    except OptionError as e:
        raise CliError(str(e)) from None
    print(json.dumps(summary))
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from export.convert import convert_checkpoint
    from export.onnx_export import opset_problem
    if problem := opset_problem(a.opset):
        raise CliError(problem)
    if a.threads < 1:
        raise CliError(f"--threads {a.threads}: expected an integer >= 1")
    _need(a.checkpoint, "checkpoint file")
    print(json.dumps(convert_checkpoint(a.checkpoint, a.out, a.opset, a.threads)))
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from export.verify import verify_model
    report = verify_model(_need(a.model, "model file"))
    print(json.dumps(report, indent=2))
    return 0


def cmd_quantize(a: argparse.Namespace) -> int:
    from export.quantize import quantize_model
    report = quantize_model(_need(a.model, "model file"), Path(a.out), a.data,
                            calib_rows=a.calib_rows)
    print(json.dumps(report, indent=2))
    return 0


def cmd_paddlex(a: argparse.Namespace) -> int:
    from export.paddlex_import import import_folder
    meta = import_folder(_need(a.folder, "folder"), Path(a.out), name=a.name, opset=a.opset,
                         data=a.data)
    print(json.dumps({"model": a.out, "name": meta.name, "window": meta.window,
                      "channels": meta.channels, "threshold": meta.threshold.value,
                      "opset": meta.opset, "onnx_sha256": meta.onnx_sha256,
                      "parity_max_abs_diff": meta.training["parity_max_abs_diff"]}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tsad-export", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"tsad-export {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    _train_command(sub)
    _tool_commands(sub)
    return p


def _train_command(sub) -> None:
    t = sub.add_parser("train", help="train a model on normal data, export ONNX + metadata")
    t.add_argument("--model", required=True, help="architecture name, e.g. DLinear_ad")
    t.add_argument("--data", required=True, nargs="+", metavar="FILE[:ROWS]",
                   help="CSV files (';' or ',' separated); FILE:ROWS uses only the first ROWS rows")
    t.add_argument("--data-root", metavar="DIR",
                   help="the metadata records each data file by its path below DIR, and DIR by "
                   "its name only (default: the deepest folder holding every data file)")
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
    t.add_argument("--noise", type=float, default=DEFAULT_NOISE,
                   help="std of input noise (scaled units) for a denoising objective; 0 lets "
                   f"models that can copy their input learn the identity (default {DEFAULT_NOISE:g})")
    t.add_argument("--level-noise", type=float, default=0.0,
                   help="std of a random per-window, per-channel input offset (scaled units): "
                   "teaches the model the normal levels so sustained shifts are not copied")
    t.add_argument("--scale-rows", type=int, default=0, metavar="N",
                   help="scale each N-row block of each file with its own mean/std, like the "
                   "runtime's per-stream calibration (default 0: one global scaler)")
    t.add_argument("--block-std-floor", type=float, default=DEFAULT_STD_FLOOR, metavar="F",
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
    t.add_argument("--name", help="the model's name in its metadata, alerts, logs and metrics "
                   "(default: the --model name), e.g. to tell two pumps' models apart")
    t.add_argument("--out", required=True, help="output .onnx (metadata goes to OUT.json)")
    t.set_defaults(func=cmd_train)



def _tool_commands(sub) -> None:
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


def _error(e: BaseException, code: int) -> int:
    print(f"tsad-export: error: {' '.join(str(e).split())}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from export.verify import VerifyError
    usage = (CliError, DataError)
    errors: tuple[type[BaseException], ...] = (ModelMetaError, VerifyError, OSError)
    try:   # torch (the export extra) trains and converts; verify and paddlex run without it
        from export.onnx_export import ExportError
        from export.train import TrainError
        errors += (ExportError, TrainError)
    except ImportError:
        pass
    from export.paddlex_folder import PaddleXImportError
    errors += (PaddleXImportError,)
    started = time.monotonic()
    try:
        rc = args.func(args)
    except usage as e:
        return _error(e, 2)
    except errors as e:
        return _error(e, 1)
    except ModuleNotFoundError as e:
        if e.name not in EXPORT_EXTRA:
            raise
        print(f"tsad-export: error: {args.command} needs {e.name} (the export extra: "
              f"python3 -m pip install 'tsad-agent[export]')", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tsad-export: interrupted; no model written", file=sys.stderr)
        return 130
    print(f"tsad-export {args.command}: done in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())

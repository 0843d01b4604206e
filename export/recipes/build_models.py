"""Rebuild the five shipped models in models_onnx/ from SKAB normal data.

    python -m export.recipes.build_models [--out models_onnx] [--skab ../shared/data/skab]

Training data is NORMAL operation only: the whole of anomaly-free/anomaly-free.csv
and the first 400 rows of every valve1/ and valve2/ file (the SKAB fitting part;
the labeled test rows after 400 are never read).  Each 400-row block is z-scored
with its own statistics, as the runtime's per-stream calibration will do.  Every
model goes through the same `tsad-export train` command a user would run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.cli import main as export_main

REPO = Path(__file__).resolve().parents[2]
CALIBRATION_ROWS = 400
# --level-noise 2.0: offsets the size of the faults that matter (a few calibration stds)
# must be undone, never copied through.
COMMON = ["--scale-rows", str(CALIBRATION_ROWS), "--block-std-floor", "0.1",
          "--val-frac", "0.2", "--patience", "4", "--seed", "0", "--quantile", "0.99",
          "--margin", "1.0", "--noise", "0.1", "--level-noise", "2.0", "--batch-size", "64", "--threads", "1",
          # Learn normal drift over the ~800 test rows that follow calibration on SKAB, and
          # widen each channel's unit to cover the drift of 9 in 10 normal blocks: the motor
          # temperature wanders by many calibration stds in some blocks and not in others,
          # and the median block (0.5) left it the main source of false alarms.
          "--drift-rows", "800", "--drift-quantile", "0.9"]
# Window per model, chosen on valve1/ among 16, 24, 32, 48 and 64 rows, valve2/ held out.
# AutoEncoder_ad scores better at 32 rows with each of three seeds (with the recipe's seed:
# fewer misses inside the faults, fewer false alarms after them); TimesNet_ad's gain there
# is within seed noise.
# DLinear_ad and PatchTST_ad lost recall at every shorter window; Nonstationary_ad's FAR
# went over 8 % where its F1 rose.  docs/RESULTS.md has the figures.
# Sized so each trains in under three minutes on one CPU thread.  The three window-
# normalising architectures run with RevIN off: the stream is already standardised by its
# calibration statistics, and per-window normalisation would copy sustained level shifts.
MODELS: dict[str, list[str]] = {
    "AutoEncoder_ad": ["--window", "32", "--epochs", "30", "--train-stride", "2", "--lr", "1e-3"],
    "DLinear_ad": ["--window", "64", "--epochs", "30", "--train-stride", "2", "--lr", "1e-3"],
    "Nonstationary_ad": ["--window", "64", "--epochs", "10", "--train-stride", "4", "--lr", "5e-4", "--hparam", "d_model=32",
                         "--hparam", "d_ff=64", "--hparam", "n_heads=4", "--hparam", "e_layers=1", "--hparam", "revin=false"],
    "PatchTST_ad": ["--window", "64", "--epochs", "10", "--train-stride", "4", "--lr", "1e-3", "--hparam", "n_layers=2",
                    "--hparam", "d_ff=64", "--hparam", "revin=false",
                    # chosen on valve1/: 2.0 cost PatchTST F1 0.797 -> 0.774, FAR 8.9% -> 15.2%
                    "--level-noise", "0.5"],
    "TimesNet_ad": ["--window", "32", "--epochs", "8", "--train-stride", "4", "--lr", "1e-3", "--hparam", "top_k=3",
                    "--hparam", "num_kernels=3", "--hparam", "revin=false"],
}


def training_files(skab: Path) -> list[str]:
    free = skab / "anomaly-free" / "anomaly-free.csv"
    valves = [p for d in ("valve1", "valve2")
              for p in sorted((skab / d).glob("*.csv"), key=lambda p: (len(p.stem), p.stem))]
    missing = [str(p) for p in [free, skab / "valve1", skab / "valve2"] if not p.exists()]
    if missing or not valves:
        raise SystemExit(f"SKAB data incomplete under {skab}: missing {missing or 'valve CSVs'}")
    return [str(free)] + [f"{p}:{CALIBRATION_ROWS}" for p in valves]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "models_onnx"))
    ap.add_argument("--skab", default=str(REPO.parent / "shared" / "data" / "skab"))
    ap.add_argument("--only", nargs="+", choices=sorted(MODELS), help="build just these models")
    a = ap.parse_args(argv)
    data = training_files(Path(a.skab))
    for name in a.only or MODELS:
        rc = export_main(["train", "--model", name, "--data", *data, *COMMON, *MODELS[name],
                          "--out", str(Path(a.out) / f"{name}.onnx")])
        if rc != 0:
            print(f"build_models: {name} failed (exit {rc})", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How `tsad-export train`'s noise defaults behave on NORMAL data only (no labeled fault).

    python benchmarks/train_defaults.py [--tep runs/tep] [--skab ../shared/data/skab] [--out FILE.json]

For each setting of (--noise, --level-noise) and each model, train with otherwise default
flags on normal data, then on held-out normal rows the model never saw:
- `thr/var`: the threshold over the mean per-channel variance of the scaled held-out rows
  (an identity map scores ~0: threshold at numerical noise);
- `FAR`: share of held-out normal windows scoring at or over the threshold;
- `gain`: how much of an injected deviation shows up in the score.  A sustained step of
  STEP scaled units is added to a random quarter of the channels over the last quarter of
  each window; gain = mean(score rise) / mean(injected squared deviation at the last step):
  1 = the model ignores the step (reconstructs normal), 0 = it copies the step through;
- `hit`: share of those stepped windows scoring at or over the threshold.

Data: TEP: trained on three training runs (runs/tep/train, 48 h each), held out: the two
48-hour validation runs and the 7-day one (runs/tep/val).  SKAB: trained on the first 70 %
of anomaly-free.csv, held out: its last 30 %.  Synthetic steps on normal data, never the
labeled faults, so the defaults are not tuned to a test set.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent.contract import read_table, score_windows  # noqa: E402
from agent.model_meta import load_meta  # noqa: E402
from export.data import windows  # noqa: E402
from export.train import TrainError, TrainOptions, train  # noqa: E402

STEP = 3.0
SETTINGS = [(0.0, 0.0), (0.1, 0.0), (0.3, 0.0), (0.5, 0.0), (1.0, 0.0),
            (0.3, 0.5), (0.3, 1.0), (0.1, 2.0)]
MODELS = ["DLinear_ad", "AutoEncoder_ad"]


def held_out_windows(paths: list[str], meta) -> np.ndarray:
    out = []
    for p in paths:
        v = read_table(p, meta.channels).values.astype(np.float64)
        z = (v - np.asarray(meta.scaler.mean)) / np.asarray(meta.scaler.std)
        out.append(windows(z, meta.window)[::4])
    return np.concatenate(out).astype(np.float32)


def judge(model: Path, held: list[str], seed: int = 0) -> dict:
    meta = load_meta(model)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = held_out_windows(held, meta)

    def scores(w):
        rec = np.concatenate([sess.run(None, {"x": w[i:i + 1024]})[0]
                              for i in range(0, len(w), 1024)])
        return score_windows(w, rec)[0]
    s0 = scores(x)
    rng = np.random.default_rng(seed)
    mask = rng.random((len(x), 1, x.shape[2])) < 0.25
    step = np.zeros_like(x)
    step[:, -meta.window // 4:, :] = STEP
    xs = (x + step * mask).astype(np.float32)
    s1 = scores(xs)
    injected = (STEP ** 2) * mask.mean(axis=(1, 2))
    th = meta.threshold.value
    var = float(x[:, -1, :].var(axis=0).mean())
    return {"val_loss": meta.training["val_loss"], "threshold": th, "thr_over_var": th / var,
            "far": float(np.mean(s0 >= th)),
            "gain": float(np.mean(s1 - s0) / np.mean(injected)),
            "hit": float(np.mean(s1 >= th))}


def skab_split(skab: Path, tmp: Path) -> tuple[list[str], list[str]]:
    df = pd.read_csv(skab / "anomaly-free" / "anomaly-free.csv", sep=";")
    cut = int(len(df) * 0.7)
    a, b = tmp / "skab_fit.csv", tmp / "skab_held.csv"
    df.iloc[:cut].to_csv(a, index=False)
    df.iloc[cut:].to_csv(b, index=False)
    return [str(a)], [str(b)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tep", default="runs/tep")
    ap.add_argument("--skab", default="../shared/data/skab")
    ap.add_argument("--out")
    ap.add_argument("--models", nargs="+", default=MODELS)
    a = ap.parse_args(argv)
    tep = Path(a.tep)
    tmp = Path(tempfile.mkdtemp(prefix="train_defaults_"))
    data = {
        "TEP w32": ([str(tep / f"train/fault_free_s{s}_48h.csv") for s in (101, 102, 103)],
                    [str(tep / f"val/fault_free_s{s}_48h.csv") for s in (201, 202)]
                    + [str(tep / "val/fault_free_s203_168h.csv")], 32),
        "SKAB w64": (*skab_split(Path(a.skab), tmp), 64),
    }
    rows = []
    for ds, (fit_files, held, window) in data.items():
        for model in a.models:
            for noise, level in SETTINGS:
                out = tmp / f"{model}_{noise}_{level}.onnx"
                try:
                    train(TrainOptions(model=model, data=fit_files, out=str(out), window=window,
                                       noise=noise, level_noise=level, check_degenerate=False))
                except TrainError as e:
                    print(f"{ds} {model} {noise}/{level}: {e}", file=sys.stderr)
                    continue
                r = {"data": ds, "model": model, "noise": noise, "level_noise": level,
                     **judge(out, held)}
                rows.append(r)
                print(f"{ds:9s} {model:15s} noise {noise:3.1f} level {level:3.1f}  "
                      f"val {r['val_loss']:.2e} thr/var {r['thr_over_var']:.2e} "
                      f"FAR {100 * r['far']:5.1f}%  gain {r['gain']:5.2f}  "
                      f"hit {100 * r['hit']:5.1f}%", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

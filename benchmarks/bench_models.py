"""ONNX Runtime vs PyTorch eager for the five shipped models, in one run.

Per model: ORT batch-1 latency (median, p99), ORT batch-32 windows/s, torch eager
batch-1 latency (median), their ratio, ONNX size and parameter count.  One core,
one thread each.

The torch model is rebuilt with `build_model` from the metadata's hyperparameters
(same architecture and size as the exported graph); its weights are freshly
initialised, which does not change the cost of a forward pass.

    python benchmarks/bench_models.py [--reps 500]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.model_meta import PADDLEX_MODELS, load_meta  # noqa: E402


def timed(fn, reps: int) -> list[float]:
    for _ in range(20):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=500)
    a = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import torch
    from export.models import build_model
    from export.onnx_export import count_parameters
    torch.set_num_threads(1)
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}; 1 core, 1 thread")
    print(f"{'model':<17} {'params':>8} {'ONNX KiB':>8} {'ORT b1 med ms':>13} {'p99 ms':>7} "
          f"{'ORT b32 win/s':>13} {'torch b1 ms':>11} {'torch/ORT':>9}")
    for name in PADDLEX_MODELS:
        path = REPO / "models_onnx" / f"{name}.onnx"
        if not path.exists():
            print(f"{name:<17} (not shipped)")
            continue
        meta = load_meta(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        x1 = rng.normal(size=(1, meta.window, meta.n_channels)).astype(np.float32)
        x32 = rng.normal(size=(32, meta.window, meta.n_channels)).astype(np.float32)
        t1 = timed(lambda: sess.run(None, {meta.input_name: x1}), a.reps)
        t32 = timed(lambda: sess.run(None, {meta.input_name: x32}), max(a.reps // 5, 50))
        model = build_model(name, meta.window, meta.n_channels, **meta.hyperparameters).eval()
        xt = torch.from_numpy(x1)
        with torch.inference_mode():
            tt = timed(lambda: model(xt), max(a.reps // 2, 100))
        ort_med = statistics.median(t1) * 1e3
        p99 = sorted(t1)[int(0.99 * len(t1))] * 1e3
        torch_med = statistics.median(tt) * 1e3
        print(f"{name:<17} {count_parameters(model):>8,} {path.stat().st_size / 1024:8.0f} "
              f"{ort_med:13.3f} {p99:7.3f} {32 / statistics.median(t32):13,.0f} "
              f"{torch_med:11.3f} {torch_med / ort_med:8.1f}x")


if __name__ == "__main__":
    main()

"""Runtime throughput: bare ONNX Runtime vs the whole pipeline, per shipped model.

For each model, in one run, pinned to one core:
  * bare ORT `run` µs per window at batch 1 and at the batch the engine sends (model.max_batch),
  * the whole pipeline's µs per window (replay source -> ring -> detector -> scorer
    -> alert tracker -> null sink), stride 1, stepped as `evaluate` and `replay` step a
    file (agent/jobs.py), and its ratio to bare ORT at the engine's batch, timed in
    `--turns` turns, each a bare ORT run right before a pipeline run, so that both see
    the machine in the same state (this machine's speed moves 2-3x between minutes):
    the median of the turns' ratios, and their range,
  * sustained windows/s for 1 stream and for 32 streams,
  * the daemon's pattern: 50 streams stepped together 2 samples at a time (what a
    busy agent's step holds), CPU µs per sample: the engine's fixed cost per stream
    and step, which replay's long chunks hide.

    python benchmarks/bench_runtime.py [--models DLinear_ad,...] [--rows 20000]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np
import onnxruntime as ort
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.config import ModelConfig  # noqa: E402
from agent.contract import read_table  # noqa: E402
from agent.detector import Detector  # noqa: E402
from agent.engine import Engine  # noqa: E402
from agent.jobs import CHUNK, detection_config, step_bounds  # noqa: E402
from agent.metrics import Metrics  # noqa: E402
from agent.model_meta import PADDLEX_MODELS, load_meta  # noqa: E402
from agent.shipped import DEMO_CSV, ShippedModelError, resolve_model  # noqa: E402
from agent.sources.base import Batch  # noqa: E402


def bare_ort_us(path: Path, batch: int, reps: int) -> float:
    meta = load_meta(path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(batch, meta.window, meta.n_channels)).astype(np.float32)
    feed = {meta.input_name: x}
    for _ in range(10):
        s.run(None, feed)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6 / batch


def long_csv(rows: int, tmp: Path) -> Path:
    """The demo recording repeated to `rows` rows with increasing timestamps."""
    df = pd.read_csv(DEMO_CSV, sep=";")
    reps = -(-rows // len(df))
    big = pd.concat([df] * reps, ignore_index=True).iloc[:rows]
    big["datetime"] = pd.date_range("2024-01-01", periods=rows, freq="s").strftime("%Y-%m-%d %H:%M:%S")
    out = tmp / f"bench_{rows}.csv"
    big.to_csv(out, sep=";", index=False)
    return out


class BenchEngine:
    """The engine as replay, evaluate and the daemon drive it: every stream in every step,
    each learning its baseline on its first 400 rows as deployed, results dropped (no sinks)."""

    def __init__(self, csv: Path, streams: int, detector: Detector):
        self.t = read_table(csv, detector.meta.channels)
        self.metrics = Metrics()
        detector.metrics = self.metrics
        self.engine = Engine(detection_config(detector.meta, 400, node="bench"), detector,
                             metrics=self.metrics, default_max_streams=streams)
        self.sids = [f"s{i}" for i in range(streams)]

    def run(self, bounds) -> None:
        """Every stream's rows a..b for each (a, b) in bounds, one step each."""
        ts, values = self.t.ts, self.t.values
        for a, b in bounds:
            self.engine.step([Batch(s, ts[a:b], values[a:b], source="bench") for s in self.sids])


def engine_run(csv: Path, streams: int, detector: Detector) -> tuple[int, float]:
    """Replay's pattern (jobs.run_table's steps). (windows inferred, seconds)."""
    b = BenchEngine(csv, streams, detector)
    start = time.perf_counter()
    b.run(step_bounds(len(b.t.ts), 400, CHUNK))
    return b.metrics.windows_inferred, time.perf_counter() - start


def daemon_us_per_sample(csv: Path, detector: Detector, streams: int = 50, per: int = 2) -> float:
    """CPU µs per sample with `streams` streams stepped `per` samples at a time, after
    each stream has learned its baseline (400 rows) and filled its window."""
    b = BenchEngine(csv, streams, detector)
    warm = 400 + 2 * detector.meta.window
    b.run((a, a + per) for a in range(0, warm, per))
    n0, c0 = b.metrics.samples_in, time.process_time()
    b.run((a, min(a + per, len(b.t.ts))) for a in range(warm, len(b.t.ts), per))
    return (time.process_time() - c0) * 1e6 / (b.metrics.samples_in - n0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(PADDLEX_MODELS))
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--turns", type=int, default=7)
    a = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    print(f"onnxruntime {ort.__version__}, 1 core, 1 ORT thread; {a.rows} rows per stream")
    # bare ORT at the batch the engine sends: the default model.max_batch
    nb = {f.name: f.default for f in msgspec.structs.fields(ModelConfig)}["max_batch"]
    hdr = (f"{'model':<17} {'ORT b1 µs':>9} {f'ORT b{nb} µs':>11} {'pipe µs/win':>11} "
           f"{f'pipe/b{nb}':>9} {'(range)':>11} {'pipe/b1':>7} {'1 stream win/s':>14} "
           f"{'32 streams win/s':>16} {'50x2 µs/sample':>14}")
    print(hdr)
    with tempfile.TemporaryDirectory() as tmp:
        csv1 = long_csv(a.rows, Path(tmp))
        csv32 = long_csv(max(a.rows // 8, 2000), Path(tmp))
        for name in a.models.split(","):
            try:
                path = Path(resolve_model(name))
            except ShippedModelError:
                print(f"{name:<17} (not shipped)")
                continue
            b1 = bare_ort_us(path, 1, a.reps)
            det = Detector(str(path), threads=1, max_batch=nb)
            engine_run(csv32, 1, det)   # warm caches, imports
            turns = []                  # (bare ORT µs a window, pipeline µs a window, windows/s)
            for _ in range(max(a.turns, 1)):
                bn = bare_ort_us(path, det.max_batch, a.reps)
                n1, t1 = engine_run(csv1, 1, det)
                turns.append((bn, t1 * 1e6 / n1, n1 / t1))
            ratios = sorted(p / b for b, p, _ in turns)
            bn, per, rate = (statistics.median(x) for x in zip(*turns))
            n32, t32 = engine_run(csv32, 32, det)
            daemon = daemon_us_per_sample(csv32, det)
            span = f"{ratios[0]:.2f}-{ratios[-1]:.2f}"
            print(f"{name:<17} {b1:9.1f} {bn:11.2f} {per:11.2f} {statistics.median(ratios):9.2f} "
                  f"{span:>11} {per / b1:7.2f} {rate:14,.0f} {n32 / t32:16,.0f} {daemon:14.1f}")


if __name__ == "__main__":
    main()

"""The engine's cost per stream and step: `Engine.step` alone, in process, by step shape.

A daemon's step holds S streams with P samples each: 500 streams at 10 Hz stepped about
once a second give 500 x 10, 50 streams at 100 Hz give 50 x 100, and a step per message
gives 500 x 1.  This times `engine.step` (DLinear_ad, its shipped policy: learning,
adaptation, smoothing, the alert tracker; no decoding, no sinks) on steady normal noise
after every stream has learned its baseline, and reports CPU µs per stream-step and per
sample.  Fitting cost = fixed + per_sample x P (shapes with P >= 10) separates what a stream
costs each step whatever it holds (the part that makes 500 streams dearer per message
than 50) from what each sample costs.  With `--repo A,B` each checkout runs in its own
process, alternating, so old and new code are timed side by side in one run.

    python benchmarks/bench_engine_step.py
    python benchmarks/bench_engine_step.py --repo /path/to/old,. --rounds 3
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from side_by_side import add_arguments, alternate, checkouts  # beside this script

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(500, 1), (500, 10), (50, 10), (50, 100)]   # (streams, samples per step)
SAMPLES = 50_000          # samples timed per shape


def time_shape(streams: int, per: int, model: str) -> float:
    """CPU µs per stream-step of `engine.step`, after learning and a warm-up."""
    import numpy as np
    from agent.detector import Detector
    from agent.engine import Engine
    from agent.jobs import detection_config
    from agent.shipped import resolve_model
    from agent.sources.base import Batch
    det = Detector(resolve_model(model), threads=1)
    eng = Engine(detection_config(det.meta), det, default_max_streams=streams)
    rng = np.random.default_rng(0)
    mean = np.asarray(det.meta.scaler.mean)
    std = np.asarray(det.meta.scaler.std)
    c, t0 = det.meta.n_channels, 1_733_000_000.0

    def step_at(k: int) -> list:
        ts = t0 + np.arange(k, k + per, dtype=np.float64)
        noise = rng.normal(size=(streams, per, c))
        return [Batch(f"s{s}", ts, (mean + 0.5 * std * noise[s]).astype(np.float32),
                      source="bench") for s in range(streams)]

    k = 0
    while k < 1200:       # the learning period (400 samples), then adaptation's first epochs
        eng.step(step_at(k))
        k += per
    steps = [step_at(k + i * per) for i in range(max(SAMPLES // (streams * per), 2))]
    c0 = time.process_time()
    for b in steps:
        eng.step(b)
    return (time.process_time() - c0) * 1e6 / (len(steps) * streams)


def child(model: str) -> None:
    for streams, per in SHAPES:
        print(f"{streams}x{per} {time_shape(streams, per, model):.1f}", flush=True)


def fit(rows: dict[tuple[int, int], float]) -> tuple[float, float]:
    """(fixed µs per stream-step, µs per sample) by least squares over the shapes of 10 or
    more samples per step (a one-sample step takes shortcuts of its own)."""
    import numpy as np
    shapes = [sp for sp in rows if sp[1] >= 10]
    p = np.array([per for _, per in shapes], float)
    y = np.array([rows[sp] for sp in shapes])
    a = np.stack([np.ones_like(p), p], axis=1)
    fixed, per_sample = np.linalg.lstsq(a, y, rcond=None)[0]
    return float(fixed), float(per_sample)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(ap, REPO)
    ap.add_argument("--model", default="DLinear_ad")
    a = ap.parse_args()
    if a.child:
        child(a.model)
        return
    runs: list[tuple[str, dict[tuple[int, int], float]]] = []
    for name, run in alternate(__file__, checkouts(a), a.rounds, ["--model", a.model]):
        runs.append((name, {tuple(map(int, shape.split("x"))): us for shape, us in run}))
    print(f"engine.step, {a.model}: CPU µs per stream-step (per sample); one row per run")
    print(f"{'checkout':>12} " + " ".join(f"{f'{s}x{p}':>16}" for s, p in SHAPES)
          + f" {'fixed':>7} {'per sample':>10}")
    for name, rows in runs:
        fixed, per_sample = fit(rows)
        print(f"{name:>12} " + " ".join(
            f"{f'{rows[sp]:.1f} ({rows[sp] / sp[1]:.2f})':>16}" for sp in SHAPES)
            + f" {fixed:>7.1f} {per_sample:>10.2f}")


if __name__ == "__main__":
    main()

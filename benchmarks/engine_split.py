"""Where the engine's time goes, per window: ONNX Runtime against each part around it.

    python benchmarks/engine_split.py [--models AutoEncoder_ad,DLinear_ad] [--rows 20000]

For each model, pinned to one core, the engine runs as `bench_runtime.py` drives it:
replay's pattern (one stream, stepped as `evaluate` and `replay` step a file) and the
daemon's (50 streams, 2 samples a step).  Each part's wall time is summed by a timing
wrapper around its method and reported in µs per window (replay) or per sample (daemon),
nested as the calls nest.  `unwrapped` is `Engine.step` timed alone in a run without the
wrappers, so the difference from `engine step` is the wrappers' own cost.  bench_runtime's
target (pipeline ÷ bare ORT ≤ 1.5) leaves everything outside ORT's run half of its time;
this shows which parts hold the rest.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_runtime import BenchEngine, engine_run, long_csv  # noqa: E402  beside this script

from agent.adaptation import Adapter  # noqa: E402
from agent.alerts import AlertTracker  # noqa: E402
from agent.detector import Detector  # noqa: E402
from agent.engine import Engine  # noqa: E402
from agent.jobs import CHUNK  # noqa: E402
from agent.ring import RingBuffer  # noqa: E402
from agent.scoring import Smoother  # noqa: E402
from agent.shipped import resolve_model  # noqa: E402
from agent.stream import Stream  # noqa: E402

# (label, class, method), parents before their parts
PARTS = [("engine step", Engine, "step"),
         ("  model (Detector.infer)", Detector, "infer"),
         ("    ORT run", Detector, "_run"),
         ("  ingest (Stream.ingest)", Stream, "ingest"),
         ("    ring push", RingBuffer, "push"),
         ("  conclude (Stream.conclude)", Stream, "conclude"),
         ("    alert tracker", AlertTracker, "update"),
         ("    smoother", Smoother, "update"),
         ("    adaptation (Adapter.observe)", Adapter, "observe")]


class Timers:
    """Wall time per part while installed; the methods are restored on exit."""

    def __init__(self):
        self.total = collections.Counter()
        self._saved = []

    def __enter__(self):
        for label, cls, name in PARTS:
            f = cls.__dict__[name]
            self._saved.append((cls, name, f))
            setattr(cls, name, self._timed(label, f))
        return self

    def __exit__(self, *exc):
        for cls, name, f in self._saved:
            setattr(cls, name, f)

    def _timed(self, label, f):
        total, clock = self.total, time.perf_counter

        def timed(*args, **kwargs):
            t = clock()
            try:
                return f(*args, **kwargs)
            finally:
                total[label] += clock() - t
        return timed


def daemon_run(csv: Path, det: Detector, streams: int = 50, per: int = 2) -> tuple[int, float]:
    """(samples, seconds of Engine.step) after learning and a warm window, as bench_runtime's
    daemon pattern steps them."""
    b = BenchEngine(csv, streams, det)
    warm = 400 + 2 * det.meta.window
    b.run((a, a + per) for a in range(0, warm, per))
    n0, t0 = b.metrics.samples_in, time.perf_counter()
    b.run((a, min(a + per, len(b.t.ts))) for a in range(warm, len(b.t.ts), per))
    return b.metrics.samples_in - n0, time.perf_counter() - t0


def report(title: str, unit: str, n: int, plain_us: float, timers: Timers) -> None:
    """`n` units timed by `timers`; `plain_us`: the unwrapped step's µs per unit."""
    print(f"  {title}: µs per {unit}")
    print(f"    {'unwrapped engine step':<36} {plain_us:7.2f}")
    for label, _, _ in PARTS:
        v = timers.total[label] * 1e6 / n
        share = 100 * timers.total[label] / timers.total["engine step"]
        print(f"    {label:<36} {v:7.2f}  {share:5.1f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="AutoEncoder_ad,DLinear_ad")
    ap.add_argument("--rows", type=int, default=20000)
    a = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    with tempfile.TemporaryDirectory() as tmp:
        csv = long_csv(a.rows, Path(tmp))
        csv_daemon = long_csv(max(a.rows // 8, 2000), Path(tmp))
        for name in a.models.split(","):
            det = Detector(str(resolve_model(name)), threads=1)
            print(f"{name} (max_batch {det.max_batch}, chunks of {CHUNK} rows)")
            engine_run(csv, 1, det)          # warm caches
            n, plain = engine_run(csv, 1, det)
            with Timers() as t:
                n_t, _ = engine_run(csv, 1, det)
            report("replay, one stream", "window", n_t, plain * 1e6 / n, t)
            n, plain = daemon_run(csv_daemon, det)
            with Timers() as t:
                n_t, _ = daemon_run(csv_daemon, det)
            report("daemon, 50 streams x 2 samples a step", "sample", n_t, plain * 1e6 / n, t)


if __name__ == "__main__":
    main()

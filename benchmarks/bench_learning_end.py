"""The longest engine step when many streams end their learning periods together.

Streams that start together (a boot, a fleet of new sensors) end their learning periods in
the same step.  Each fit scores every window of its held samples, so fitting them all in
one step makes that step as long as all of them together, and the daemon's main loop (which
feeds the systemd watchdog, WatchdogSec=30s in systemd/tsad-agent.service) stops that long.
The engine fits while a step's fits took under fit_budget.FIT_SECONDS.  This runs S streams
of the demo recording, 10 samples a step, through their learning period of L samples, in
one process, with that bound and without it (FIT_SECONDS = inf), and reports the longest
step.

    python benchmarks/bench_learning_end.py                        # DLinear_ad, 500 x 400
    python benchmarks/bench_learning_end.py --model TimesNet_ad --streams 100 --samples 1800
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import agent.engine as engine_mod  # noqa: E402
import agent.fit_budget as fit_budget  # noqa: E402
from agent.contract import read_table  # noqa: E402
from agent.detector import Detector  # noqa: E402
from agent.jobs import detection_config  # noqa: E402
from agent.metrics import Metrics  # noqa: E402
from agent.shipped import resolve_model  # noqa: E402
from agent.sources.base import Batch  # noqa: E402
from bench_runtime import long_csv  # noqa: E402

PER_STEP = 10


def longest_step(det: Detector, table, streams: int, samples: int) -> tuple[float, int]:
    """(the longest step in seconds, steps run) for `streams` streams stepped together
    from their first sample until every one has learned and scored 200 more samples."""
    m = Metrics()
    det.metrics = m
    e = engine_mod.Engine(detection_config(det.meta, samples, node="bench"), det, metrics=m,
                          default_max_streams=streams)
    worst, steps = 0.0, 0
    ts, values = table.ts, table.values
    for a in range(0, samples + 200, PER_STEP):
        t0 = time.perf_counter()
        e.step([Batch(f"s{i}", ts[a:a + PER_STEP], values[a:a + PER_STEP])
                for i in range(streams)])
        worst, steps = max(worst, time.perf_counter() - t0), steps + 1
    while e.held_back:      # the daemon steps at once while fits wait (pipeline.run)
        t0 = time.perf_counter()
        e.step([])
        worst, steps = max(worst, time.perf_counter() - t0), steps + 1
    assert not any(st.baseline.learning for st in e.streams.values())
    return worst, steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="DLinear_ad")
    ap.add_argument("--streams", type=int, default=500)
    ap.add_argument("--samples", type=int, default=400, help="learning period, samples")
    a = ap.parse_args()
    det = Detector(str(resolve_model(a.model)), threads=1, max_batch=64)
    with tempfile.TemporaryDirectory() as tmp:
        table = read_table(long_csv(a.samples + 400, Path(tmp)), det.meta.channels)
    bound = fit_budget.FIT_SECONDS
    print(f"{a.model}: {a.streams} streams learning {a.samples} samples together, "
          f"{PER_STEP} samples a step")
    for fit in (float("inf"), bound):
        fit_budget.FIT_SECONDS = fit
        worst, steps = longest_step(det, table, a.streams, a.samples)
        label = "one step (no bound)" if fit != bound else f"FIT_SECONDS {bound}"
        print(f"  {label:<22} longest step {worst:7.3f} s over {steps} steps")
    fit_budget.FIT_SECONDS = bound


if __name__ == "__main__":
    main()

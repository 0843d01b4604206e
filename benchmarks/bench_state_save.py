"""How long saving baselines holds up the detection thread.

Each stream's baseline file is written atomically with two fsyncs (agent/state_store.py).
This builds an engine with N learned streams (DLinear_ad's policy, learning and
adaptation) and times, in the calling thread (in the daemon, the pipeline thread):
  * `engine.save_baselines()`: every stream at once, what a clean stop or a reload does
    (and what the periodic save and a shared end of learning did before agent/saving.py);
  * the periodic save as the daemon now makes it, every stream due, then
    `engine.saves.run` as after each engine step: the longest such wait, and how many
    steps it takes to write them all.
`--fsync-ms` adds a sleep to every fsync, a stand-in for a disk slower than this
machine's (an SD card's fsync takes milliseconds to tens of them); 0 = the real disk.

    python benchmarks/bench_state_save.py [--streams 50,500] [--fsync-ms 0,10]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.detector import Detector  # noqa: E402
from agent.engine import Engine  # noqa: E402
from agent.jobs import detection_config  # noqa: E402
from agent.shipped import resolve_model  # noqa: E402
from agent.sources.base import Batch  # noqa: E402
from agent.state_store import StateStore  # noqa: E402


def learned_engine(det: Detector, streams: int) -> Engine:
    eng = Engine(detection_config(det.meta), det, default_max_streams=streams)
    rng = np.random.default_rng(0)
    mean, std = np.asarray(det.meta.scaler.mean), np.asarray(det.meta.scaler.std)
    ts = 1.7e9 + np.arange(600, dtype=np.float64)
    for s in range(streams):
        v = (mean + 0.5 * std * rng.normal(size=(600, len(mean)))).astype(np.float32)
        eng.step([Batch(f"s{s}", ts, v, source="bench")])
    return eng


def timed_save(eng: Engine, state_dir: str) -> tuple[float, float, int]:
    """(seconds in save_baselines, longest saves.run, saves.run calls to write them all)."""
    eng.store = StateStore(state_dir)
    t0 = time.perf_counter()
    eng.save_baselines()
    all_at_once = time.perf_counter() - t0
    eng.saves.due_all(eng.streams)
    longest, steps = 0.0, 0
    while len(eng.saves):
        t0 = time.perf_counter()
        eng.saves.run(eng.save)
        longest, steps = max(longest, time.perf_counter() - t0), steps + 1
    return all_at_once, longest, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="50,500")
    ap.add_argument("--fsync-ms", default="0,10")
    a = ap.parse_args()
    det = Detector(str(resolve_model("DLinear_ad")), threads=1)
    real_fsync = os.fsync
    print(f"{'streams':>7} {'fsync +ms':>9} {'all at once':>12} | {'a step waits at most':>20} "
          f"{'steps':>6}")
    for n in map(int, a.streams.split(",")):
        eng = learned_engine(det, n)
        for extra in map(float, a.fsync_ms.split(",")):
            def fsync(fd, _s=extra / 1e3):
                real_fsync(fd)
                time.sleep(_s)
            os.fsync = fsync
            try:
                with tempfile.TemporaryDirectory() as d:
                    once, longest, steps = timed_save(eng, d)
            finally:
                os.fsync = real_fsync
            print(f"{n:7d} {extra:9g} {once * 1e3:9.1f} ms | {longest * 1e3:17.1f} ms "
                  f"{steps:6d}", flush=True)


if __name__ == "__main__":
    main()

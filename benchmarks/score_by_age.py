"""When does a normal run come closest to the threshold?  Scores by time since learning.

    python benchmarks/score_by_age.py [FILE ...] [--models DLinear_ad,...] [--block-min 20]

Each normal recording is replayed as one deployed stream through the engine, with each
model's own policy as `tsad-agent evaluate` runs it (learning on its first rows, then
adaptation).  Its smoothed scores, divided by the stream's threshold, are summarised per
block of time since the first scored window: median, 99th percentile and maximum.  A
policy's margin (`tsad-agent fit-policy`) is set by the block that comes closest to 1; this
shows which one that is (a warm-up right after learning, or a late excursion), which a
single alert count cannot.  Default file: SKAB's anomaly-free run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.contract import read_table  # noqa: E402
from agent.detector import Detector  # noqa: E402
from agent.engine import Engine  # noqa: E402
from agent.jobs import detection_config, run_table  # noqa: E402
from agent.model_meta import PADDLEX_MODELS  # noqa: E402
from agent.shipped import resolve_model  # noqa: E402

FREE = REPO.parent / "shared" / "data" / "skab" / "anomaly-free" / "anomaly-free.csv"


def by_age(path: Path, model: str, block_s: float) -> list[tuple[float, int, float, float, float]]:
    """(block start in minutes, windows, median, p99, max of score / threshold) per block."""
    det = Detector(resolve_model(model))
    t = read_table(path, det.meta.channels)
    rec = run_table(Engine(detection_config(det.meta), det), "s", t.ts, t.values)
    tb = rec.table("s")
    rel = tb["score"] / tb["threshold"]
    block = ((tb["ts"] - tb["ts"][0]) // block_s).astype(int)
    out = []
    for b in np.unique(block):
        r = rel[block == b]
        out.append((b * block_s / 60, len(r), float(np.median(r)), float(np.quantile(r, 0.99)),
                    float(r.max())))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, default=[FREE])
    ap.add_argument("--models", default=",".join(PADDLEX_MODELS))
    ap.add_argument("--block-min", type=float, default=20.0)
    a = ap.parse_args()
    missing = [str(f) for f in a.files if not f.is_file()]
    if missing:
        print(f"not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    for f in a.files:
        print(f"{f.name}: score / threshold by minutes since the first scored window")
        print(f"{'model':<17} {'from min':>8} {'windows':>7} {'median':>6} {'p99':>5} {'max':>5}")
        for model in a.models.split(","):
            for start, n, med, p99, top in by_age(f, model, a.block_min * 60):
                print(f"{model:<17} {start:>8.0f} {n:>7} {med:>6.2f} {p99:>5.2f} {top:>5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does a stream stay quiet wherever in normal running its learning period starts?

    python benchmarks/learning_start.py [FILE] [--models DLinear_ad,...] [--every 1000] [--learn ROWS]

A daemon learns its baseline whenever it is started (or re-baselined), not at the start
of a recording.  Each model's shipped margin was fitted (`tsad-agent fit-policy`) on the
normal recording learning on its first rows only.  Here the same recording is replayed
once per start row (0, every, 2 x every, ... while the learning period and an hour after
it fit): the stream learns on the rows from there, with the model's own policy, and runs
to the file's end.  Reported per model: the alerts and the share of running rows with an
alert open from each start, and over all starts the alerts per hour of running.  Normal
data only; no labeled file is read.  Default file: SKAB's anomaly-free run.  `--learn`
replaces the policy's learning period (rows), the rest of the policy and its margin kept:
what a deployment that learns for longer than the SKAB protocol's 400 rows would see.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.contract import read_table  # noqa: E402
from agent.detector import Detector  # noqa: E402
from agent.engine import Engine  # noqa: E402
from agent.jobs import (detection_config, long_run, model_learning_rows,  # noqa: E402
                        rows_prediction, run_table)
from agent.model_meta import PADDLEX_MODELS  # noqa: E402
from agent.shipped import resolve_model  # noqa: E402

FREE = REPO.parent / "shared" / "data" / "skab" / "anomaly-free" / "anomaly-free.csv"


def from_start(det: Detector, ts, values, start: int, learning: int) -> dict:
    """The stream that learns `learning` rows from row `start`: long_run's figures over its
    running rows."""
    t, v = ts[start:], values[start:]
    rec = run_table(Engine(detection_config(det.meta, learning), det), "s", t, v)
    return long_run(t[learning:], rows_prediction(t, rec.table("s"), "alert")[learning:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", nargs="?", default=str(FREE))
    ap.add_argument("--models", default=",".join(PADDLEX_MODELS))
    ap.add_argument("--every", type=int, default=1000, help="rows between start rows")
    ap.add_argument("--learn", type=int, default=None,
                    help="learning period in rows (default: the model's policy)")
    a = ap.parse_args()
    if not Path(a.file).exists():
        print(f"{a.file} not found (SKAB lives in ../shared/data/skab)", file=sys.stderr)
        return 2
    for name in a.models.split(","):
        det = Detector(str(resolve_model(name)), threads=1)
        learning = a.learn or model_learning_rows(det.meta) or 0
        t = read_table(a.file, det.meta.channels)
        # a start counts when an hour of running follows its learning period
        starts = [s for s in range(0, len(t.ts), a.every)
                  if s + learning < len(t.ts) and t.ts[-1] - t.ts[s + learning] >= 3600]
        runs = [from_start(det, t.ts, t.values, s, learning) for s in starts]
        alerts, hours = sum(r["alerts"] for r in runs), sum(r["hours"] for r in runs)
        quiet = sum(r["alerts"] == 0 for r in runs)
        print(f"{name}: learning {learning} rows; {quiet} of {len(runs)} starts quiet; "
              f"{alerts} alerts in {hours:.1f} h ({alerts / hours:.2f} per hour)")
        print("  start row: alerts, rows with an alert open  " + "  ".join(
            f"{s}: {r['alerts']}, {100 * r['alert_open_share']:.1f}%"
            for s, r in zip(starts, runs)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

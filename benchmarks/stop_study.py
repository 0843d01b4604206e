"""A planned stop cut into SKAB's normal run, with and without `running:`.

    python benchmarks/stop_study.py [--models DLinear_ad,...] [--stop-min 60] [--out DIR]

SKAB's anomaly-free run (9,405 rows at about 1 Hz) is split after row 4,000 and a stop is
cut in: flow, current and vibration near zero, pressure at zero, the voltage as recorded,
the two temperatures cooling towards ambient (time constant 15 min).  When the pump runs
again the recording goes on, its temperatures starting from where they cooled to and
warming back with a 10-minute time constant.  The stop is made up (SKAB has none), so the
figures say what the gate does with a stop, not how a real pump stops.

Each model replays the file as one stream with its own policy (as `tsad-agent evaluate`),
three ways: every sample judged; `running: Current > 0.2` (SKAB's pump draws at least
0.36 A while running); and that with `start_s: 1800`.  Printed: the share of scored rows
with an alert open and the alerts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.contract import read_table  # noqa: E402
from agent.detector import Detector  # noqa: E402
from agent.engine import Engine  # noqa: E402
from agent.jobs import detection_config, long_run, rows_prediction, run_table  # noqa: E402
from agent.model_meta import PADDLEX_MODELS  # noqa: E402
from agent.policy import learning_rows  # noqa: E402
from agent.shipped import resolve_model  # noqa: E402

NORMAL = REPO.parent / "shared" / "data" / "skab" / "anomaly-free" / "anomaly-free.csv"
CUT = 4000
WAYS = {"every sample": None,
        "Current > 0.2": {"channel": "Current", "above": 0.2},
        "Current > 0.2, start_s 1800": {"channel": "Current", "above": 0.2, "start_s": 1800.0}}


def with_stop(stop_s: int, seed: int = 0) -> pd.DataFrame:
    d = pd.read_csv(NORMAL, sep=";", parse_dates=["datetime"])
    rng = np.random.default_rng(seed)
    a, b = d.iloc[:CUT].copy(), d.iloc[CUT:].copy()
    last, n = a.iloc[-1], stop_s
    cool = np.exp(-np.arange(1, n + 1) / 900.0)
    st = pd.DataFrame({"datetime": last.datetime + pd.to_timedelta(np.arange(1, n + 1), "s")})
    for ch, level, noise in (("Accelerometer1RMS", 0.005, 0.001), ("Accelerometer2RMS", 0.005, 0.001),
                             ("Current", 0.02, 0.005), ("Pressure", 0.0, 0.01),
                             ("Volume Flow RateRMS", 0.0, 0.2)):
        st[ch] = level + noise * rng.standard_normal(n)
    st["Temperature"] = 60.0 + (last.Temperature - 60.0) * cool
    st["Thermocouple"] = 22.0 + (last.Thermocouple - 22.0) * cool
    st["Voltage"] = d.Voltage.to_numpy()[np.arange(n) % len(d)]
    b["datetime"] = b.datetime + pd.Timedelta(seconds=n + 1)
    warm = np.exp(-np.arange(len(b)) / 600.0)
    for ch in ("Temperature", "Thermocouple"):
        b[ch] = b[ch] + (st[ch].iloc[-1] - b[ch].iloc[0]) * warm
    out = pd.concat([a, st, b])[d.columns]
    out["datetime"] = out.datetime.dt.strftime("%Y-%m-%d %H:%M:%S")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(PADDLEX_MODELS))
    ap.add_argument("--stop-min", type=float, default=60.0)
    ap.add_argument("--out", default="/tmp/stop_study", help="where the made-up file goes")
    a = ap.parse_args()
    if not NORMAL.exists():
        sys.exit(f"needs {NORMAL} (SKAB)")
    path = Path(a.out) / "stop.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with_stop(int(a.stop_min * 60)).to_csv(path, sep=";", index=False)
    print(f"{path}: a {a.stop_min:g}-minute stop after row {CUT}")
    print("| model | judged | rows with an alert open | alerts |\n|---|---|---|---|")
    for m in a.models.split(","):
        det = Detector(resolve_model(m))
        t = read_table(path, det.meta.channels)
        for way, running in WAYS.items():
            over = {"running": running} if running else None
            e = Engine(detection_config(det.meta, overrides=over), det)
            tab = run_table(e, "s", t.ts, t.values).table("s")
            skip = learning_rows(e.cfg)      # as evaluate: the rows after the learning period
            r = long_run(t.ts[skip:], rows_prediction(t.ts, tab, "alert")[skip:])
            print(f"| {m} | {way} | {100 * r['alert_open_share']:.2f} % | {r['alerts']} |")


if __name__ == "__main__":
    main()

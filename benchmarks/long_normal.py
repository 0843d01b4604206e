"""Months of normal running: what the operator of a healthy plant lives with.

    python -m export.recipes.tep_data --out runs/tep --sets months --workers 2
    python benchmarks/long_normal.py [--data runs/tep] [--models models_onnx/tep] [--out months.json]
                                     [--season STDS]

Each 90-day fault-free Tennessee Eastman run of the MONTHS set (seeds never used to
train, fit or choose anything) is replayed as one deployed stream through the engine,
with each model's own policy as `tsad-agent evaluate` runs it, beside the PCA T² and Q
references fitted on the TRAIN runs (one alarm per row over its 99 % limit).  Per
detector and run: the alerts opened (per day, and in each 30-day month), the share of
rows with an alert open and the longest alert.  For the models also: how far adaptation
has moved the baseline from the learned one at the end of each month (the largest
channel's shift, in learned stds).  An alert rate that grows month after month, or a
baseline that walks away, would show here; the 7-day runs of tep_report.py cannot.

The simulated plant has no seasons.  `--season STDS` adds them where a real plant meets
them first, in the two cooling-water outlet temperatures: a quarter of a yearly cycle
(rising to STDS of the channel's learned std at day 90) and a daily cycle of DAILY_STDS.
Added to the measurements after the simulation (the controllers do not react), as a
change of cooling-water temperature that the plant absorbs would look to the sensors.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent.contract import read_table  # noqa: E402
from agent.detector import Detector  # noqa: E402
from agent.engine import Engine  # noqa: E402
from agent.jobs import detection_config, long_run, rows_prediction, run_table  # noqa: E402
from agent.model_meta import PADDLEX_MODELS, load_meta  # noqa: E402
from export.recipes.tep_data import TRAIN, classic52  # noqa: E402
from export.reference import fit_pca_files  # noqa: E402

DAY_S = 86400.0
MONTH_S = 30 * DAY_S
STREAM = "plant"
SEASON_CHANNELS = ("measurement.reactor_cooling_water_outlet_temperature_meas",
                   "measurement.condenser_cooling_water_outlet_temperature")
DAILY_STDS = 1.0


def with_season(ts: np.ndarray, values: np.ndarray, channels: list[str], std: np.ndarray,
                season: float) -> np.ndarray:
    """values with the --season drift added (see the module docstring)."""
    t = ts - ts[0]
    drift = season * np.sin(0.5 * np.pi * t / (90 * DAY_S)) + DAILY_STDS * np.sin(2 * np.pi * t / DAY_S)
    out = values.copy()
    for name in SEASON_CHANNELS:
        c = channels.index(name)
        out[:, c] += (drift * std[c]).astype(out.dtype)
    return out


def alert_figures(ts: np.ndarray, pred: np.ndarray) -> dict:
    """long_run's figures, the alerts opened in each 30-day month and the longest alert."""
    out = long_run(ts, pred)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], pred.astype(np.int8), [0]])))
    starts, ends = edges[::2], edges[1::2]
    month = ((ts[starts] - ts[0]) // MONTH_S).astype(int) if len(starts) else np.array([], int)
    months = int((ts[-1] - ts[0]) // MONTH_S) + 1 if len(ts) else 0
    out["alerts_by_month"] = np.bincount(month, minlength=months).tolist()
    # an alert open on rows a..b-1 lasts until row b (or the last row's time)
    ends_ts = ts[np.minimum(ends, len(ts) - 1)]
    out["longest_alert_h"] = float((ends_ts - ts[starts]).max() / 3600) if len(starts) else 0.0
    return out


def model_run(detector: Detector, ts: np.ndarray, values: np.ndarray) -> dict:
    """One run through a fresh engine, a month at a time, so that the baseline's shift
    can be read at each month's end."""
    engine = Engine(detection_config(detector.meta, None), detector)
    preds, shifts = [], []
    bounds = np.searchsorted(ts, np.arange(ts[0], ts[-1] + MONTH_S, MONTH_S))
    for a, b in zip(bounds[:-1], bounds[1:]):
        rec = run_table(engine, STREAM, ts[a:b], values[a:b])
        preds.append(rows_prediction(ts[a:b], rec.table(STREAM), "alert"))
        adapter = engine.streams[STREAM].adapter
        shifts.append(None if adapter is None else float(np.abs(adapter.shift()).max()))
    fig = alert_figures(ts, np.concatenate(preds))
    fig["baseline_shift_by_month"] = shifts
    return fig


def pooled(runs: list[dict]) -> dict:
    days = sum(r["hours"] for r in runs) / 24
    rows = sum(r["rows"] for r in runs)
    months = [sum(m) for m in zip(*(r["alerts_by_month"] for r in runs))]
    return {"days": days, "alerts": sum(r["alerts"] for r in runs),
            "alerts_per_day": sum(r["alerts"] for r in runs) / days if days else None,
            "alert_open_share": sum(r["alert_open_share"] * r["rows"] for r in runs) / rows,
            "alerts_by_month": months,
            "longest_alert_h": max(r["longest_alert_h"] for r in runs)}


def table(results: dict[str, dict]) -> str:
    lines = ["| detector | days | alerts (per day) | alerts in month 1 / 2 / 3 | rows with an alert "
             "open | longest alert | baseline shift at month ends, largest channel (stds) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        p = r["pooled"]
        # per month, the largest over the runs (PCA has none; a model without adaptation None)
        shifts = [run["baseline_shift_by_month"] for run in r["runs"].values()
                  if run.get("baseline_shift_by_month")]
        shift = "-" if not shifts or shifts[0][0] is None else " / ".join(
            f"{max(month):.2f}" for month in zip(*shifts))
        lines.append(f"| {name} | {p['days']:.0f} | {p['alerts']} ({p['alerts_per_day']:.2f}) | "
                     f"{' / '.join(map(str, p['alerts_by_month']))} | "
                     f"{100 * p['alert_open_share']:.2f} % | {p['longest_alert_h']:.1f} h | {shift} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/tep")
    ap.add_argument("--models", default="models_onnx/tep")
    ap.add_argument("--only", nargs="+", default=PADDLEX_MODELS)
    ap.add_argument("--out", help="JSON with every figure")
    ap.add_argument("--season", type=float, default=0.0,
                    help="seasonal drift at day 90, in learned stds (module docstring)")
    a = ap.parse_args(argv)
    data = Path(a.data)
    manifest = json.loads((data / "manifest.json").read_text())
    files = [data / e["file"] for e in manifest["files"] if e["set"] == "months"]
    if not files:
        print(f"long_normal: no MONTHS runs in {data}: python -m export.recipes.tep_data "
              f"--out {data} --sets months", file=sys.stderr)
        return 1
    channels = classic52()
    # the models' scalers are all learned on TRAIN: any one gives the channels' stds
    std = np.asarray(load_meta(Path(a.models) / f"{a.only[0]}.onnx").scaler.std)
    tables = {}
    for p in files:
        t = read_table(p, channels)
        tables[p.name] = (t.ts, with_season(t.ts, t.values, channels, std, a.season)
                          if a.season else t.values)
    results: dict[str, dict] = {}
    for name in a.only:
        det = Detector(str(Path(a.models) / f"{name}.onnx"))
        if list(det.meta.channels) != channels:
            raise SystemExit(f"{name}: its channels are not classic52 in order")
        runs = {n: model_run(det, ts, values) for n, (ts, values) in tables.items()}
        results[name] = {"runs": runs, "pooled": pooled(list(runs.values()))}
        print(f"{name}: {results[name]['pooled']}", file=sys.stderr)
    ref = fit_pca_files([data / s.name for s in TRAIN], channels)
    alarms = {n: ref.alarms(values) for n, (_, values) in tables.items()}
    for stat in ("t2", "q"):
        runs = {n: alert_figures(tables[n][0], al[stat]) for n, al in alarms.items()}
        results[f"PCA-{stat.upper()}"] = {"runs": runs, "pooled": pooled(list(runs.values()))}
    print(table(results))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

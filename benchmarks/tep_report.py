"""Tennessee Eastman report: the TEP models through the live pipeline, beside PCA T² and Q.

    python benchmarks/tep_report.py [--data runs/tep] [--models models_onnx/tep] [--set test]
                                    [--learn N] [--settings JSON] [--out report.json]

Every file of the chosen seed set (export/recipes/tep_data.py) is replayed through
the engine as `tsad-agent evaluate` does, with each model's own policy (or --learn and
--settings over it); a row counts as flagged while an alert is open, as known at that
row.  The PCA
references (export/reference.py) are fitted on the TRAIN runs and alarm per row.
Per fault (mean over its seeds): detection rate = flagged share of the post-onset rows;
delay = minutes from the onset to the first flagged row at or after it (median over
seeds; '-' when no seed is flagged).  Pre-onset FAR: flagged share of all pre-onset rows
of the fault runs after the learning period.  Fault-free 7-day runs:
alerts opened per simulated day and the flagged share of their rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent.detector import Detector  # noqa: E402
from agent.evaluate import predict_file  # noqa: E402
from agent.jobs import detection_config, rows_prediction  # noqa: E402
from agent.model_meta import PADDLEX_MODELS  # noqa: E402
from agent.policy import learning_rows  # noqa: E402
from export.recipes.tep_data import FAULT_FREE, FAULTS, SAMPLING_MIN, SETS, TRAIN, classic52  # noqa: E402
from export.reference import fit_pca_files  # noqa: E402

DETECTED = 0.5       # a fault a reference "detects": rate >= this


def model_rows(path: Path, detector: Detector, cfg) -> np.ndarray:
    table, row_ts, _ = predict_file(path, detector, cfg)
    return rows_prediction(row_ts, table, "alert")


def file_metrics(pred: np.ndarray, labels: np.ndarray, skip: int) -> dict:
    pred, labels = pred.astype(bool), labels.astype(bool)
    keep = np.arange(len(pred)) >= skip
    post, pre = labels & keep, ~labels & keep
    onset = int(np.argmax(labels)) if labels.any() else None
    hits = np.flatnonzero(pred & labels)
    opened = int(np.sum(pred[keep][1:] & ~pred[keep][:-1]) + bool(pred[keep][:1].any()))
    return {"rate": float(pred[post].mean()) if post.any() else None,
            "pre_flagged": int(pred[pre].sum()), "pre_rows": int(pre.sum()),
            "delay_min": None if onset is None or not len(hits)
            else float((hits[0] - onset) * SAMPLING_MIN),
            "opened": opened, "rows": int(keep.sum())}


def summarize(per_file: dict[str, list[dict]], week: list[dict]) -> dict:
    faults = {}
    for f in FAULTS:
        runs = per_file.get(f, [])
        if not runs:
            continue
        delays = [r["delay_min"] for r in runs if r["delay_min"] is not None]
        faults[f] = {"rate": float(np.mean([r["rate"] for r in runs])),
                     "delay_min": float(np.median(delays)) if delays else None}
    pre = [r for runs in per_file.values() for r in runs]
    days = sum(r["rows"] for r in week) * SAMPLING_MIN / 60 / 24
    return {"faults": faults,
            "mean_rate": float(np.mean([v["rate"] for v in faults.values()])) if faults else None,
            "pre_far": sum(r["pre_flagged"] for r in pre) / max(1, sum(r["pre_rows"] for r in pre)),
            "alerts_per_day": sum(r["opened"] for r in week) / days if days else None,
            "week_far": sum(r["pre_flagged"] for r in week) / max(1, sum(r["pre_rows"] for r in week))}


def run_detector(files: list[tuple[dict, Path]], predict, skip: int) -> dict:
    per_file: dict[str, list[dict]] = {}
    week = []
    for entry, path in files:
        pred, labels = predict(path)
        m = file_metrics(pred, labels, skip)
        if entry["fault"] == FAULT_FREE:
            week.append(m)
        else:
            per_file.setdefault(entry["fault"], []).append(m)
    return summarize(per_file, week)


def table(results: dict[str, dict], names: list[str]) -> str:
    refs = [n for n in names if n.startswith("PCA")]
    detectable = [f for f in FAULTS if any(results[r]["faults"].get(f, {}).get("rate", 0) >= DETECTED
                                           for r in refs)]
    lines = ["| fault | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for f in FAULTS:
        cells = []
        for n in names:
            v = results[n]["faults"].get(f)
            if v is None:
                cells.append("")
                continue
            d = "-" if v["delay_min"] is None else f"{v['delay_min']:.0f}"
            cells.append(f"{100 * v['rate']:.0f} % / {d}")
        lines.append(f"| {f} | " + " | ".join(cells) + " |")

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(results[n]) for n in names) + " |")
    row("mean, all 28", lambda r: f"{100 * r['mean_rate']:.1f} %")
    row(f"mean, {len(detectable)} PCA-detected",
        lambda r: f"{100 * np.mean([r['faults'][f]['rate'] for f in detectable]):.1f} %")
    row("pre-onset FAR", lambda r: f"{100 * r['pre_far']:.2f} %")
    row("alerts / day (7-day)", lambda r: "-" if r["alerts_per_day"] is None
        else f"{r['alerts_per_day']:.2f}")
    row("flagged, 7-day", lambda r: f"{100 * r['week_far']:.2f} %")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/tep")
    ap.add_argument("--models", default="models_onnx/tep")
    ap.add_argument("--only", nargs="+", default=PADDLEX_MODELS)
    ap.add_argument("--set", default="test", choices=sorted(SETS))
    ap.add_argument("--learn", type=int, help="learning rows (default: each model's policy)")
    ap.add_argument("--out", help="JSON with every figure")
    ap.add_argument("--settings", default="{}",
                    help="detection settings over each model's policy, JSON by section")
    a = ap.parse_args(argv)
    data = Path(a.data)
    manifest = json.loads((data / "manifest.json").read_text())
    files = [(e, data / e["file"]) for e in manifest["files"] if e["set"] == a.set
             and (e["fault"] != FAULT_FREE or e["hours"] >= 7 * 24)]
    ref = fit_pca_files([data / s.name for s in TRAIN], classic52())
    print(f"PCA: {ref.describe()}", file=sys.stderr)
    alarms = {p: ref.file_alarms(p) for _, p in files}
    over = json.loads(a.settings)
    results, skips = {}, set()
    for name in a.only:
        det = Detector(str(Path(a.models) / f"{name}.onnx"))
        cfg = detection_config(det.meta, a.learn, over)
        skip = learning_rows(cfg)
        skips.add(skip)
        results[name] = run_detector(files, lambda p: (model_rows(p, det, cfg), alarms[p]["labels"]),
                                     skip)
        print(f"{name} done (learning {skip} rows)", file=sys.stderr)
    skip = max(skips) if skips else 0      # the references are scored on the same rows
    for stat in ("t2", "q"):
        results[f"PCA-{stat.upper()}"] = run_detector(
            files, lambda p: (alarms[p][stat], alarms[p]["labels"]), skip)
    print(f"\n### {a.set} set, settings {a.settings}  (rate / delay in minutes)\n")
    print(table(results, list(results)))
    report = {"settings": over, "results": results}
    if a.out:
        Path(a.out).write_text(json.dumps({"pca": ref.describe(), "results": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

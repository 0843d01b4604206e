"""Evaluation through the live path.

Each file is replayed through the daemon's engine (ring buffer -> detector -> scorer
-> alert tracker, `jobs.run_table`), a fresh engine per file, learning its baseline
on the file's first N rows (the model's policy, or --calibration N).  Rows after N are
the test part, and a row counts as flagged while an alert is open (`--by label`: while
its window scores over the threshold).
- Labeled files (an `anomaly` column; SKAB protocol): TP/FP/TN/FN pooled over all
  files' test parts, then F1, FAR and MAR; per labeled event, its detection rate (its
  rows flagged) and delay (from its first row to the first flagged one).
- Every file, labeled or not (a long normal recording): the share of its test rows
  with an alert open, and the alerts that opened, per hour and per day.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DetectionConfig
from .contract import read_table
from .detector import Detector
from .engine import Engine
from .jobs import Recording, detection_config, long_run, rows_prediction, run_table
from .policy import learning_rows
from .stream_status import unscored, unscored_text
from .timestamps import iso_utc

log = logging.getLogger("tsad.evaluate")


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def add(self, truth: np.ndarray, pred: np.ndarray) -> None:
        t, p = truth.astype(bool), pred.astype(bool)
        self.tp += int(np.sum(t & p))
        self.fp += int(np.sum(~t & p))
        self.tn += int(np.sum(~t & ~p))
        self.fn += int(np.sum(t & ~p))

    def summary(self) -> dict:
        """The scores; None where undefined (no labeled rows, no normal ones, nothing
        flagged): a 0 there would read as a measured miss."""
        tp, fp, tn, fn = self.tp, self.fp, self.tn, self.fn
        return {
            "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
            "f1": _ratio(tp, tp + (fp + fn) / 2), "far": _ratio(fp, fp + tn),
            "mar": _ratio(fn, fn + tp), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def predict_file(path: str | Path, detector: Detector, cfg: DetectionConfig,
                 stream: str = "replay") -> tuple[dict, np.ndarray, np.ndarray | None, dict]:
    """One file through a fresh engine: (per-window table, row timestamps, labels or None,
    the windows left unscored: stream_status.unscored)."""
    t = read_table(path, detector.meta.channels)
    engine = Engine(cfg, detector)
    rec = run_table(engine, stream, t.ts, t.values)
    return rec.table(stream), t.ts, t.labels, unscored(engine.streams.get(stream))


def events(ts: np.ndarray, labels: np.ndarray, pred: np.ndarray) -> list[dict]:
    """Each labeled event (a run of label 1): its start, length, the share of its rows with
    an alert open (detection rate) and the delay from its start to the first such row."""
    out = []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], labels.astype(np.int8), [0]])))
    for a, b in zip(edges[::2], edges[1::2]):
        hit = np.flatnonzero(pred[a:b])
        out.append({"start": iso_utc(ts[a]), "rows": int(b - a),
                     "detection_rate": float(pred[a:b].mean()),
                     "delay_s": float(ts[a + hit[0]] - ts[a]) if len(hit) else None})
    return out


def evaluate(files: list[Path], model: str, calibration_rows: int | None = None,
             by: str = "alert", out_dir: Path | None = None, overrides: dict | None = None,
             detector: Detector | None = None) -> dict:
    """Every file through a fresh engine.  Labeled files: pooled counts (SKAB protocol),
    per-event detection rate and delay; every file: its long-run figures.  The rows of
    the learning period (None: the model's policy) are not scored."""
    if out_dir is not None:
        _distinct_outputs(files)
    detector = detector or Detector(model)
    cfg = detection_config(detector.meta, calibration_rows, overrides)
    skip = learning_rows(cfg)
    counts = Counts()
    per_file = []
    for f in files:
        table, row_ts, labels, left = predict_file(f, detector, cfg)
        pred = rows_prediction(row_ts, table, by)
        row = {"file": str(f), **long_run(row_ts[skip:], pred[skip:]), "unscored": left}
        if labels is not None:
            c = Counts()
            c.add(labels[skip:], pred[skip:])
            counts.add(labels[skip:], pred[skip:])
            row.update(c.summary(), events=events(row_ts[skip:], labels[skip:], pred[skip:]))
        per_file.append(row)
        if out_dir is not None:
            _write_prediction(out_dir / _out_name(f), row_ts, pred)
    labeled = [r for r in per_file if "events" in r]
    return {"model": detector.meta.name, "files": len(files), "labeled_files": len(labeled),
            "by": by, "learning_rows": skip, **counts.summary(), "per_file": per_file}


def _out_name(f: Path) -> str:
    return f"{f.parent.name}_{f.stem}.csv"


def _distinct_outputs(files: list[Path]) -> None:
    """ValueError before any work when two inputs would write one --out file."""
    seen: dict[str, Path] = {}
    for f in files:
        other = seen.setdefault(_out_name(f), f)
        if other != f:
            raise ValueError(f"--out: {other} and {f} would both write {_out_name(f)}; "
                             "evaluate them in separate runs")


def _write_prediction(path: Path, row_ts: np.ndarray, pred: np.ndarray) -> None:
    import pandas as pd
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"datetime": pd.to_datetime(row_ts, unit="s").strftime("%Y-%m-%d %H:%M:%S"),
                  "anomaly": pred}).to_csv(path, index=False)


def file_score(path: Path, channels: list[str], rec: Recording, stream: str,
               learning_rows: int) -> dict:
    """One labeled file's scores (the demo): counts after the learning rows, alerts opened
    and closed, and where the labeled rows are."""
    t = read_table(path, channels)
    pred = rows_prediction(t.ts, rec.table(stream), "alert")
    c = Counts()
    c.add(t.labels[learning_rows:], pred[learning_rows:])
    lab = t.labels.nonzero()[0]
    return {**c.summary(), "first_labeled": int(lab.min()), "last_labeled": int(lab.max()),
            "opened": sum(1 for e in rec.events if e["type"] == "new"),
            "closed": sum(1 for e in rec.events if e["type"] == "end")}


def format_summary(r: dict) -> str:
    """The report as text: pooled scores and events of the labeled files, then the long-run
    figures of each unlabeled one."""
    lines = []
    if r["labeled_files"]:
        ev = [e for f in r["per_file"] for e in f.get("events", [])]
        delays = [e["delay_s"] for e in ev if e["delay_s"] is not None]
        lines.append(
            f"{r['model']:<18} files={r['labeled_files']}  P={_num(r['precision'])} "
            f"R={_num(r['recall'])} F1={_num(r['f1'])} FAR={_pct(r['far'])} "
            f"MAR={_pct(r['mar'])}  (TP={r['tp']} FP={r['fp']} TN={r['tn']} FN={r['fn']})")
        lines += [f"{r['model']:<18} {f['file']}: no row scored (no more rows than its "
                  f"learning period, {r['learning_rows']})" for f in r["per_file"]
                  if "events" in f and not f["tp"] + f["fp"] + f["tn"] + f["fn"]]
        lines.append(f"{'':<18} events={len(ev)} detected={len(delays)} median delay="
                     + (f"{np.median(delays):.0f} s" if delays else "-"))
    for f in r["per_file"]:
        if "events" not in f and not f["rows"]:
            lines.append(f"{r['model']:<18} {f['file']}: no row scored (no more rows than its "
                         f"learning period, {r['learning_rows']})")
        elif "events" not in f:
            lines.append(f"{r['model']:<18} {f['file']}: {f['hours']:.1f} h, alert open on "
                         f"{100 * f['alert_open_share']:.2f}% of rows, {f['alerts']} alert(s)"
                         + (f" ({f['alerts_per_day']:.2f}/day)" if f['alerts_per_day'] is not None
                            else ""))
    lines += [f"{r['model']:<18} {f['file']}: {unscored_text(f['unscored'])}"
              for f in r["per_file"] if f["unscored"]["windows"]]
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def evaluation_files(paths: list[Path]) -> list[Path]:
    """The CSV files under the given files and folders (a folder's own, then those of its
    labeled subfolders, as SKAB's root holds them); ValueError when a path is missing or
    nothing is found."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(p.glob("*.csv")) + skab_files(p)
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"{p}: no such file or directory")
    if not files:
        raise ValueError("no CSV files to evaluate")
    return files


def skab_files(root: Path) -> list[Path]:
    """The labeled SKAB files (valve1/, valve2/, and any other labeled folder), sorted."""
    files = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "anomaly-free"):
        files += sorted(d.glob("*.csv"), key=lambda p: (len(p.stem), p.stem))
    return files

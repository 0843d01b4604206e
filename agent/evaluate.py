"""Evaluation through the live path (SKAB protocol).

Each labeled file is replayed through the daemon's engine (ring buffer -> detector ->
scorer -> alert tracker, `jobs.run_table`), a fresh engine per file, learning its
baseline on the file's first N rows.  Rows after N are the test part; TP/FP/TN/FN
are pooled over all files' test parts, then F1, FAR and MAR are computed.
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
from .jobs import Recording, detection_config, rows_prediction, run_table

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
        tp, fp, tn, fn = self.tp, self.fp, self.tn, self.fn
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        return {
            "precision": prec, "recall": rec,
            "f1": tp / (tp + (fp + fn) / 2) if tp + fp + fn else 0.0,
            "far": fp / (fp + tn) if fp + tn else 0.0,
            "mar": fn / (fn + tp) if fn + tp else 0.0,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        }


def predict_file(path: str | Path, detector: Detector, cfg: DetectionConfig,
                 stream: str = "replay") -> tuple[dict, np.ndarray, np.ndarray | None]:
    """One file through a fresh engine: (per-window table, row timestamps, labels or None)."""
    t = read_table(path, detector.meta.channels)
    rec = run_table(Engine(cfg, detector), stream, t.ts, t.values)
    return rec.table(stream), t.ts, t.labels


def evaluate(files: list[Path], model: str, calibration_rows: int = 400, by: str = "alert",
             out_dir: Path | None = None, overrides: dict | None = None,
             detector: Detector | None = None) -> dict:
    detector = detector or Detector(model)
    cfg = detection_config(detector.meta, calibration_rows, overrides)
    counts = Counts()
    per_file = []
    for f in files:
        table, row_ts, labels = predict_file(f, detector, cfg)
        if labels is None:
            raise ValueError(f"{f}: no 'anomaly' column to evaluate against")
        pred = rows_prediction(row_ts, table, by)
        test = slice(calibration_rows, None)
        c = Counts()
        c.add(labels[test], pred[test])
        counts.add(labels[test], pred[test])
        per_file.append({"file": str(f), **c.summary()})
        if out_dir is not None:
            import pandas as pd
            out_dir.mkdir(parents=True, exist_ok=True)
            name = f"{f.parent.name}_{f.stem}.csv"
            pd.DataFrame({
                "datetime": pd.to_datetime(row_ts, unit="s").strftime("%Y-%m-%d %H:%M:%S"),
                "anomaly": pred}).to_csv(out_dir / name, index=False)
    return {"model": detector.meta.name, "files": len(files), "by": by,
            **counts.summary(), "per_file": per_file}


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
    return (f"{r['model']:<18} files={r['files']}  P={r['precision']:.3f} "
            f"R={r['recall']:.3f} F1={r['f1']:.3f} FAR={100 * r['far']:.2f}% "
            f"MAR={100 * r['mar']:.2f}%  (TP={r['tp']} FP={r['fp']} TN={r['tn']} FN={r['fn']})")


def evaluation_files(paths: list[Path]) -> list[Path]:
    """The CSV files under the given files and folders (a folder of folders: SKAB's
    labeled subfolders); ValueError when a path is missing or nothing is found."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += skab_files(p) if any(q.is_dir() for q in p.iterdir()) else sorted(p.glob("*.csv"))
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

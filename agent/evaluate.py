"""Evaluation through the live path (SKAB protocol).

Each labeled file is replayed through the same `Pipeline` as the daemon: replay
source -> ring buffer -> detector -> scorer -> alert tracker, with per-file
calibration on its first N rows.  Rows after N are the test part; TP/FP/TN/FN
are pooled over all files' test parts, then F1, FAR and MAR are computed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import AgentConfig
from .detector import Detector
from .pipeline import Pipeline
from .sinks.record import RecordSink
from .contract import read_table

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


def replay_config(path: str, model: str, calibration_rows: int | None,
                  overrides: dict | None = None, node: str = "replay") -> AgentConfig:
    """The daemon config that replays one file at full speed with no broker and no state."""
    d = {
        "node": node,
        "state_dir": None,
        "model": {"path": model},
        "streams": [{"id": "replay", "source": {"type": "replay", "path": str(path)}}],
        "calibration": {"enabled": calibration_rows is not None,
                        **({"samples": calibration_rows} if calibration_rows else {})},
        "mqtt": {"enabled": False},
        "sinks": {"console": {"enabled": False}},
    }
    for key, val in (overrides or {}).items():
        d[key] = {**d.get(key, {}), **val} if isinstance(val, dict) else val
    return AgentConfig.model_validate(d)


def predict_file(path: str, detector: Detector, cfg: AgentConfig
                 ) -> tuple[RecordSink, np.ndarray, np.ndarray | None]:
    """Replay one file through the pipeline; returns the recorded results, the file's
    row timestamps and its labels (None without an `anomaly` column)."""
    sink = RecordSink()
    p = Pipeline(cfg, [sink], detector=detector)
    p.start()
    p.run(until_exhausted=True)
    p.stop()
    t = read_table(path, detector.meta.channels)
    return sink, t.ts, t.labels


def rows_prediction(row_ts: np.ndarray, rec: dict, by: str) -> np.ndarray:
    """Per-row 0/1 from per-window results; rows without a window (warm-up) are 0."""
    pred = np.zeros(len(row_ts), dtype=np.int8)
    if len(rec["ts"]):
        idx = np.searchsorted(row_ts, rec["ts"])
        ok = (idx < len(row_ts))
        ok[ok] = row_ts[idx[ok]] == rec["ts"][ok]
        pred[idx[ok]] = rec[by][ok].astype(np.int8)
    return pred


def evaluate(files: list[Path], model: str, calibration_rows: int = 400, by: str = "alert",
             out_dir: Path | None = None, overrides: dict | None = None,
             detector: Detector | None = None) -> dict:
    detector = detector or Detector(model)
    counts = Counts()
    per_file = []
    for f in files:
        cfg = replay_config(str(f), model, calibration_rows, overrides)
        sink, row_ts, labels = predict_file(str(f), detector, cfg)
        if labels is None:
            raise ValueError(f"{f}: no 'anomaly' column to evaluate against")
        pred = rows_prediction(row_ts, sink.table("replay"), by)
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


def skab_files(root: Path) -> list[Path]:
    """The labeled SKAB files (valve1/, valve2/, and any other labeled folder), sorted."""
    files = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "anomaly-free"):
        files += sorted(d.glob("*.csv"), key=lambda p: (len(p.stem), p.stem))
    return files

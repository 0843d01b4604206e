"""`tsad-agent predict`: label the rows of CSV files and write PaddleX-style outputs
(`<stem>_res.csv`, `<stem>_res.json`, optionally `<stem>_res.png`) beside each other.
The labelling itself is `agent.prediction.predict`, which the HTTP API shares.
"""
from __future__ import annotations

import json
from pathlib import Path

from .contract import learning_rows_problem
from .detector import Detector, DetectorError
from .prediction import DEFAULT_MAX_GAP, PredictError, Prediction, plot_png, predict


def write_outputs(pred: Prediction, save_path: str | Path, plot: bool = False) -> list[Path]:
    """`<stem>_res.csv`, `<stem>_res.json` and (plot) `<stem>_res.png` under save_path."""
    out = Path(save_path)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{pred.table.path.stem}_res"
    files = [base.with_suffix(".csv"), base.with_suffix(".json")]
    files[0].write_text(pred.result_csv())
    files[1].write_text(json.dumps(pred.result_json(), indent=1) + "\n")
    if plot:
        files.append(base.with_suffix(".png"))
        files[2].write_bytes(plot_png(pred))
    return files


def input_files(path: str | Path) -> list[Path]:
    """A file, or the *.csv files of a folder (sorted); PredictError when there are none."""
    p = Path(path)
    if p.is_dir():
        files = sorted(q for q in p.glob("*.csv") if q.is_file())
        if not files:
            raise PredictError(f"{p}: no *.csv files in this folder")
        return files
    if not p.exists():
        raise PredictError(f"{p}: no such file or folder")
    return [p]


def predict_files(input_path: str | Path, model: str, save_path: str | Path,
                  calibrate: int | None = None, compat: bool = False,
                  max_gap: float = DEFAULT_MAX_GAP, plot: bool = False,
                  report=print, fail=print) -> int:
    """Predict every input file; `report(line)` per file written, `fail(message)` per file
    refused.  Returns how many failed; PredictError/DetectorError when nothing can start."""
    if calibrate is not None and (problem := learning_rows_problem("--calibrate", calibrate)):
        raise PredictError(problem)
    files = input_files(input_path)
    det = Detector(model)
    failed = 0
    for f in files:
        try:
            pred = predict(f, det, calibrate, compat, max_gap)
            out = write_outputs(pred, save_path, plot)
        except (PredictError, DetectorError) as e:
            failed += 1
            fail(str(e))
            continue
        lab = pred.label[pred.rows]
        report(f"{f}: {len(lab)} row(s) written, {int(lab.sum())} anomalous "
               f"(threshold {pred.threshold:.4g}) -> {', '.join(str(o) for o in out)}")
    return failed

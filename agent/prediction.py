"""Label every row of a CSV file (`tsad-agent predict` and the HTTP API's PaddleX endpoint).

Two modes, one input check and one pipeline run each:

sliding (default)
    The file goes through the daemon's engine (`jobs.run_table`: ring buffer
    -> detector -> scorer).  Row t gets the score of the window ENDING at t
    (model_meta.SCORE_DEFINITION: mean over channels of the squared
    reconstruction error at the window's newest step, scaled space, float64)
    and label = score >= threshold: the raw label, not the alert hysteresis
    (`evaluate --by label`).  Rows with no window of their own get label 0 and
    no score: the first window-1 rows, the --calibrate N rows (calibration
    windows only fit the threshold) and windows with unfillable missing values.

paddlex (--paddlex-compat)
    Mirrors PaddleX's TSAdPredictor: TSCutOff keeps the last `window` rows,
    the model reconstructs that ONE window, each of its rows is scored as
    mean_c (recon - x)^2 (GetAnomaly, scaled space) and labelled
    score >= threshold.  Only those rows are output, as PaddleX does.  The
    scaler and threshold are the same as in sliding mode (the model's, or the
    ones calibrated on the first N rows), taken from the same pipeline run.

Input checks (PredictError, one line each): unreadable file, missing channel
columns (named), unreadable or non-increasing timestamps, steps larger than
`max_gap` x the median step (rows treated as consecutive would join unrelated
stretches; PaddleX requires a regular frequency), too few rows.  The default
max_gap of 2.5 lets single dropped samples through: every SKAB recording has
2 s steps among its 1 s ones; 1.5 is the strict regular-frequency check, 0
switches the check off.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contract import read_table, squared_error
from .detector import Detector
from .engine import Engine
from .jobs import detection_config, model_learning_rows, rows_prediction, run_table
from .metrics import Metrics
from .model_meta import SCORE_DEFINITION

DEFAULT_MAX_GAP = 2.5
PADDLEX_SCORE = "paddlex_window_mse_scaled"
STREAM = "file"


class PredictError(ValueError):
    """An input that cannot be predicted on; the message is one line naming the problem."""


@dataclass
class Table:
    path: Path
    times: list[str]        # the input's own timestamp text, or the row number
    ts: np.ndarray          # float64 epoch seconds (row number without a time column)
    values: np.ndarray      # float32 [n, C] in model channel order
    has_time: bool
    channels: list[str]     # the model's channel names, the order of `values`
    labels: np.ndarray | None   # the file's own `anomaly` column (ground truth), if any


@dataclass
class Prediction:
    table: Table
    model: str
    mode: str               # "sliding" | "paddlex"
    window: int
    threshold: float
    calibration_rows: int | None
    score: np.ndarray       # float64 [n], NaN where a row has no score
    label: np.ndarray       # int8 [n]
    rows: slice             # the rows that are output

    def result_csv(self) -> str:
        """`timestamp,label` for the output rows, as PaddleX writes it."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["timestamp", "label"])
        times = self.table.times[self.rows]
        w.writerows(zip(times, self.label[self.rows].tolist()))
        return buf.getvalue()

    def result_json(self) -> dict:
        """Summary plus one {"timestamp", "label", "score"} per output row (score null if none)."""
        s = self.score[self.rows]
        lab = self.label[self.rows]
        return {
            "input_path": str(self.table.path),
            "model": self.model,
            "mode": self.mode,
            "score_definition": SCORE_DEFINITION if self.mode == "sliding" else PADDLEX_SCORE,
            "window": self.window,
            "threshold": self.threshold,
            "calibration_rows": self.calibration_rows,
            "rows": int(len(lab)),
            "anomalous_rows": int(lab.sum()),
            "anomaly": [{"timestamp": t, "label": int(l),
                         "score": float(v) if np.isfinite(v) else None}
                        for t, l, v in zip(self.table.times[self.rows], lab.tolist(), s.tolist())],
        }


# ---------------------------------------------------------------- input
def _check_steps(table: Table, max_gap: float) -> None:
    d = np.diff(table.ts)
    if not len(d):
        return
    back = np.flatnonzero(d <= 0)
    if len(back):
        i = int(back[0])
        raise PredictError(
            f"{table.path}: timestamps do not increase at data rows {i + 1}-{i + 2} "
            f"({table.times[i]!r} then {table.times[i + 1]!r}); {len(back)} such step(s); "
            f"sort the file and remove duplicate times")
    if max_gap <= 0:
        return
    step = float(np.median(d))
    gaps = np.flatnonzero(d > max_gap * step)
    if len(gaps):
        i = int(gaps[0])
        raise PredictError(
            f"{table.path}: irregular timestamps: {d[i]:g} s between data rows {i + 1} and "
            f"{i + 2} ({table.times[i]!r} -> {table.times[i + 1]!r}), median step {step:g} s; "
            f"{len(gaps)} step(s) over {max_gap:g}x the median (--max-gap; 0 = no check)")


def load_table(path: str | Path, channels: list[str], max_gap: float = DEFAULT_MAX_GAP) -> Table:
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"{path}: no such file")
    try:
        t = read_table(path, channels, time_text=True)
    except (OSError, ValueError) as e:   # pandas' parser, decode and empty-file errors included
        msg = " ".join(str(e).split()) or type(e).__name__
        raise PredictError(msg if str(path) in msg else f"{path}: cannot read as CSV: {msg}") from None
    has_time = t.time_text is not None
    times = t.time_text if has_time else [str(i) for i in range(len(t.ts))]
    table = Table(path, times, t.ts, t.values, has_time, list(channels), t.labels)
    _check_steps(table, max_gap)
    return table


# ---------------------------------------------------------------- prediction
def predict(path: str | Path, detector: Detector, calibrate: int | None = None,
            compat: bool = False, max_gap: float = DEFAULT_MAX_GAP,
            metrics: Metrics | None = None) -> Prediction:
    """Score and label one CSV file (see the module doc for the two modes).

    calibrate: None = the model's policy (`jobs.model_learning_rows`), 0 = the model's
    scaler and threshold, N = learn both on the file's first N rows."""
    w = detector.window
    calibrate = model_learning_rows(detector.meta) if calibrate is None else calibrate
    table = load_table(path, detector.meta.channels, max_gap)
    n = len(table.ts)
    need = max(w, (calibrate or 0) + 1)
    if n < need:
        why = (f"window {w}" + (f" after {calibrate} calibration rows; calibrate on fewer "
                                f"or use the model's scaler with calibrate 0" if calibrate else ""))
        raise PredictError(f"{table.path}: {n} data row(s), needs at least {need} ({why})")
    # Rows are consecutive by the step check (max_gap), so no window restarts here.
    engine = Engine(detection_config(detector.meta, calibrate or 0, {"buffer": {"gap_reset_s": None}},
                                     node="predict"), detector, metrics=metrics)
    rec = run_table(engine, STREAM, table.ts, table.values).table(STREAM)
    st = engine.streams.get(STREAM)
    if st is None or st.baseline.learning:
        raise PredictError(f"{table.path}: no scaler after calibration (too many missing values?)")
    score = np.full(n, np.nan)
    label = np.zeros(n, np.int8)
    if compat:
        rows = slice(n - w, n)
        x = st.scaler.apply(table.values[rows])
        if np.isnan(x).any():
            bad = int(np.flatnonzero(np.isnan(x).any(axis=1))[0]) + n - w
            raise PredictError(f"{table.path}: the last window (data rows {n - w + 1}-{n}) has "
                               f"missing or non-numeric values, first at data row {bad + 1}")
        score[rows] = squared_error(x[None], detector.infer(x[None]))[0].mean(axis=1)
        label[rows] = score[rows] >= st.threshold
    else:
        rows = slice(0, n)
        label = rows_prediction(table.ts, rec, "label")
        if len(rec["ts"]):
            idx = np.searchsorted(table.ts, rec["ts"]).clip(max=n - 1)
            ok = table.ts[idx] == rec["ts"]
            score[idx[ok]] = rec["score"][ok]
    return Prediction(table, detector.meta.name, "paddlex" if compat else "sliding", w,
                      float(st.baseline.threshold), calibrate, score, label, rows)


# ---------------------------------------------------------------- outputs
LEGEND_CHANNELS = 12   # more channels than this are drawn as a heatmap, one named row each


def plot_png(pred: Prediction) -> bytes:
    """`figure` as a PNG."""
    buf = io.BytesIO()
    figure(pred).savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def figure(pred: Prediction):
    """Channels (z-scored per channel, each named: a legend, or a heatmap row for many),
    the score with its threshold, the learning period and the predicted rows shaded, and
    when the file is labeled a lane comparing its labels with the predicted ones."""
    try:
        from matplotlib.figure import Figure   # Figure, not pyplot: no global state across threads
    except ImportError:
        raise PredictError("plotting needs matplotlib: pip install 'tsad-agent[plot]'") from None
    t = pred.table
    x = (np.asarray(t.ts, "datetime64[s]") if t.has_time else np.arange(len(t.ts)))
    truth = t.labels is not None
    heatmap = len(t.channels) > LEGEND_CHANNELS
    heights = [max(3.6, 0.12 * len(t.channels)) if heatmap else 3.6, 1.8] + [0.6] * truth
    fig = Figure(figsize=(13, sum(heights) + 0.8), layout="constrained")
    axes = fig.subplots(len(heights), 1, sharex=True, height_ratios=heights)
    ax_v, ax_s = axes[0], axes[1]
    _plot_channels(ax_v, x, t.values, t.channels, heatmap)
    ax_s.plot(x, pred.score, lw=0.8, color="black", label="score")
    ax_s.axhline(pred.threshold, color="red", ls="--", lw=1, label=f"threshold {pred.threshold:.4g}")
    if np.nanmax(pred.score, initial=0) > 20 * pred.threshold:
        ax_s.set_yscale("log")   # spikes would flatten everything near the threshold
    ax_s.set_ylabel("anomaly score")
    learning = np.zeros(len(x), bool)
    learning[:pred.calibration_rows or 0] = True
    predicted = pred.label.astype(bool)
    # one legend entry per shading, in the score panel; a heatmap is not shaded over
    for ax in (ax_s,) if heatmap else (ax_s, ax_v):
        first = ax is ax_s
        _shade(ax, x, learning, "0.5", 0.25,
               f"learning period ({int(learning.sum())} rows)" if first else None)
        _shade(ax, x, predicted, "red", 0.15, "predicted anomaly" if first else None)
    ax_s.legend(loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=8, frameon=False)
    if truth:
        _plot_lanes(axes[2], x, t.labels.astype(bool), predicted)
    if t.has_time:
        import matplotlib.dates as mdates
        locator = mdates.AutoDateLocator()
        axes[-1].xaxis.set_major_locator(locator)
        axes[-1].xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    else:
        axes[-1].set_xlabel("row")
    counts = f"{int(pred.label[pred.rows].sum())} anomalous row(s) predicted"
    if truth:
        counts += f", {int(t.labels.astype(bool).sum())} labeled"
    ax_v.set_title(f"{t.path.name}: {pred.model} ({pred.mode}), {counts}")
    return fig


def _plot_channels(ax, x, values: np.ndarray, names: list[str], heatmap: bool) -> None:
    import matplotlib
    v = values.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.nanstd(v, axis=0)
        z = (v - np.nanmean(v, axis=0)) / np.where(sd > 0, sd, 1.0)
    if heatmap:
        span = (matplotlib.dates.date2num(x[[0, -1]]) if np.issubdtype(x.dtype, np.datetime64)
                else x[[0, -1]].astype(float))
        im = ax.imshow(np.clip(z.T, -4, 4), aspect="auto", cmap="RdBu_r", vmin=-4, vmax=4,
                       interpolation="nearest", extent=(*span, len(names) - 0.5, -0.5))
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.figure.colorbar(im, ax=ax, label="channel z-score", pad=0.005, fraction=0.02)
        return
    for j, name in enumerate(names):
        ax.plot(x, z[:, j], lw=0.6, alpha=0.85, color=f"C{j}", label=name)
    ax.set_ylabel("channels (z-score)")
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=7, frameon=False)
    for line in legend.get_lines():
        line.set_linewidth(2.5)


def _shade(ax, x, mask: np.ndarray, color, alpha: float, label: str | None) -> None:
    if mask.any():
        ax.fill_between(x, 0, 1, where=mask, color=color, alpha=alpha, lw=0, step="mid",
                        transform=ax.get_xaxis_transform(), label=label)


def _plot_lanes(ax, x, truth: np.ndarray, predicted: np.ndarray) -> None:
    """Two lanes under the score: the file's labels (ground truth) and the predicted ones."""
    for lane, (mask, color, name) in enumerate(((truth, "tab:blue", "labeled (anomaly column)"),
                                                (predicted, "red", "predicted"))):
        ax.fill_between(x, lane + 0.1, lane + 0.9, where=mask, color=color, lw=0, step="mid",
                        label=name)
    ax.set_ylim(0, 2)
    ax.set_yticks([0.5, 1.5], ["labeled", "predicted"], fontsize=8)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=8, frameon=False)

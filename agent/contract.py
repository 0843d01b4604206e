"""The contract between training and runtime, as code: one torch-free module that
`export/` and the agent both import, so a score, a threshold or a scaler means the
same thing on both sides (the metadata file carries the numbers, this the formulas).

Score (`model_meta.SCORE_DEFINITION`, "mse_last_step_scaled"):

    e_{t,c}  = (xhat_{t,c} - x_{t,c})^2 in the model's scaled space (float64)
    score_t  = mean_c e_{t,c} at the NEWEST time step t of the window
    share_c  = e_{t,c} / sum_c e_{t,c}

Threshold: quantile(normal window scores, q) x margin, never below MIN_THRESHOLD.

Scaler (a stream's own, fitted on its normal samples):

    mean = mean of each channel's finite values
    std  = max(std of each channel's finite values x std_scale, std_floor x model std)

Tables: CSV files with `;`, `,` or tab separators; the first column named like a time
column (TIME_COLUMNS, case-insensitive) gives the timestamps (`column_seconds`: the
decoders' rule, agent/timestamps.py), `anomaly` the labels.

Everything works on whole blocks of windows at once: no per-window Python.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .device_clock import BACKWARD_TOLERANCE_S
from .timestamps import MIN_EPOCH_S, file_seconds

# A threshold of 0 would flag every window (score >= 0), e.g. when a model
# reconstructs its calibration data perfectly; this is the smallest handed out.
MIN_THRESHOLD = 1e-9
# Scaler std floor, as a fraction of the model's std: the default of the runtime's
# calibration.std_floor and of tsad-export's --block-std-floor, which must agree.
DEFAULT_STD_FLOOR = 0.1

TIME_COLUMNS = ("datetime", "timestamp", "time", "date", "ts")
TEXT_DATES = ("1900-01-01", "2200-01-01")    # the dates a file's time text may hold
# the fewest samples a learning period may hold (a threshold needs some windows); a
# model's per-block scaling (training.calibration_rows) becomes one, so export holds to it
MIN_LEARN = 10
LABEL_COLUMN = "anomaly"
# Columns that describe the data rather than measure it: never a model channel.
LABEL_COLUMNS = (LABEL_COLUMN, "changepoint")


# ---------------------------------------------------------------- score
def _check_pair(x: np.ndarray, recon: np.ndarray) -> None:
    if x.shape != recon.shape or x.ndim != 3:
        raise ValueError(f"windows {list(x.shape)} and reconstructions {list(recon.shape)} "
                         f"must both be [B, window, channels]")


def squared_error(x: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """(recon - x)^2 in float64 at every step; both must be [B, window, channels]."""
    _check_pair(x, recon)
    d = recon.astype(np.float64) - x.astype(np.float64)
    return d * d


def score_windows(x: np.ndarray, recon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores float64 [B], err float64 [B, C]) for windows and their reconstructions."""
    _check_pair(x, recon)
    # the newest step only, without computing the error of the others
    d = recon[:, -1, :].astype(np.float64) - x[:, -1, :].astype(np.float64)
    err = d * d
    # np.mean's own arithmetic (sum, then divide by the count) without its wrapper
    return np.add.reduce(err, axis=1) / err.shape[1], err


def top_channels(err_row: np.ndarray, names: list[str], k: int) -> list[dict]:
    """The k channels with the largest share of the squared error, descending.

    Empty when the error is zero or not finite: no channel can be blamed."""
    err_row = np.asarray(err_row, np.float64)
    total = float(err_row.sum())
    if not (total > 0 and np.isfinite(total)):
        return []
    order = np.argsort(-err_row, kind="stable")[:k]
    return [{"name": names[i], "share": round(float(err_row[i]) / total, 4)} for i in order]


# ---------------------------------------------------------------- threshold
def fit_threshold(scores: np.ndarray, quantile: float, margin: float) -> float:
    """quantile(scores) x margin over the finite scores; always >= MIN_THRESHOLD."""
    s = np.asarray(scores, np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise ValueError("no finite normal scores to fit a threshold on")
    return max(float(np.quantile(s, quantile)) * margin, MIN_THRESHOLD)


# ---------------------------------------------------------------- scaler
@dataclass(slots=True)
class StreamScaler:
    """Per-channel standardisation into the model's scaled space.  Slotted: a stream
    keeps several (learned, adapted, and the versions adaptation still uses)."""
    mean: np.ndarray
    std: np.ndarray
    _mean32: np.ndarray = field(init=False, repr=False)
    _inv32: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, np.float64)
        self.std = np.asarray(self.std, np.float64)
        if self.mean.shape != self.std.shape or self.mean.ndim != 1:
            raise ValueError(f"scaler mean {self.mean.shape} and std {self.std.shape} "
                             f"must be equal-length vectors")
        if not np.all(self.std > 0):
            raise ValueError("scaler std must be > 0 for every channel")
        self._mean32 = self.mean.astype(np.float32)
        self._inv32 = (1.0 / self.std).astype(np.float32)

    def moved(self, mean: np.ndarray) -> "StreamScaler":
        """This scaler with another mean (float64 [C]): the std, already checked, is kept."""
        out = object.__new__(StreamScaler)
        out.mean, out.std, out._inv32 = mean, self.std, self._inv32
        out._mean32 = mean.astype(np.float32)
        return out

    @classmethod
    def from_meta(cls, meta) -> "StreamScaler":
        return cls(np.asarray(meta.scaler.mean), np.asarray(meta.scaler.std))

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Raw values [n, C] -> float32 [n, C] in scaled space (NaN stays NaN)."""
        return (np.asarray(values, np.float32) - self._mean32) * self._inv32


def fit_scaler(raw: np.ndarray, model_std: np.ndarray, std_floor: float,
               std_scale: np.ndarray | None = None) -> StreamScaler:
    """Mean/std of raw [N, C] samples, each channel over its finite values.

    The std is multiplied by the model's per-channel `std_scale`
    (ModelMeta.calibration_std_scale) when it has one: a few hundred rows see only a
    moment of a slowly drifting channel, and the model was trained in those units.

    Each std is floored at std_floor x the model's std: a channel that is flat while
    the scaler is fitted (a constant flow reading) would otherwise turn the smallest
    later wobble into an enormous score.  With std_floor = 0 a flat channel falls
    back to the model's std."""
    raw = np.asarray(raw, np.float64)
    model_std = np.asarray(model_std, np.float64)
    if raw.ndim != 2 or raw.shape[1] != model_std.shape[0]:
        raise ValueError(f"calibration samples {list(raw.shape)} do not match "
                         f"{model_std.shape[0]} model channels")
    scale = np.ones_like(model_std) if std_scale is None else np.asarray(std_scale, np.float64)
    if scale.shape != model_std.shape:
        raise ValueError(f"std_scale has {scale.size} values for {model_std.shape[0]} channels")
    ok = np.isfinite(raw)
    if ok.all():
        mean, std = raw.mean(axis=0), raw.std(axis=0)
    else:
        # each channel from its own values: a sample missing some channels still counts
        # for the others, as the windows it forward-fills count it (one glitch value
        # left out of its channel's std would be many of that std later, and inflate
        # the threshold the same windows set)
        n = ok.sum(axis=0)
        if n.min() < 2:
            raise ValueError(f"need at least 2 calibration values of every channel, got "
                             f"{int(n.min())} of channel {int(n.argmin())}")
        vals = np.where(ok, raw, np.nan)
        mean, std = np.nanmean(vals, axis=0), np.nanstd(vals, axis=0)
    std = np.maximum(std * scale, std_floor * model_std)
    std = np.where(std > 0, std, model_std)
    return StreamScaler(mean, std)


# ---------------------------------------------------------------- tables
def sniff_separator(header: str) -> str:
    """The most frequent of ';', ',' and tab in the header line (',' on a tie or none)."""
    counts = {sep: header.count(sep) for sep in (",", ";", "\t")}
    best = max(counts, key=lambda s: (counts[s], s == ","))
    return best if counts[best] else ","


def _header(path: str | Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readline()


def load_csv(path: str | Path, rows: int | None = None):
    """A CSV file as a pandas DataFrame with stripped column names.

    Raises OSError when the file cannot be read and ValueError when it is no CSV.
    pandas costs ~40 MB resident: imported here, when a file is actually read, so a
    serial/MQTT daemon on a small device never pays for it."""
    import pandas as pd
    path = Path(path)
    header = _header(path)
    if not header.strip():
        raise ValueError(f"{path}: cannot read as CSV: empty file (no header row)")
    try:
        df = pd.read_csv(path, sep=sniff_separator(header), nrows=rows, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read as CSV: {' '.join(str(e).split())}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def time_column(columns) -> str | None:
    """The first column named like a time column, or None."""
    return next((c for c in columns if str(c).lower() in TIME_COLUMNS), None)


def label_column(columns) -> str | None:
    """The `anomaly` column whatever its case and spaces, or None."""
    return next((c for c in columns if str(c).strip().lower() == LABEL_COLUMN), None)


def learning_rows_problem(flag: str, rows: int) -> str | None:
    """Why `rows` cannot be a file command's learning period (0: none, the model's own
    scaler and threshold), or None."""
    if rows != 0 and not rows >= MIN_LEARN:
        return f"{flag} {rows}: 0 (the model's scaler and threshold) or at least {MIN_LEARN} rows"
    return None


def column_seconds(col, path: str | Path) -> np.ndarray:
    """Seconds (float64) of a time column: numbers by timestamps.file_seconds (epoch s,
    ms, µs or ns by magnitude inside 2000-2100 as a device's, or a count from 0), else
    date text (a time without a zone is UTC) within TEXT_DATES, in time order
    (_in_time_order).  ValueError names the first bad row."""
    import pandas as pd
    num = pd.to_numeric(col, errors="coerce")
    if num.notna().all() or col.dtype.kind in "iuf":    # (NaN: an empty cell)
        sec = file_seconds(num.to_numpy())
        _no_bad_rows(col, np.isnan(sec), path, "a number must be epoch s, ms, µs or ns "
                     f"inside 2000-2100, or a time from 0 below {MIN_EPOCH_S} s")
    else:
        dt = pd.to_datetime(col, errors="coerce", utc=True, dayfirst=_day_first(col, path))
        _no_bad_rows(col, dt.isna().to_numpy(), path, "not a date")
        # wider than a device's 2000-2100: a plant's history may be older.  Compared as
        # dates: subtracting 1970 from a year-3000 date overflows nanoseconds
        lo, hi = pd.Timestamp(TEXT_DATES[0], tz="UTC"), pd.Timestamp(TEXT_DATES[1], tz="UTC")
        _no_bad_rows(col, ((dt < lo) | (dt >= hi)).to_numpy(), path,
                     f"outside {TEXT_DATES[0][:4]}-{TEXT_DATES[1][:4]}")
        sec = ((dt - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(np.float64)
    _in_time_order(sec, col, path)
    return sec


def _day_first(col, path: str | Path) -> bool:
    """Whether dates written NN/NN/YYYY (or with dots) put the day first: yes where a first
    field is over 12, no where a second one is; a file where neither is over 12 anywhere
    is refused, as either reading gives a valid but different time line (pandas would read
    01/03/2020 as 3 January without a word)."""
    f = col.astype(str).str.extract(r"^\s*(\d{1,2})[/.](\d{1,2})[/.]\d{2,4}\b").astype(float)
    if not f[0].notna().any():
        return False
    if (f[0] > 12).any():
        return True
    if (f[1] > 12).any():
        return False
    i = int(np.flatnonzero(f[0].notna().to_numpy())[0])
    raise ValueError(f"{path}: column {col.name!r}: row {i + 1} ({col.iloc[i]!r}) and every "
                     "other date can be read day first or month first; write them as "
                     "YYYY-MM-DD (ISO 8601)")


def _in_time_order(ts: np.ndarray, col, path: str | Path) -> None:
    """Refuse a file whose time goes back by more than a clock's jitter behind the newest
    row before it (the rule a daemon's decoder applies to each sample).  A daemon meets a
    device clock stepping back live and follows it (agent/sample_clock.py); in a file a
    step back is nearly always rows out of order, which would feed the model its windows
    backwards and stop every time gate (elapsed time stands still across a step back)."""
    if not len(ts):
        return
    newest = np.maximum.accumulate(ts)
    back = np.flatnonzero(ts[1:] < newest[:-1] - BACKWARD_TOLERANCE_S)
    if len(back):
        i = int(back[0]) + 1
        j = int(np.argmax(ts[:i]))          # the newest row before it
        a, b = (repr(v) if isinstance(v, str) else v for v in (col.iloc[j], col.iloc[i]))
        raise ValueError(
            f"{path}: column {col.name!r}: row {i + 1} ({b}) is {newest[i - 1] - ts[i]:g} s "
            f"before row {j + 1} ({a}), more than the {BACKWARD_TOLERANCE_S:g} s of jitter "
            f"allowed; {len(back)} such row(s). Rows must be in time order: "
            "sort the file (exported newest first?); local times that go back when daylight "
            "saving ends need their UTC offset")


def _no_bad_rows(col, bad: np.ndarray, path: str | Path, why: str) -> None:
    at = np.flatnonzero(bad)
    if len(at):
        v = col.iloc[at[0]]
        shown = repr(v) if isinstance(v, str) else v      # -1000, not np.int64(-1000)
        raise ValueError(f"{path}: column {col.name!r}: row {at[0] + 1} has no readable "
                         f"timestamp ({shown}: {why}); {len(at)} such row(s)")


@dataclass
class Table:
    ts: np.ndarray                  # float64 [n] seconds (column_seconds; row number without one)
    values: np.ndarray              # float32 [n, C] in the requested channel order, NaN = missing
    labels: np.ndarray | None       # int8 [n], or None without an `anomaly` column
    time_text: list[str] | None     # the time column's own text, None without one


def read_table(path: str | Path, channels: list[str], time_text: bool = False) -> Table:
    """A sensor file as the runtime reads it: model channels picked by name; with
    `time_text`, also the time column exactly as written (outputs echo it back).

    Raises ValueError naming the missing columns, OSError when the file cannot be read.
    Cells that are not numbers become NaN (missing values)."""
    import pandas as pd
    df = load_csv(path)
    missing = [c for c in channels if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the model needs {list(channels)}, "
                         f"the file has {list(df.columns)}")
    tcol = time_column(df.columns)
    text = None
    if tcol is None:
        ts = np.arange(len(df), dtype=np.float64)
    else:
        ts = column_seconds(df[tcol], path)
        if time_text:
            # read again as text: parsed, 1583750689 would come back as "1583750689.0"
            raw = pd.read_csv(path, sep=sniff_separator(_header(path)), usecols=[list(df.columns).index(tcol)],
                              dtype=str, keep_default_na=False, skipinitialspace=True)
            text = [t.strip() for t in raw.iloc[:, 0].tolist()]
    values = np.ascontiguousarray(
        df[list(channels)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32))
    # a column with no number at all is no sensor (text, a decimal comma): every window
    # would be skipped, and a job would report a clean run of nothing
    empty = [c for c, ok in zip(channels, np.isfinite(values).any(axis=0)) if not ok]
    if empty and len(df):
        raise ValueError(f"{path}: column(s) {empty} hold no number (a decimal comma? "
                         f"text?); the model needs numbers in {list(channels)}")
    labels = None
    label = label_column(df.columns)    # as training finds it: `Anomaly` labels too
    if label is not None:
        lab = pd.to_numeric(df[label], errors="coerce")
        # a label that is not 0 or 1 (text, an empty cell, 2) would be counted silently
        _no_bad_label(df[label], ~lab.isin((0, 1)).to_numpy(), path)
        labels = lab.to_numpy(np.int8)
    return Table(ts, values, labels, text)


def _no_bad_label(col, bad: np.ndarray, path: str | Path) -> None:
    at = np.flatnonzero(bad)
    if len(at):
        v = col.iloc[at[0]]
        what = "is empty" if v != v else f"holds {v!r}" if isinstance(v, str) else f"holds {v}"
        raise ValueError(f"{path}: column {col.name!r}: row {at[0] + 1} {what}, not 0 or "
                         f"1; {len(at)} such row(s)")

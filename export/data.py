"""Training data: read sensor CSVs, pick channels, scale, cut into windows.

Policy for bad input: refuse, never repair.  A NaN or a non-numeric cell in a
selected column stops training with the file, column and line named, because a
silently imputed training set yields a model whose threshold means nothing.
"""
from __future__ import annotations

import csv
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from agent.contract import (LABEL_COLUMNS, TIME_COLUMNS, column_seconds, label_column, load_csv,
                            sniff_separator, time_column)
from agent.model_meta import channel_problem, sha256_file

# Flat channels would divide by ~0; the floor keeps a flat training channel at 0
# after scaling while bounding the blow-up when it finally moves.
STD_FLOOR_ABS = 1e-6
STD_FLOOR_REL = 1e-4

# Input noise (scaled units) of the denoising objective by default.  Without it every
# architecture whose function class holds the identity (DLinear_ad's W x W time maps, a
# wide enough network) learns to copy its input: on normal TEP and SKAB data DLinear_ad
# reached a threshold of 1e-9 x the data variance.  Chosen on held-out NORMAL data with
# synthetic steps (benchmarks/train_defaults.py): of 0, 0.1, 0.3, 0.5 and 1.0, 1.0 put the
# most windows with a 3-std step on a quarter of the channels over the threshold (TEP:
# DLinear_ad 70 %, 0.5: 15 %; AutoEncoder_ad 59 %, 0.5: 15 %; SKAB DLinear_ad 16 %, 0.5: 5 %)
# at the same held-out FAR (TEP 0.2-0.3 %, SKAB 1.2 %).  --level-noise stays 0: on held-out runs of the same process it raised
# the FAR to 5-76 %, because each run settles at its own levels.
DEFAULT_NOISE = 1.0


# Samples reach the runtime as float32 (agent/decoders.py); a bigger training value could
# never be seen again, and its square overflows the scaler's variance.
VALUE_MAX = float(np.finfo(np.float32).max)


# A time step this many times a file's median is a stop or an outage: the runtime starts its
# window again there (buffer.gap_factor, 10), but a training window would join running from
# before and after it, a jump the process never makes (training audit, twenty-second session)
GAP_FACTOR = 10.0

# A European export writes 0,27 for 0.27: pandas reads such a column as text.
DECIMAL_COMMA = re.compile(r"^\s*[-+]?\d+,\d+\s*$")


class DataError(ValueError):
    """Training data unusable; the message names the file, column and row."""


def warn(message: str) -> None:
    print(f"tsad-export: warning: {message}", file=sys.stderr)


@dataclass
class DataFile:
    path: Path
    sha256: str
    rows: int                 # rows actually used (after the per-file row limit)
    values: np.ndarray        # float64 [rows, channels], raw units
    steps: np.ndarray | None = None   # the positive time steps between its rows (s), if timed

    def describe(self, root: Path) -> dict:
        return {"path": relative_path(self.path, root), "sha256": self.sha256, "rows": self.rows}


def data_root(paths: list[Path], given: str | Path | None = None) -> Path:
    """The folder training paths are recorded against: `given`, else the deepest folder
    holding every file.  Metadata must not carry the build machine's folder layout."""
    found = [p.resolve() for p in paths]
    root = Path(given).resolve() if given else Path(os.path.commonpath([p.parent for p in found]))
    outside = [str(p) for p in found if not p.is_relative_to(root)]
    if outside:
        raise DataError(f"--data-root {given}: not a folder above {', '.join(outside)}")
    return root


def relative_path(path: str | Path, root: Path) -> str:
    """`path` below `root`, with / separators on every OS."""
    return Path(path).resolve().relative_to(root).as_posix()


def parse_data_arg(arg: str, default_rows: int | None) -> tuple[Path, int | None]:
    """``FILE`` or ``FILE:ROWS`` (only the first ROWS rows of that file)."""
    m = re.match(r"^(.*):(\d+)$", arg)
    if m and not Path(arg).exists():
        if int(m.group(2)) < 1:
            raise DataError(f"{arg}: ROWS must be >= 1 (FILE:ROWS uses the first ROWS rows)")
        return Path(m.group(1)), int(m.group(2))
    return Path(arg), default_rows


def read_table(path: Path, rows: int | None = None) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The CSV as a DataFrame of raw columns, time columns dropped, row limit applied, and
    its positive time steps (None without a time column).  The time column is read as the
    runtime reads it: windows of rows out of time order would teach the model a process
    running backwards."""
    steps = None
    try:
        df = load_csv(path, rows)
        if (tcol := time_column(df.columns)) is not None:
            d = np.diff(column_seconds(df[tcol], path))
            steps = d[d > 0]        # as the runtime learns a pace (agent/pace.py)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise DataError(str(e)) from None
    return df.drop(columns=[c for c in df.columns if c.lower() in TIME_COLUMNS]), steps


def interval_s(files: list[DataFile]) -> float | None:
    """The median time step over every timed file's rows (metadata `training.interval_s`):
    the pace the model learned its windows at; None where no file has a time column."""
    steps = [f.steps for f in files if f.steps is not None and len(f.steps)]
    return round(float(np.median(np.concatenate(steps))), 6) if steps else None


def check_column_names(columns: list[str]) -> None:
    """DataError for a chosen channel that no sensor sends: a label would hand the model
    the answer it is scored on, and every time-like column is dropped by read_table."""
    for col in columns:
        if col.strip().lower() in LABEL_COLUMNS:
            raise DataError(f"--columns: {col!r} is a label column, not a sensor")
        if col.strip().lower() in TIME_COLUMNS:
            raise DataError(f"--columns: {col!r}: the time column cannot be a channel")


def _decimal_comma(col: pd.Series) -> bool:
    cells = col.dropna().astype(str).str.strip()
    cells = cells[cells != ""]
    return len(cells) > 0 and cells.str.match(DECIMAL_COMMA).mean() > 0.5


def default_columns(df: pd.DataFrame, path: Path) -> list[str]:
    """Columns holding numbers; a numeric column with a few bad cells stays in (and is then
    refused by name) rather than silently vanishing from the model.  A column of
    decimal-comma numbers is refused: dropping it trained a 1-channel model from 8
    sensors.  The other columns without a number are named in a warning."""
    sensors = [c for c in df.columns if str(c).strip().lower() not in LABEL_COLUMNS]
    empty = [c for c in sensors if pd.to_numeric(df[c], errors="coerce").isna().all()]
    comma = [c for c in empty if _decimal_comma(df[c])]
    if comma:
        raise DataError(
            f"{path}: column(s) {', '.join(map(repr, comma))} hold no number (a decimal comma? "
            "convert the file to '.' decimals, or leave them out with --columns)")
    if empty:
        warn(f"{path}: not used as channels: {', '.join(map(repr, empty))} (no number in "
             "them: empty or text)")
    return [c for c in sensors if c not in empty]


def _check_values(df: pd.DataFrame, columns: list[str], path: Path) -> np.ndarray:
    out = np.empty((len(df), len(columns)), dtype=np.float64)
    for j, col in enumerate(columns):
        num = pd.to_numeric(df[col], errors="coerce")
        bad = num.isna() | ~np.isfinite(num.to_numpy(dtype=np.float64, na_value=np.nan))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raw = df[col].iloc[i]
            # str(), not repr(): numpy's repr of a parsed inf is np.float64(inf)
            shown = repr(raw) if isinstance(raw, str) else str(raw)
            what = "empty/NaN" if pd.isna(raw) else f"non-numeric or infinite value {shown}"
            raise DataError(
                f"{path}: column {col!r} has {what} at data row {i} (line {i + 2}); "
                f"{int(bad.sum())} bad cell(s) in this column. Training refuses gaps: "
                "clean or cut the file (FILE:ROWS) instead of imputing")
        out[:, j] = num.to_numpy(dtype=np.float64)
        huge = np.flatnonzero(np.abs(out[:, j]) > VALUE_MAX)
        if len(huge):
            i = int(huge[0])
            raise DataError(
                f"{path}: column {col!r} has value {out[i, j]:.6g} at data row {i} "
                f"(line {i + 2}), beyond the float32 range (+-{VALUE_MAX:.3g}) sensor samples "
                f"travel in; {len(huge)} such cell(s) in this column")
    return out


def _header_names(path: Path) -> list[str]:
    """The header's names as written: pandas renames a repeated X to X.1, X.2, ..."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        line = f.readline()
    return [n.strip() for n in next(csv.reader([line], delimiter=sniff_separator(line)), [])]


def _check_header(path: Path, chosen: list[str]) -> None:
    if problem := channel_problem(chosen):
        raise DataError(f"{path}: {problem}; rename the column")
    counts = Counter(_header_names(path))
    for col in chosen:
        # A renamed copy is not in the header as written; its original is.
        name = col if col in counts else re.sub(r"\.\d+$", "", col)
        if counts.get(name, 0) > 1:
            raise DataError(
                f"{path}: column {name!r} appears {counts[name]} times in the header; pandas "
                f"reads the copies as '{name}.1', ..., channels no sensor sends. Rename or drop "
                "the copies, or leave them out with --columns")


def _check_labels(path: Path, df: pd.DataFrame) -> None:
    label = label_column(df.columns)
    if label is None:
        return
    flagged = np.flatnonzero(pd.to_numeric(df[label], errors="coerce").fillna(0).to_numpy() != 0)
    if len(flagged):
        i = int(flagged[0])
        raise DataError(
            f"{path}: {len(flagged)} row(s) labelled anomalous (column {label!r}, first at data "
            f"row {i}, line {i + 2}); training takes every row as normal, so the model would "
            "learn to reconstruct those faults and its threshold would rise to cover them. "
            "Train on the normal rows only (FILE:ROWS keeps the first ROWS)")


def load_files(args: list[str], columns: list[str] | None, rows_per_file: int | None,
               normal_only: bool = False) -> tuple[list[DataFile], list[str]]:
    """Read every file, check that each has the same channels, refuse NaN; `normal_only`
    (training) also refuses rows labelled anomalous, which a quantize or parity check
    on real data may well use."""
    files: list[DataFile] = []
    chosen = list(columns) if columns else None
    for arg in args:
        path, rows = parse_data_arg(arg, rows_per_file)
        if not path.is_file():
            raise DataError(f"{path}: data file not found")
        df, steps = read_table(path, rows)
        if len(df) == 0:
            raise DataError(f"{path}: no data rows")
        if chosen is None:
            chosen = default_columns(df, path)
            if not chosen:
                raise DataError(f"{path}: no numeric sensor columns found (columns: {list(df.columns)})")
        _check_header(path, chosen)
        if normal_only:
            _check_labels(path, df)
        missing = [c for c in chosen if c not in df.columns]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
                f"the file has {', '.join(map(repr, map(str, df.columns)))}")
        values = _check_values(df, chosen, path)
        _warn_gaps(path, steps)
        files.append(DataFile(path=path, sha256=sha256_file(path), rows=len(values), values=values,
                              steps=steps))
    if not files:
        raise DataError("no training files given")
    return files, chosen


def _warn_gaps(path: Path, steps: np.ndarray | None) -> None:
    if steps is None or len(steps) < 2:
        return
    med = float(np.median(steps))
    gaps = steps[steps > GAP_FACTOR * med]
    if len(gaps):
        warn(f"{path}: {len(gaps)} time gap(s) over {GAP_FACTOR:g}x its {med:g} s sampling "
             f"interval (the longest {gaps.max() / 3600:.3g} h): a window across one joins the "
             f"running before and after it. Split the file at its stops and outages (each file "
             f"is windowed on its own); leave stopped running out (README: Machines that stop)")


def constant_channels(files: list[DataFile], channels: list[str]) -> list[str]:
    """Channels holding one value in every training row."""
    x = np.concatenate([f.values for f in files])
    return [c for c, flat in zip(channels, np.ptp(x, axis=0) == 0) if flat]


def fit_scaler(blocks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate(blocks, axis=0)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    floor = np.maximum(STD_FLOOR_ABS, STD_FLOOR_REL * np.abs(mean))
    return mean, np.maximum(std, floor)


def scale(values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (values - mean) / std


def _block_bounds(n: int, block_rows: int) -> list[tuple[int, int]]:
    starts = list(range(0, n, block_rows))
    if len(starts) > 1 and n - starts[-1] < block_rows:
        starts.pop()
    return [(s, starts[k + 1] if k + 1 < len(starts) else n) for k, s in enumerate(starts)]


def pooled_block_std(arrays: list[np.ndarray], block_rows: int) -> np.ndarray:
    """Within-block std pooled over every block: the unit of the per-block training space."""
    sq, n = 0.0, 0
    for values in arrays:
        for s, e in _block_bounds(len(values), block_rows):
            sq = sq + values[s:e].var(axis=0) * (e - s)
            n += e - s
    std = np.sqrt(sq / n)
    mean = np.concatenate(arrays).mean(axis=0)
    return np.maximum(std, np.maximum(STD_FLOOR_ABS, STD_FLOOR_REL * np.abs(mean)))


def scale_per_block(values: np.ndarray, block_rows: int, min_std: np.ndarray) -> np.ndarray:
    """Z-score each contiguous block of ``block_rows`` rows with its own statistics.

    Mirrors the runtime's per-stream calibration (scaler refit on a stream's first
    rows, std floored at a fraction of the model's training std: agent/calibration.py),
    so the model learns the space it will actually be fed.  A short tail joins the
    block before it rather than getting noisy statistics of its own.
    """
    out = np.empty_like(values)
    for s, e in _block_bounds(len(values), block_rows):
        mean, std = fit_scaler([values[s:e]])
        out[s:e] = scale(values[s:e], mean, np.maximum(std, min_std))
    return out


def windows(x: np.ndarray, window: int) -> np.ndarray:
    """All stride-1 windows, [N, window, C]; empty when x is shorter than the window."""
    if len(x) < window:
        return np.empty((0, window, x.shape[1]), dtype=x.dtype)
    return np.lib.stride_tricks.sliding_window_view(x, window, axis=0).transpose(0, 2, 1)


@dataclass
class Split:
    train: np.ndarray          # float32 [N, W, C]
    val: np.ndarray            # float32 [M, W, C]
    held_out_files: list[str]  # files that contributed validation windows


def chronological_split(scaled: list[np.ndarray], paths: list[Path], window: int,
                        val_frac: float, train_stride: int = 1) -> Split:
    """Each file's last ``val_frac`` of rows is held out, with no window straddling the cut.

    A file whose tail is shorter than one window cannot be split without leaking,
    so it goes to training whole; at least one file must provide validation rows.
    ``train_stride`` keeps every k-th training window (neighbours overlap almost
    entirely, so this mostly buys time); validation keeps them all.
    """
    train, val, held = [], [], []
    for x, p in zip(scaled, paths):
        n_val = int(round(len(x) * val_frac))
        if n_val >= window and len(x) - n_val >= window:
            train.append(windows(x[: len(x) - n_val], window)[::train_stride])
            val.append(windows(x[len(x) - n_val:], window))
            held.append(str(p))
        else:
            train.append(windows(x, window)[::train_stride])
    if not val:
        longest = max(len(x) for x in scaled)
        n_val = int(round(longest * val_frac))
        if n_val >= window:
            raise DataError(
                f"--val-frac {val_frac} leaves no training windows: it holds out {n_val} of the "
                f"longest file's {longest} rows, leaving {longest - n_val}, fewer than the "
                f"window ({window}); lower --val-frac")
        raise DataError(
            f"no file is long enough for a held-out validation split: need a file with at least "
            f"{int(np.ceil(window / max(val_frac, 1e-9)))} rows for window {window} and "
            f"--val-frac {val_frac} (longest has {longest})")
    tr = np.concatenate(train).astype(np.float32)
    if len(tr) == 0:
        raise DataError(f"no training windows: every file is shorter than the window ({window})")
    return Split(train=tr, val=np.concatenate(val).astype(np.float32), held_out_files=held)


def check_lengths(files: list[DataFile], window: int) -> None:
    short = [f for f in files if f.rows < window]
    if short:
        raise DataError(
            f"too few rows for window {window}: "
            + ", ".join(f"{f.path} has {f.rows}" for f in short)
            + " (every file needs at least one full window; lower --window or drop the file)")


def check_writable(out: Path, suffix: str = ".onnx") -> None:
    """Fail before hours of training, not after: the output folder must accept files."""
    if out.suffix != suffix:
        raise DataError(f"{out}: expected a path ending in {suffix}")
    if out.is_dir():
        raise DataError(f"{out}: is a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.{os.getpid()}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DataError(f"{out}: output folder is not writable: {e.strerror or e}") from None

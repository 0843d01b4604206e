"""Replay source: a recorded CSV file played back as a stream (demos, evaluation, soak tests).

Reads SKAB files (`;`, `datetime` column) and plain `,` CSV whose time column
is named datetime/timestamp/time (epoch seconds or date strings; a time without
a zone is UTC) or absent (then samples are 1 s apart from t = 0).  Model
channels are picked by column name, so the file's column order does not matter.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from ..config import ReplaySource
from ..metrics import Metrics
from .base import Batch, Emit, Source

log = logging.getLogger("tsad.source.replay")

TIME_COLUMNS = ("datetime", "timestamp", "time")
LABEL_COLUMN = "anomaly"


def _separator(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline()
    return ";" if header.count(";") > header.count(",") else ","


def _seconds(col, path: Path) -> np.ndarray:
    import pandas as pd
    num = pd.to_numeric(col, errors="coerce")
    if num.notna().all():
        return num.to_numpy(np.float64)
    dt = pd.to_datetime(col, errors="coerce", utc=True)
    bad = np.flatnonzero(dt.isna().to_numpy())
    if len(bad):
        raise ValueError(f"{path}: column {col.name!r}: row {bad[0] + 1} has no readable "
                         f"timestamp ({col.iloc[bad[0]]!r}); {len(bad)} such row(s)")
    return ((dt - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(np.float64)


def read_table(path: str | Path, channels: list[str]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ts float64[n], values float32[n, C] in `channels` order, labels int8[n] or None).

    Raises ValueError naming the missing columns, OSError when the file cannot
    be read.  Cells that are not numbers become NaN (missing values)."""
    path = Path(path)
    # pandas costs ~40 MB resident: imported only when a file is actually replayed,
    # so a serial/MQTT daemon on a small device never pays for it
    import pandas as pd
    df = pd.read_csv(path, sep=_separator(path))
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in channels if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the model needs {list(channels)}, "
                         f"the file has {list(df.columns)}")
    tcol = next((c for c in df.columns if c.lower() in TIME_COLUMNS), None)
    ts = (np.arange(len(df), dtype=np.float64) if tcol is None else _seconds(df[tcol], path))
    values = np.ascontiguousarray(
        df[list(channels)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32))
    labels = None
    if LABEL_COLUMN in df.columns:
        labels = pd.to_numeric(df[LABEL_COLUMN], errors="coerce").fillna(0).to_numpy(np.int8)
    return ts, values, labels


class ReplayFileSource(Source):
    kind = "replay"

    def __init__(self, stream_id: str, cfg: ReplaySource, channels: list[str], metrics: Metrics):
        super().__init__()
        self.stream_id = stream_id
        self.cfg = cfg
        # read at build time so a bad file or a missing column fails at startup
        self.ts, self.values, _ = read_table(cfg.path, channels)
        nan_rows = int(np.isnan(self.values).any(axis=1).sum())
        if nan_rows:
            metrics.bad("nan", nan_rows)
            log.warning("%s: %s has %d row(s) with missing or non-numeric values",
                        stream_id, cfg.path, nan_rows)
        self.passes = 0

    def run(self, emit: Emit, stop: threading.Event) -> None:
        n = len(self.ts)
        if n == 0:
            log.warning("%s: %s has no rows", self.stream_id, self.cfg.path)
            return
        # each loop pass continues the clock, so looped time keeps increasing
        step = float(np.median(np.diff(self.ts))) if n > 1 else 1.0
        period = float(self.ts[-1] - self.ts[0]) + max(step, 0.0)
        self.connected = True
        try:
            while not stop.is_set():
                ts = self.ts + self.passes * period
                if self.cfg.speed > 0:
                    self._real_time(ts, emit, stop)
                else:
                    for a in range(0, n, self.cfg.chunk):
                        if stop.is_set():
                            break
                        emit(Batch(self.stream_id, ts[a:a + self.cfg.chunk],
                                   self.values[a:a + self.cfg.chunk]))
                if stop.is_set():
                    break
                self.passes += 1
                if not self.cfg.loop:
                    break
        finally:
            self.connected = False

    def _real_time(self, ts: np.ndarray, emit: Emit, stop: threading.Event) -> None:
        # scheduled against a fixed origin so sleep overshoot does not accumulate
        t0, origin = time.monotonic(), ts[0]
        for i in range(len(ts)):
            delay = t0 + (ts[i] - origin) / self.cfg.speed - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            if stop.is_set():
                return
            emit(Batch(self.stream_id, ts[i:i + 1], self.values[i:i + 1]))

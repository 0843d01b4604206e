"""Replay source: a recorded CSV file played back as a stream (demos, evaluation, soak tests).

Reads the files `contract.read_table` reads: SKAB files (`;`, `datetime` column)
and plain CSV whose time column holds epoch time (s, ms, µs or ns), seconds from 0 or
date strings (a time without a zone is UTC), or no time column (then samples are 1 s
apart from t = 0).
Model channels are picked by column name, so the file's column order does not matter.
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np

from ..config_base import NonNegativeFloat, PositiveInt, SourceConfig
from ..contract import read_table
from ..metrics import Metrics
from .base import Batch, Emit, Source

log = logging.getLogger("tsad.source.replay")

class ReplaySourceConfig(SourceConfig, tag="replay"):
    path: str
    # 0 = as fast as possible; otherwise real time x speed (using the file's timestamps)
    speed: NonNegativeFloat = 0.0
    loop: bool = False
    # rows per batch at full speed (bigger = fewer Python round trips); the default is
    # adaptation.SPAN, the most one engine ingest holds (agent/jobs.py says why)
    chunk: PositiveInt = 192


class ReplayFileSource(Source):
    type = "replay"
    config_class = ReplaySourceConfig
    restarts = False

    def __init__(self, stream_id: str, cfg: ReplaySourceConfig, channels: list[str],
                 metrics: Metrics):
        super().__init__()
        self.stream_id = stream_id
        self.cfg = cfg
        # read at build time so a bad file or a missing column fails at startup
        t = read_table(cfg.path, channels)
        self.ts, self.values = t.ts, t.values
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

"""Process-wide counters and latency statistics reported in `health`.

Plain ints and a bounded sample of latencies: cheap enough for the hot path,
and safe under the GIL for the single-increment updates used here.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque

import numpy as np


class Metrics:
    def __init__(self, latency_samples: int = 4096) -> None:
        self.started = time.time()
        self.samples_in = 0
        self.windows_inferred = 0
        self.windows_skipped = 0          # NaN that could not be filled, etc.
        self.malformed = Counter()        # reason -> count (decoders, sources)
        self.dropped = Counter()          # reason -> count (queues full, outbox policy)
        self.alerts = Counter()           # "new"/"update"/"end" -> count
        self._lat_ms: deque[float] = deque(maxlen=latency_samples)
        self._lock = threading.Lock()

    def bad(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.malformed[reason] += n

    def infer_ms(self, ms: float) -> None:
        self._lat_ms.append(ms)

    def latency_ms(self) -> dict[str, float | None]:
        lat = list(self._lat_ms)
        if not lat:
            return {"p50": None, "p99": None}
        a = np.asarray(lat)
        return {"p50": round(float(np.percentile(a, 50)), 4),
                "p99": round(float(np.percentile(a, 99)), 4)}

    def snapshot(self) -> dict:
        with self._lock:
            malformed = dict(self.malformed)
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "samples_in": self.samples_in,
            "windows_inferred": self.windows_inferred,
            "windows_skipped": self.windows_skipped,
            "inference_ms": self.latency_ms(),
            "malformed": malformed,
            "dropped": dict(self.dropped),
            "alerts": dict(self.alerts),
        }

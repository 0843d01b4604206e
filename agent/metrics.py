"""Process-wide counters and latency statistics reported in `health`.

Plain ints and a bounded sample of latencies: cheap enough for the hot path,
and safe under the GIL for the single-increment updates used here.
"""
from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import Counter, deque

import numpy as np

# Upper bounds (seconds) of the inference-latency histogram exported on /metrics:
# from a tiny model on a desktop CPU (~0.1 ms) to a big batch on a Raspberry Pi.
INFER_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self, latency_samples: int = 4096) -> None:
        self.started = time.monotonic()     # uptime: a wall-clock step is no time running
        self.samples_in = 0
        self.samples_idle = 0             # taken while their machine was stopped (running:)
        # engine steps, and the streams they held summed over them: samples_in / stream_steps
        # is how many samples a stream gets per step, which sets each stream's fixed cost per
        # sample (model.batch_wait_s trades it against latency)
        self.steps = 0
        self.stream_steps = 0
        self.windows_inferred = 0
        self.windows_skipped = 0          # every ring's dropped windows (ring.py counts them)
        self.malformed = Counter()        # reason -> count (decoders, sources)
        self.dropped = Counter()          # reason -> count (queues full, outbox policy)
        self.alerts = Counter()           # "new"/"update"/"end" -> count
        self.errors = Counter()           # where -> count (a stream step or a sink that failed)
        # Per stream, for the daemon's Prometheus endpoint (agent/prom.py): written by the
        # prometheus sink on the pipeline thread, kept here so that a reload that rebuilds
        # the sinks keeps them (counters must not restart at every SIGHUP).
        self.stream_scores: dict[str, float] = {}   # stream -> its latest window's score
        self.stream_alerts = Counter()               # (stream, event type) -> count
        self._lat_ms: deque[float] = deque(maxlen=latency_samples)
        self._lock = threading.Lock()
        # how the daemon's last reload went: {"ok", "error", "at"}; None before one
        self.reload: dict | None = None
        # cumulative over the process lifetime, unlike the bounded latency sample
        self._infer_buckets = [0] * (len(INFER_BUCKETS_S) + 1)   # last: over the top bound
        self._infer_sum_s = 0.0

    def error(self, where: str) -> int | None:
        """Count a contained failure at `where`; its count when it deserves a log line (the
        first 5, then every 1000th: a failure on every sample must not flood the journal),
        else None."""
        self.errors[where] += 1
        n = self.errors[where]
        return n if n <= 5 or n % 1000 == 0 else None

    def bad(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.malformed[reason] += n

    def infer_ms(self, ms: float) -> None:
        self._lat_ms.append(ms)
        i = bisect_left(INFER_BUCKETS_S, ms / 1e3)
        with self._lock:   # runs from several HTTP threads at once
            self._infer_buckets[i] += 1
            self._infer_sum_s += ms / 1e3

    @property
    def infer_total_s(self) -> float:
        """Seconds spent in inference over the process lifetime."""
        with self._lock:
            return self._infer_sum_s

    def infer_histogram(self) -> tuple[list[tuple[float, int]], float, int]:
        """([(upper bound s, cumulative count)...], sum s, count), Prometheus-style."""
        with self._lock:
            counts, total = list(self._infer_buckets), self._infer_sum_s
        cum, out = 0, []
        for le, c in zip(INFER_BUCKETS_S, counts):
            cum += c
            out.append((le, cum))
        return out, total, cum + counts[-1]

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
            "uptime_s": round(time.monotonic() - self.started, 1),
            "samples_in": self.samples_in,
            "samples_idle": self.samples_idle,
            "steps": self.steps,
            "stream_steps": self.stream_steps,
            "windows_inferred": self.windows_inferred,
            "windows_skipped": self.windows_skipped,
            "inference_ms": self.latency_ms(),
            "malformed": malformed,
            "dropped": dict(self.dropped),
            "alerts": dict(self.alerts),
            "errors": dict(self.errors),
            "reload": self.reload,
        }

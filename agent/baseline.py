"""A stream's baseline: the scaler and the threshold that say what normal is for it.

Learning period: with calibration enabled, a stream's first `calibration.samples`
samples (or, with `calibration.duration_s`, the samples of its first that many
seconds of sample time, a clock's steps not counted: agent/sample_clock.py)
are held back, not scored.  When the period ends, the
scaler is fitted on them (`contract.fit_scaler`; with `fit: mean` only its mean, the
std staying the model's); the stream then pushes them through its ring and the
threshold is fitted on their window scores (`contract.fit_threshold`, smoothed as
every later score is), or with `threshold: model` is the model's x the margin.  Without
calibration the model's own scaler and threshold serve from the first sample on.
After the period, adaptation (adaptation.py) may move the mean, and a fitted threshold
may be refined once on the stream's steady running (refine.py, `calibration.refine`).

A fitted baseline is a plain record (`to_record` / `restore`) that the state store
persists, tied to the model's sha256.
"""
from __future__ import annotations

import logging
import mmap
import time

import numpy as np

from .config import CalibrationConfig
from .contract import StreamScaler, fit_scaler, fit_threshold
from .model_meta import ModelMeta
from .refine import Refiner

log = logging.getLogger("tsad.baseline")

LEVEL_FLOOR = 1.0


def _unheaped(rows: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps [cap] and values [cap, channels], cap >= rows, in an anonymous mapping of
    their own (whole pages, all used), which goes back to the system when both are freed.

    A learning period's buffer (16 KB a stream at 400 samples and 8 channels) is made when
    its stream appears, among that stream's long-lived objects, and freed when learning
    ends.  In glibc's heap it left holes that later small blocks split, so pages stayed
    resident: when 500 streams started together the daemon kept 20.7-21.8 KB a stream
    with `mqtt.read_bytes` and 18.2-19.1 without; with the buffers mapped apart,
    17.3-17.5 and 17.3-17.7 (benchmarks/soak.py; docs/RESULTS.md, fourteenth session)."""
    row = 8 + 4 * channels
    size = -(-rows * row // mmap.PAGESIZE) * mmap.PAGESIZE
    cap = size // row
    try:
        buf = mmap.mmap(-1, size)
    except (OSError, ValueError):        # out of mappings or memory: the heap still works
        return np.empty(rows, np.float64), np.empty((rows, channels), np.float32)
    return (np.frombuffer(buf, np.float64, cap),
            np.frombuffer(buf, np.float32, cap * channels, cap * 8).reshape(cap, channels))


class _Held:
    """The learning period's samples, copied into one pair of growing arrays (outside the
    heap: _unheaped): a daemon receives samples one message at a time, and a list of
    one-row arrays costs about seven times the data it holds."""

    __slots__ = ("n", "_ts", "_values", "channels", "first_cap", "since", "_el", "breaks")

    def __init__(self, channels: int, first_cap: int):
        self.channels, self.first_cap = channels, max(first_cap, 16)
        self.n = 0
        self._ts: np.ndarray | None = None
        self._values: np.ndarray | None = None
        self.since = 0.0            # monotonic time of the first sample held
        self._el = [0.0, 0.0]       # the elapsed times of the first and the newest held
        # held counts at which the machine ran again after a stop (agent/running.py): no
        # learning window joins the running before a stop to the running after it
        self.breaks: list[int] = []

    def add(self, ts: np.ndarray, values: np.ndarray, el: tuple[float, float]) -> None:
        """`el`: the elapsed times of the first and last of `ts` (agent/sample_clock.py)."""
        m = len(ts)
        if not self.n:
            self.since = time.monotonic()
            self._el[0] = el[0]
        self._el[1] = el[1]
        if self._ts is None:
            self._ts, self._values = _unheaped(max(self.first_cap, m), self.channels)
        elif self.n + m > len(self._ts):
            grown, grown_values = _unheaped(max(2 * len(self._ts), self.n + m), self.channels)
            grown[:self.n] = self._ts[:self.n]
            grown_values[:self.n] = self._values[:self.n]
            self._ts, self._values = grown, grown_values
        self._ts[self.n:self.n + m] = ts
        self._values[self.n:self.n + m] = values
        self.n += m

    def span(self, now: float) -> float:
        """How long these samples were held for: their elapsed time's span (a device clock
        reset back to 2000 must not make a day's learning look like none), but no longer
        than the wall time since the first (a device clock's step forward, or a client's
        made-up times, must not make a few samples look like a day's learning)."""
        if not self.n:
            return 0.0
        return max(0.0, min(self._el[1] - self._el[0], now - self.since))

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """The held samples; the buffer is released."""
        if self._ts is None:
            out = np.empty(0, np.float64), np.empty((0, self.channels), np.float32)
        else:
            out = self._ts[:self.n], self._values[:self.n]
        self._ts = self._values = None
        self.n = 0
        return out


class Baseline:
    __slots__ = ("fixed_threshold", "scaler", "threshold", "level", "fitted_at", "samples_used",
                 "_held", "_first_ts", "_ended", "meta", "cal", "refiner", "refined_from",
                 "refined", "unsaved")

    def __init__(self, meta: ModelMeta, cal: CalibrationConfig, fixed_threshold: float | None):
        self.meta, self.cal = meta, cal
        # scoring.threshold given as a number wins over any fitted threshold
        self.fixed_threshold = fixed_threshold
        self.scaler: StreamScaler | None = None
        self.threshold = 0.0
        self.level: np.ndarray | None = None     # per-channel typical error (normalize)
        self.fitted_at: str | None = None
        self.samples_used = 0
        # a fitted threshold's refinement while it is due; the learned one once it is done
        self.refiner: Refiner | None = None
        self.refined_from: float | None = None
        self.refined = False                     # done (the threshold may have stayed)
        self.unsaved = False                     # refined since the engine last queued a save
        # only while learning: a learned stream does not keep the empty holder (0.5 KB)
        self._held: _Held | None = self._new_held() if cal.enabled else None
        self._first_ts: float | None = None
        self._ended = False
        if not cal.enabled:
            self.scaler = StreamScaler.from_meta(meta)
            self.threshold = self._default_threshold()

    def _new_held(self) -> _Held:
        return _Held(self.meta.n_channels, self.cal.samples if self.cal.duration_s is None
                     else 1024)

    def _default_threshold(self) -> float:
        return float(self.meta.threshold.value if self.fixed_threshold is None
                     else self.fixed_threshold)

    # ------------------------------------------------------------ learning period
    @property
    def learning(self) -> bool:
        return self.scaler is None

    @property
    def needed(self) -> int | None:
        """Samples still to come before the period ends; None when it is set by duration."""
        if not self.learning or self.cal.duration_s is not None:
            return 0 if not self.learning else None
        return self.cal.samples - self._held.n

    @property
    def held(self) -> int:
        """Samples held for the learning period so far."""
        return self._held.n if self._held is not None else 0

    def learning_for(self, now: float) -> float:
        """How long this learning period has held samples, by `now` (monotonic; `_Held.span`),
        0 when it holds none or is over. An idle stream that has learned this long may stay
        as long (Engine.evict_idle): a machine that stands every night must not lose a
        learning period longer than its working day."""
        return self._held.span(now) if self._held is not None else 0.0

    @property
    def period_over(self) -> bool:
        return self._ended

    def hold(self, ts: np.ndarray, values: np.ndarray, off: float | np.ndarray = 0.0) -> int:
        """Keep the samples that belong to the learning period; returns how many it kept.
        Once `period_over`, the caller fits the baseline (`take_held`, `fit_*`).  `off`:
        the samples' clock offsets; a period set by duration runs on ts + off, the stream's
        elapsed time (agent/sample_clock.py), so a clock step back does not lengthen it, nor
        a live stream's step forward end it."""
        if self.cal.duration_s is None:
            take = min(len(ts), self.cal.samples - self._held.n)
            ended = self._held.n + take >= self.cal.samples
        else:
            el = ts + off
            if self._first_ts is None and len(ts):
                self._first_ts = float(el[0])
            after = np.flatnonzero(el >= self._first_ts + self.cal.duration_s)
            take = int(after[0]) if len(after) else len(ts)
            ended = len(after) > 0
        if take:
            o = (float(off),) * 2 if np.ndim(off) == 0 else (float(off[0]), float(off[take - 1]))
            self._held.add(ts[:take], values[:take], (float(ts[0]) + o[0],
                                                      float(ts[take - 1]) + o[1]))
        self._ended = ended and self._held.n > 0
        return take

    def pause(self, span: float) -> None:
        """A stop of `span` s in the middle of a learning period (agent/running.py): the
        samples after it start new windows, and a period set by duration counts no time."""
        if self._held is not None and self._held.n and self._held.n not in self._held.breaks:
            self._held.breaks.append(self._held.n)
        if self._first_ts is not None and self.cal.duration_s is not None:
            self._first_ts += max(0.0, span)

    def held_span(self) -> float:
        """The elapsed time the held samples span (clock steps taken out: sample_clock.py)."""
        return self._held.span(np.inf) if self._held is not None else 0.0

    def take_held(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """The held samples (ts, raw values, where the machine ran again after a stop); the
        period is reset."""
        breaks = self._held.breaks
        ts, raw = self._held.take()
        self._held = None
        self._first_ts, self._ended = None, False
        return ts, raw, breaks

    def fit_scaler(self, raw: np.ndarray, stream: str) -> None:
        try:
            sc = fit_scaler(raw, np.asarray(self.meta.scaler.std), self.cal.std_floor,
                            self.meta.calibration_std_scale)
            self.scaler = sc if self.cal.fit == "scaler" else \
                StreamScaler(sc.mean, np.asarray(self.meta.scaler.std))
        except ValueError as e:
            self.scaler = StreamScaler.from_meta(self.meta)
            log.error("stream %s: cannot learn its scaler (%s); using the model's", stream, e)
        self.samples_used = len(raw)

    def fit_level(self, err: np.ndarray) -> None:
        """Each channel's typical error on the learning windows (the median), floored at
        LEVEL_FLOOR x the channels' mean: a channel the model reproduces almost exactly
        must not turn its smallest wobble into the whole score."""
        med = np.median(np.asarray(err, np.float64), axis=0)
        floor = max(LEVEL_FLOOR * float(med.mean()), 1e-12)
        self.level = np.maximum(med, floor)

    def fit_threshold(self, smoothed: np.ndarray | None, normalized: bool = False) -> None:
        """From the learning windows' smoothed scores; None when no window was complete.
        `normalized`: the scores are per-channel normalised (scoring.normalize)."""
        if self.fixed_threshold is not None:
            self.threshold = float(self.fixed_threshold)
        elif self.cal.threshold == "model":
            self.threshold = float(self.meta.threshold.value) * self.cal.margin
        elif smoothed is None or not len(smoothed):
            self.threshold = self._default_threshold()
        else:
            # the model's calibration_margin was measured on its own score, not on the
            # per-channel normalised one
            model_margin = 1.0 if normalized else (self.meta.calibration_margin or 1.0)
            self.threshold = fit_threshold(smoothed, self.cal.quantile,
                                           self.cal.margin * model_margin)
            self._refine_later()
        self.fitted_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def _refine_later(self, progress: dict | None = None) -> None:
        self.refiner = None if self.cal.refine is None else \
            Refiner(self.cal.refine, self.cal.quantile, progress)
        self.refined_from, self.refined = None, False

    def refine(self) -> tuple[float | None, int]:
        """Refinement's moment (refine.py): (the new threshold or None, windows counted)."""
        new, n = self.refiner.refined(self.threshold)
        self.refiner, self.refined, self.unsaved = None, True, True
        if new is not None:
            self.refined_from, self.threshold = self.threshold, new
        return new, n

    def relearn(self) -> None:
        """Start a new learning period (after maintenance or a set-point change)."""
        if self.cal.enabled:
            self.refiner, self.refined_from, self.refined = None, None, False
            self.scaler = None
            self._held = self._new_held()
            self._first_ts, self._ended = None, False

    # ------------------------------------------------------------ persistence
    def to_record(self) -> dict:
        rec = {"mean": self.scaler.mean.tolist(), "std": self.scaler.std.tolist(),
               "threshold": self.threshold, "samples": self.samples_used,
               "fitted_at": self.fitted_at}
        if self.level is not None:
            rec["level"] = self.level.tolist()
        if self.refined:        # null: refined, and the learned threshold stayed
            rec["refined_from"] = self.refined_from
        elif self.refiner is not None:
            rec["refining"] = self.refiner.progress()
        return rec

    def restore(self, record: dict) -> None:
        self._held = None
        self.scaler = StreamScaler(np.asarray(record["mean"]), np.asarray(record["std"]))
        self.threshold = (float(record["threshold"]) if self.fixed_threshold is None
                          else float(self.fixed_threshold))
        self.samples_used = int(record.get("samples") or 0)
        self.fitted_at = record.get("fitted_at")
        if record.get("level") is not None:     # checked by state_store: one value a channel
            self.level = np.asarray(record["level"], np.float64)
        # refined before the restart: kept while the config still refines (re-baseline to
        # refine again), the learned threshold back once it does not; not yet: resumed
        # where the save left it (refine.py).  A threshold the config fixes is not learned.
        was = record.get("refined_from")
        if self.fixed_threshold is not None or self.cal.threshold != "fit":
            self.refiner, self.refined_from, self.refined = None, None, False
        elif "refined_from" not in record:
            self._refine_later(record.get("refining"))
        elif self.cal.refine is None:
            self.refiner, self.refined_from, self.refined = None, None, False
            if was is not None:
                self.threshold = float(was)
        else:
            self.refiner, self.refined_from, self.refined = None, was, True

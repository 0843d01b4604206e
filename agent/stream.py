"""One stream's detection state and the two halves of its step.

`ingest` takes raw samples: while the baseline is learning it holds them; then they
are scaled (with the adapted scaler, adaptation.py) and appended to the ring, which
returns the windows that fell due.  `conclude` takes those windows' scores:
smoothing, the alert tracker, the samples the adapter may learn from, and the result
the sinks see.  The engine runs the model between the two, once for every stream
that has windows due.

A learning period over (`fit_due`) is fitted by `end_learning` when the engine gives it
room in a step; it replays the held samples through the ring in chunks of at most
`max_batch` windows, so a long period (a day at 1 Hz) never materialises all its
windows at once.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .alerts import AlertTracker
from .adaptation import CHANNEL_OK, EPOCH, Adapter
from .baseline import Baseline
from .config import AdaptationConfig
from .contract import score_windows
from .pace import Pace
from .refine import needed
from .ring import RingBuffer, Windows
from .sample_clock import SampleClock
from .scoring import Smoother, level_excess
from .stream_pieces import StreamPieces
from .stream_status import StreamStatus

log = logging.getLogger("tsad.stream")


Infer = Callable[[np.ndarray], np.ndarray]
# A learning period's fit longer than this holds every stream's scoring back visibly:
# the log says so (a day of samples, or a heavy model: agent/fit_budget.py).
LONG_FIT_S = 10.0


@dataclass
class StreamResult:
    """What one step produced for one stream: per-window arrays of equal length."""
    stream: str
    ts: np.ndarray          # float64 [k] newest sample of each window
    scores: np.ndarray      # float64 [k] smoothed
    threshold: float
    labels: np.ndarray      # int8 [k] score >= threshold
    alert_open: np.ndarray  # int8 [k] an alert is open at that window
    events: list[dict]      # alert events, in order
    # states the stream entered during the step, in order ("learning", "normal", "no_data", ...)
    entered: list[str] = field(default_factory=list)

    @classmethod
    def of_events(cls, sid: str, threshold: float, events: list[dict]) -> "StreamResult":
        """A result without windows: events made outside them (an alert a stop ended)."""
        return cls(sid, _EMPTY_F, _EMPTY_F, threshold, _EMPTY_I, _EMPTY_I, events)


_EMPTY_F, _EMPTY_I = np.empty(0, np.float64), np.empty(0, np.int8)


class Stream(StreamStatus, StreamPieces):
    # slots here and in the objects a stream holds (ring, pace, smoother, baseline, tracker,
    # adapter): no instance dict, about 56 bytes less per object (benchmarks/bench_memory.py)
    __slots__ = ("normalize", "level_band", "max_batch", "pace", "adaptation", "adapter",
                 "_pieces", "samples", "last_ts", "last_seen",
                 "rebaseline_due", "entered", "id", "source", "ring", "smoother", "baseline",
                 "tracker", "clock", "judged", "gate")

    def __init__(self, sid: str, source: str, ring: RingBuffer, smoother: Smoother,
                 baseline: Baseline, tracker: AlertTracker, max_batch: int, pace: Pace,
                 adaptation: AdaptationConfig, normalize: bool = False,
                 level_band: float | None = None):
        self.id, self.source = sid, source
        self.normalize = normalize
        self.level_band = level_band
        self.ring, self.smoother, self.baseline, self.tracker = ring, smoother, baseline, tracker
        self.max_batch = max_batch
        self.pace = pace
        self.adaptation = adaptation
        self.adapter: Adapter | None = None
        # ingested pieces not concluded yet (_piece: raw, windows?, error level, err); a list, not a
        # deque: it holds a piece or two, and an empty deque costs 0.7 KB per stream
        self._pieces: list = []
        self.samples = 0
        self.last_ts = float("nan")     # newest sample time (stamps alerts closed at a stop)
        self.last_seen = 0.0            # monotonic time of the newest batch (idle eviction)
        self.clock = SampleClock()      # the elapsed time the tracker's gates run on
        self.rebaseline_due = False     # a standing alert asked for a new learning period
        # states entered since the engine last collected them (see StreamResult.entered)
        self.entered: list[str] = []    # "learning" comes with the first sample (_first)
        self.judged = False             # a window concluded: until then no verdict to show
        self.no_data, self._flaps = (), None      # stream_status.py
        self.gate = None                # agent/running.py's RunGate, with `running:`
        if not baseline.learning:
            self._start_adapting()

    @property
    def threshold(self) -> float:
        return self.baseline.threshold

    @property
    def shelved(self) -> bool:
        """A shelve is in force: it ends after the newest sample (any, before the first)."""
        return self.tracker.shelved_until > (self.last_ts + self.clock.offset if self.samples
                                             else -np.inf)

    def shelve(self, for_s: float) -> float:
        """No new alert for `for_s` seconds of sample time (0 lifts a shelve); the sample
        time it ends.  Before the first sample it runs on the wall clock (`_first`).  The
        tracker keeps it in elapsed time (sample_clock.py): a clock step back keeps what
        it has left."""
        until = (self.last_ts if self.samples else time.time()) + for_s
        self.tracker.shelve(until + self.clock.offset if for_s > 0 else -np.inf)
        return until

    @property
    def scaler(self):
        """The scaler in force now (learned, then adapted)."""
        return self.adapter.scaler if self.adapter else self.baseline.scaler

    def _start_adapting(self) -> None:
        self.adapter = (Adapter(self.adaptation, self.baseline.scaler, self.pace,
                                self.baseline.level)
                        if self.adaptation.enabled else None)

    # ------------------------------------------------------------ step, first half
    def ingest(self, ts: np.ndarray, values: np.ndarray) -> tuple[int, Windows | None]:
        """Raw samples in: (how many it took, the windows now due or None); not while
        `fit_due`.  It takes fewer than offered at the end of a learning period, of the
        adaptation epochs whose scalers exist (LAG + 1 at most; one, of `max_batch` at most,
        with `alerts.rebaseline_after_s`), or (without adaptation) of `max_batch`; 0 when its
        scaler waits for earlier windows to be concluded."""
        if self.baseline.learning:     # the engine fits it (end_learning) once it is over
            k = self.baseline.hold(ts, values, self.clock.peek(ts))
            self._took(ts[:k])
            return k, None
        if self.adapter is None:
            k = self._refine_room(ts[:self.max_batch])
            off = self._took(ts[:k])
            return k, self._pushed(self._push(ts[:k], self.baseline.scaler.apply(values[:k]), off))
        # up to LAG + 1 epochs at once (each scaled by its own version): one ring push,
        # one conclusion and one engine call for up to 192 windows
        k = min(len(ts), self.adapter.room())
        if self.tracker.cfg.rebaseline_after_s is not None:
            # the engine re-baselines between ingests: with rebaseline_after_s an ingest
            # holds one epoch, max_batch samples at most
            k = min(k, self.max_batch, EPOCH - self.adapter.ingested % EPOCH)
        if k == 0:
            return 0, None
        k = self._refine_room(ts[:k])
        parts = self.adapter.pieces(k)
        self.adapter.took(k)
        ts, values = ts[:k], values[:k]
        off = self._took(ts)
        if len(parts) == 1:     # one version (a daemon's samples)
            scaler, level = self.adapter.at(parts[0][2])
            w = self._push(ts, scaler.apply(values), off)
            self._pieces.append([values, w is not None, level, None])
        else:
            w = self._push(ts, self._scaled(values, parts), off)
            self._pieces.append(self._piece(values, w, parts))
        self._settle()
        return k, self._pushed(w)

    def _refine_room(self, ts: np.ndarray) -> int:
        """How many of these samples one block may hold: none crosses the moment a
        threshold refinement is due; its span waits through stops (refine.py)."""
        r = self.baseline.refiner
        return len(ts) if r is None else r.room(ts + self.clock.peek(ts), self.ring.gap_reset_s)

    def _pushed(self, w: Windows | None) -> Windows | None:
        """After an ingest's push: the refiner counts its windows, no_data is watched."""
        self._watch()
        if self.baseline.refiner is not None:
            self.baseline.refiner.took(0 if w is None else len(w))
        return w

    def _took(self, ts: np.ndarray) -> float | np.ndarray:
        """Count the samples taken; their clock offsets (SampleClock.take)."""
        if not len(ts):
            return self.clock.offset
        if not self.samples:
            self._first(float(ts[0]))
        self.samples += len(ts)
        if self.pace.learning:
            self.pace.observe(ts, self.id)
        self.last_ts = float(ts[-1])
        return self.clock.take(ts)

    def _first(self, t0: float) -> None:
        """`learning` or `warming_up` shows from the first sample.  A shelve given before
        it ran on the wall clock; now it runs on sample time, keeping what it had left: a
        device clock can be years off."""
        self.entered.append(self.state)
        until = self.tracker.shelved_until
        if np.isfinite(until):
            self.tracker.shelve(t0 + max(0.0, until - time.time()))

    def _push(self, ts: np.ndarray, scaled: np.ndarray, off=0.0) -> Windows | None:
        resets = self.ring.resets
        w = self.ring.push(ts, scaled)
        w.off = off[w.rows] if isinstance(off, np.ndarray) else off
        # backing off to hourly as bad input does (a bursty gateway: 144 lines a day before)
        if self.ring.resets > resets and self._flap("window_restart") is not None:
            log.warning("stream %s: a gap of over %.3g s between samples: its window starts "
                        "again (%d restart(s) so far; counted in health ring_resets)", self.id,
                        self.ring.gap_reset_s, self.ring.resets)
        return w if len(w) else None

    @property
    def fit_due(self) -> bool:
        """Its learning period is over and waits for `end_learning` (`ingest` takes none)."""
        return self.baseline.learning and self.baseline.period_over

    def end_learning(self, infer: Infer) -> float:
        """Fit the baseline on the held samples: scaler, error level and threshold, from
        the windows the held samples make.  Returns the seconds it took."""
        started = time.perf_counter()
        b = self.baseline
        span = b.held_span()
        ts, raw, breaks = b.take_held()
        b.fit_scaler(raw, self.id)
        scaled = b.scaler.apply(raw)
        errs = []
        for s0, s1 in zip([0, *breaks], [*breaks, len(ts)]):   # the running between stops
            if s0:
                self.ring.reset()
            for a in range(s0, s1, self.max_batch):
                e = min(a + self.max_batch, s1)
                w = self._push(ts[a:e], scaled[a:e])
                if w is not None:
                    errs.append(self.scored(w.x, *score_windows(w.x, infer(w.x)))[1])
        if errs:
            err = np.concatenate(errs)
            fin = np.isfinite(err).all(axis=1)
            if not fin.any():
                raise ValueError("the model returned NaN or infinity for every learning window")
            if not fin.all():
                log.warning("stream %s: the model returned NaN or infinity for %d of its %d "
                            "learning windows: the baseline is fitted on the others", self.id,
                            len(fin) - int(fin.sum()), len(fin))
                err = err[fin]
            b.fit_level(err)
            if self.normalize:
                err = err / b.level
            b.fit_threshold(self.smoother.update(err.mean(axis=1)), self.normalize)
        else:
            b.fit_threshold(None)
            log.error("stream %s: no complete window of %d samples in its %d learning samples "
                      "(%d window restart(s) after time gaps, %d window(s) skipped for missing "
                      "values); using the threshold %.4g", self.id, self.ring.window, len(ts),
                      self.ring.resets, self.ring.skipped, b.threshold)
        took = time.perf_counter() - started
        # the span in sample time, steps taken out: what a learning period really covered
        log.log(logging.WARNING if took > LONG_FIT_S else logging.INFO,
                "stream %s: learned its baseline on %d samples (%.3g min of sample time) in "
                "%.3g s, threshold %.4g%s", self.id, len(ts), span / 60, took, b.threshold,
                "; no stream's samples were scored meanwhile (README: How long to learn)"
                if took > LONG_FIT_S else "")
        self._start_adapting()
        self.judged = True      # the fit scored its windows; the next ones are judged
        self.entered.append("normal")
        return took

    # ------------------------------------------------------------ step, second half
    def conclude(self, w: Windows, scores: np.ndarray, err: np.ndarray,
                 shown: np.ndarray) -> StreamResult:
        """Scores of windows `ingest` returned, in order -> the result.  `scores` are
        unsmoothed, `err` the per-channel errors, `shown` them as alerts show them and
        `scores` sums them: divided by `shown_level()` when that is not None."""
        piece = self._pieces[0] if self.adapter is not None else None
        if w.dropped and self.baseline.refiner is not None:
            self.baseline.refiner.dropped(w.dropped)
        if not len(w):      # every window of the block dropped (agent/model_call.py)
            if piece is not None:
                piece[1] = False
                self._settle()
            return StreamResult.of_events(self.id, self.threshold, [])
        level = piece[2] if piece is not None else self.baseline.level
        s = self.smoother.update(scores)     # chunk-independent: one block for all parts
        refiner = self.baseline.refiner
        if refiner is not None and refiner.due():
            self._refine()
            refiner = None
        thr = self.baseline.threshold
        events = self.tracker.update(w.ts, s, thr, shown, w.off)
        win_ok = (self.tracker.labels | self.tracker.open_mask) == 0     # both 0/1
        if refiner is not None:
            refiner.keep(w.ts + w.off, s, thr, win_ok)
        if piece is not None:
            # all windows normal (the usual case): every channel may be learned from
            ok = win_ok[:, None] if level is None or win_ok.all() else \
                win_ok[:, None] | (err <= CHANNEL_OK * level)
            n, c = len(piece[0]), err.shape[1]
            if len(w.rows) == n:        # every sample closed a window (stride 1, warm)
                piece[1], piece[3] = ok, err      # ok may be [n, 1]: the adapter widens it
            else:
                piece[1] = np.zeros((n, c), bool)
                piece[1][w.rows] = ok
                piece[3] = np.full((n, c), np.nan)
                piece[3][w.rows] = err
            self._settle()
        entered = [("anomaly" if ev["type"] == "new" else "normal") for ev in events
                   if ev["type"] != "update"]
        # the first verdict ends "warming_up", and the first after no_data
        again = self._scored() or not self.judged
        self.entered += entered or ([self.tracker.state] if again else [])
        self.judged = True
        # the engine re-baselines once this step's windows are all concluded
        self.rebaseline_due = self.rebaseline_due or self.tracker.rebaseline_due()
        return StreamResult(self.id, w.ts, s, thr, self.tracker.labels, self.tracker.open_mask,
                            events)

    def _refine(self) -> None:
        was = self.baseline.threshold
        new, n = self.baseline.refine()
        if new is None:
            log.info("stream %s: threshold kept at %.4g: the %d normal windows of its "
                     "refinement span (at least %d needed) allow no lower one", self.id, was,
                     n, needed(self.baseline.cal.quantile))
        else:
            log.info("stream %s: threshold refined from %.4g to %.4g on %d normal windows",
                     self.id, was, new, n)

    def judge(self, values: np.ndarray, infer: Infer) -> tuple[float, np.ndarray]:
        """One window of raw values [window, C] scored as this stream scored its newest
        sample: with the scaler and error level that sample was scaled with (adaptation
        lags its newest version by LAG epochs), its level band and channel normalisation;
        but unsmoothed (one window has no earlier scores to smooth with), while the
        stream's own scores are smoothed and its threshold was fitted on them:
        (score, per-channel error as shown in top_channels)."""
        scaler, level = (self.adapter.newest() if self.adapter is not None
                         else (self.baseline.scaler, self.baseline.level))
        x = scaler.apply(values)[None]
        scores, err = self.scored(x, *score_windows(x, infer(x)))
        if self.normalize and level is not None:
            err = err / level
            return float(err[0].mean()), err[0]
        return float(scores[0]), err[0]

    def scored(self, x: np.ndarray, scores: np.ndarray,
               err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model's (scores, per-channel error) of windows x, with scoring.level_band's
        excess added to each channel's error (and so to the score, the channels an alert
        blames, and what adaptation freezes)."""
        if self.level_band is None:
            return scores, err
        err = err + level_excess(x[:, -1, :], self.level_band)
        return np.add.reduce(err, axis=1) / err.shape[1], err

    def relearn(self) -> dict | None:
        """Forget the baseline and start a new learning period; the end event of an open
        alert (reason "rebaseline"), or None."""
        ev = self.tracker.close(self.last_ts, self.baseline.threshold, "rebaseline")
        self.rebaseline_due = False
        self.baseline.relearn()
        self.ring.reset()
        self.no_data = ()       # learned anew: the ring watches again from its reset
        self.smoother.reset()
        self._pieces.clear()
        if self.baseline.learning:
            self.adapter = None
            self.entered.append(self.state)     # "idle" while the machine stands
        else:
            self._start_adapting()
            if ev is not None:
                self.entered.append("normal")
        return ev

"""Adaptation: a learned baseline that keeps following slow normal change.

After its learning period, a stream's scaler mean tracks its own normal samples with
an exponentially weighted moving average of time constant `time_constant_s`, so
warm-up, shifts and seasons do not turn into standing alarms.  Rules:

- Only normal values count.  A sample whose window scored under the threshold with no
  alert open counts for every channel; while windows score anomalous or an alert is
  open, a channel counts only while its own error stays within CHANNEL_OK times its
  typical error: the channels behind the anomaly are frozen, so a fault is never
  learned as normal while it is reported, and the others keep following their own
  drift (a motor warming up during a valve fault), so the alert can close when the
  fault does.
- Bounded, so a slow fault still alarms: a value further than `gate` stds from the
  current mean is not used (a step is never absorbed by the EWMA, only drift is); the
  mean never leaves `learned mean +- max_shift x learned std` (when set); and a ramp
  is followed with a lag of slope x time_constant_s, so a fault that grows faster than
  the baseline follows shows up as that lag.
- Exact and chunk-independent: samples are counted in epochs of EPOCH samples from the
  end of the learning period.  The mean changes only between epochs, and sample i is
  scaled with the mean as it stood after epoch i // EPOCH - 2 ended (version v = the
  mean after epochs < v).  So the daemon fed one sample at a time and `evaluate`
  feeding 192-row chunks compute the same scores, bit for bit, and the lag (at most
  3 epochs) is negligible against any useful time constant.  The lag also lets one
  ingest hold up to LAG + 1 epochs (SPAN samples), each scaled by its own version: a
  long chunk costs one pass of the engine per 192 samples instead of per 64.
- The std stays as learned: a variance that grows is itself a symptom (vibration).
"""
from __future__ import annotations

import math

import numpy as np

from .config import AdaptationConfig
from .contract import StreamScaler

EPOCH = 64          # samples per scaler version
FOLD = 16           # concluded samples buffered before they are added to the epoch's sums
LAG = 2             # versions between a sample and the scaler that scales it
SPAN = (LAG + 1) * EPOCH    # the most samples one ingest holds (Adapter.room)
CHANNEL_OK = 4.0    # error (squared) within this x the channel's typical error: normal


class Adapter:
    __slots__ = ("cfg", "learned", "scaler", "level", "version", "_by_version", "pace", "_raw",
                 "_ok", "_err", "_filled", "_sums", "seen", "ingested")

    def __init__(self, cfg: AdaptationConfig, scaler: StreamScaler, pace,
                 level: np.ndarray | None = None):
        """`pace`: the stream's sampling interval (`.interval`, seconds; learned, so read at
        each epoch); a time constant is in seconds, an epoch in samples."""
        self.cfg = cfg
        self.learned = scaler
        self.scaler = scaler                      # the newest version
        self.level = level                        # per-channel typical error, or None
        self.version = 0                          # epochs folded into `scaler`
        self._by_version = {0: (scaler, level)}
        self.pace = pace
        # The current epoch's concluded samples, added to its per-channel sums every FOLD
        # samples: one set of array operations per FOLD samples instead of per piece (a
        # daemon concludes a sample or a few at a time), and the sums add the same rows in
        # the same order however the samples were chunked.  FOLD = EPOCH / 4: buffers of
        # 1.2 KB a stream at 8 channels (4.6 for a whole epoch), 0.7 KB less than at
        # EPOCH / 2, which brought the daemon under 20 KB a stream.  The two extra sets of
        # operations an epoch cost about 6 % of the engine's time in the daemon's pattern
        # (folds take 14 % of a step against 8 % at EPOCH / 2), which the whole agent's CPU
        # per message does not show (docs/RESULTS.md, seventh session).
        c = len(scaler.mean)
        self._raw = np.empty((FOLD, c), np.float32)       # samples arrive as float32
        self._ok = np.zeros((FOLD, c), bool)
        # errors as float32: they only set the scale of each channel's typical error, for
        # which 7 digits are plenty, and at half the size (0.5 KB a stream at 8 channels)
        self._err = np.full((FOLD, c), np.nan, np.float32) if level is not None else None
        self._filled = 0                          # buffered rows not added to the sums yet
        # the epoch's sums so far: (sum, count) of the learnable values per channel (then,
        # with a level, of their errors: 2C columns); None at the start of an epoch
        self._sums: tuple[np.ndarray, np.ndarray] | None = None
        self.seen = 0                             # samples concluded since learning ended
        self.ingested = 0                         # samples ingested since learning ended

    # ------------------------------------------------------------ ingest side
    def room(self) -> int:
        """Samples the stream may ingest now: up to the end of the last epoch whose scaler
        exists (epoch version + LAG), so one ingest may hold up to LAG + 1 epochs."""
        return max((self.version + LAG + 1) * EPOCH - self.ingested, 0)

    def pieces(self, k: int) -> list[tuple[int, int, int]]:
        """(start, end, version) of the next k samples, in order: cut at every epoch's end."""
        out, i, end = [], self.ingested, self.ingested + k
        if end <= (i // EPOCH + 1) * EPOCH:    # one part (a daemon's samples)
            return [(0, k, max(i // EPOCH - LAG, 0))]
        while i < end:
            e = i // EPOCH
            j = min(end, (e + 1) * EPOCH)
            out.append((i - self.ingested, j - self.ingested, max(e - LAG, 0)))
            i = j
        return out

    def at(self, version: int) -> tuple[StreamScaler, np.ndarray | None]:
        """(scaler, error level) of a version still in use."""
        return self._by_version[version]

    def newest(self) -> tuple[StreamScaler, np.ndarray | None]:
        """(scaler, error level) of the version that scaled the newest sample taken."""
        v = max((self.ingested - 1) // EPOCH - LAG, 0)
        return self._by_version.get(v) or (self.scaler, self.level)

    def took(self, n: int) -> None:
        self.ingested += n

    # ------------------------------------------------------------ conclude side
    def observe(self, raw: np.ndarray, ok: np.ndarray | None, err: np.ndarray | None = None) -> None:
        """The concluded samples of one piece (of one or more epochs), in order: raw values
        [n, C], which values may be learned from (bool [n, C] or [n, 1]; None: none of
        them), and the errors [n, C] of their windows (NaN for a sample without one)."""
        m = len(raw)
        if self._filled + m < FOLD:     # into the buffer, nothing to fold (a daemon's samples)
            self._buffer(raw, ok, err)
            return
        a = 0
        while a < m:
            t = min(m - a, FOLD - self._filled)
            if t == FOLD:       # whole folds up to the epoch's end, straight from the piece
                t = min(m - a, EPOCH - self.seen % EPOCH) // FOLD * FOLD
                self._fold(np.asarray(raw[a:a + t], np.float32), None if ok is None else ok[a:a + t],
                           None if err is None or self._err is None else err[a:a + t])
                self.seen += t
            else:
                self._buffer(raw[a:a + t], None if ok is None else ok[a:a + t],
                             None if err is None else err[a:a + t])
                if self._filled == FOLD:
                    self._filled = 0
                    self._fold(self._raw, self._ok, self._err)
            a += t
            if not self._filled and self.seen % EPOCH == 0:    # FOLD divides EPOCH
                self._end_epoch()

    def _buffer(self, raw: np.ndarray, ok: np.ndarray | None, err: np.ndarray | None) -> None:
        i, m = self._filled, len(raw)
        self._raw[i:i + m] = raw
        self._ok[i:i + m] = False if ok is None else ok
        if self._err is not None:
            self._err[i:i + m] = np.nan if err is None else err
        self._filled = i + m
        self.seen += m

    def _fold(self, raw: np.ndarray, ok: np.ndarray | None, err: np.ndarray | None) -> None:
        """Add rows (float32, whole FOLDs of one epoch) to the epoch's sums: the buffer's, or
        a long piece's without copying them into it."""
        x = raw.astype(np.float64)
        # the gate in learned stds (the std never adapts), formed here rather than kept:
        # one product per FOLD samples against 0.2 KB a stream
        near = np.abs(x - self.scaler.mean) <= self.cfg.gate * self.learned.std   # NaN: False
        ok = np.zeros(x.shape, bool) if ok is None else near & ok
        if not math.isfinite(self.cfg.gate):
            ok &= np.isfinite(x)
        if self._err is not None:
            # rounded to float32 from a long piece too, as the buffer rounds them: the same
            # sums however the samples were chunked
            e = np.full(x.shape, np.nan, np.float32) if err is None else \
                np.asarray(err, np.float32)
            # errors beside the values (widened exactly, summed in float64): one set of sums
            # and one EWMA step an epoch for both, as a numpy call on a few dozen numbers
            # costs more than its arithmetic
            x = np.concatenate((x, e), axis=1)
            ok = np.concatenate((ok, ok & np.isfinite(e)), axis=1)
        self._add(np.where(ok, x, 0.0), ok)

    def _add(self, values: np.ndarray, counted: np.ndarray) -> None:
        """Continue the epoch's sums (values, their count) with these rows, FOLD at a time as
        the buffer adds them: a reduction along the rows adds them one after the other, so
        continuing it from the sums so far gives the bits that one reduction over the whole
        epoch gives (counts are whole numbers: exact in any order)."""
        n = np.add.reduce(counted, axis=0, dtype=np.float64)
        total, count = self._sums if self._sums is not None else (None, None)
        if len(self.scaler.mean) > 1:
            total = np.add.reduce(values, axis=0) if total is None else \
                np.add.reduce(np.concatenate((total[None], values)), axis=0)
        else:
            # one channel's column is summed pairwise, not row after row: then by the
            # buffer's blocks, and each column (value, error) alone
            total = np.array([_pairwise(values[:, j], None if total is None else total[j])
                              for j in range(values.shape[1])])
        self._sums = (total, n if count is None else count + n)

    def _end_epoch(self) -> None:
        (total, n), self._sums = self._sums, None
        c = len(self.scaler.mean)
        moves = np.logical_or.reduce(n[:c])
        adapts = self.level is not None and np.logical_or.reduce(n[c:])
        if moves or adapts:
            now = self.scaler.mean if self.level is None else \
                np.concatenate((self.scaler.mean, self.level))
            out = self._followed(now, total, n, self.pace.interval or 1.0)
            if moves:
                mean = out[:c]
                if self.cfg.max_shift is not None:
                    lim = self.cfg.max_shift * self.learned.std
                    mean = np.clip(mean, self.learned.mean - lim, self.learned.mean + lim)
                self.scaler = self.scaler.moved(mean)
            if adapts:
                self.level = out[c:]
        self.version += 1
        self._by_version[self.version] = (self.scaler, self.level)
        # every sample not concluded yet comes after this epoch, so its version is at
        # least this one - LAG: older ones are done with (0.6 KB a stream each)
        self._by_version.pop(self.version - LAG - 1, None)

    def _followed(self, now: np.ndarray, total: np.ndarray, n: np.ndarray,
                  dt: float) -> np.ndarray:
        """`now` (the means, then the error levels when kept) moved toward the epoch's means
        total / n by the EWMA weight of n samples, on the columns with n > 0 (all of them,
        usually: then without indexing); where an error level's mean is lower, `level_fall`
        times faster."""
        used = n > 0
        every = np.logical_and.reduce(used)
        c = len(self.scaler.mean)
        if not every:
            out = now.copy()
            c = np.count_nonzero(used[:c])         # the means' columns among those used
            now, total, n = now[used], total[used], n[used]
        mean = total / n
        rate = n * -dt / self.cfg.time_constant_s     # exactly -(n * dt / time constant)
        if self.level is not None and self.cfg.level_fall != 1.0:
            lower = mean < now
            lower[:c] = False
            rate = np.where(lower, rate * self.cfg.level_fall, rate)
        step = (1.0 - np.exp(rate)) * (mean - now)
        if every:
            return now + step
        out[used] = now + step
        return out

    # ------------------------------------------------------------ persistence
    def shift(self) -> np.ndarray:
        """How far the mean has moved from the learned one, in learned stds."""
        return (self.scaler.mean - self.learned.mean) / self.learned.std

    def to_record(self) -> dict:
        rec = {"adapted_mean": self.scaler.mean.tolist(), "adapted_epochs": self.version}
        if self.level is not None:
            rec["adapted_level"] = self.level.tolist()
        return rec

    def restore(self, record: dict) -> None:
        """Resume from a saved mean: the new run's epochs start from it."""
        # checked by state_store: one finite value a channel, levels > 0
        if record.get("adapted_mean") is not None:
            self.scaler = StreamScaler(np.asarray(record["adapted_mean"], np.float64),
                                       self.learned.std)
        if self.level is not None and record.get("adapted_level") is not None:
            self.level = np.asarray(record["adapted_level"], np.float64)
        self._by_version = {0: (self.scaler, self.level)}


def _pairwise(column: np.ndarray, total: float | None) -> float:
    """A column's sum continued FOLD rows at a time (numpy sums one column pairwise)."""
    for b in range(0, len(column), FOLD):
        v = column[b:b + FOLD]
        total = np.add.reduce(v) if total is None else np.add.reduce(np.concatenate(([total], v)))
    return total

"""Alert hysteresis and lifecycle for one stream.

Rules (windows are labelled anomalous when score >= threshold):
- open ("new"): at an anomalous window, when at least open_k of the last open_n
  windows (itself included) are anomalous, the stream is normal and the cooldown
  after the previous alert has passed.  `start` is the first anomalous window of
  those n; windows before the previous alert's end never count.
- "update": while open, at the first window at least update_interval_s (by sample
  timestamps) after the previous new/update event.
- close ("end"): at the close_m-th consecutive normal window; `end` is the time
  of the first window of that normal run (when the signal came back).  No new
  alert opens on the stream before end-event time + cooldown_s.
Every event carries the score of the window that produced it, the peak score so
far, and `top_channels` of the peak window (the channels behind the alert); an "end"
also carries its `reason` (END_REASONS).  `acknowledged` says an operator acked it;
`standing` that its score has settled into a steady level (the machine runs in a new
state, still abnormal against its baseline: see `_track_standing`), which an operator
answers by re-baselining the stream, or `alerts.rebaseline_after_s` does.

State changes are the events: "new" means normal -> anomaly, "end" means
anomaly -> normal; `state` is the state after the last window of the block.

The time gates (cooldown, shelve, update interval, the standing span) run on the
stream's elapsed time, each window's timestamp plus its clock offset (`update`'s `off`,
agent/sample_clock.py): when a device clock steps back, or a live stream's clock steps
forward, a gate keeps the time it had left, counted on the new clock, instead of waiting
for the new clock to catch up with the old one, or ending at once.  The times events
show (start, end, the alert id) are the device's own.

Each block is scanned with numpy from one event to the next, so a block without
events costs a handful of array operations regardless of its length, and the
events do not depend on how the scores were split into blocks.
"""
from __future__ import annotations

import math

import numpy as np

from .config import AlertConfig
from .contract import top_channels
from .standing import StandingCheck
from .timestamps import iso_utc

SCHEMA = 1
# Why an alert ended: the signal came back; the agent stopped cleanly; a reload changed
# the model or the stream; an operator re-baselined the stream; the agent found the
# alert still open at start after a crash (the outbox's record of open alerts).
END_REASONS = ("recovered", "stopped", "reload", "rebaseline", "restart", "idle")


def _num(v: float) -> float | None:
    # NaN/inf are not JSON; an event must always serialise.
    v = float(v)
    return v if np.isfinite(v) else None


class AlertTracker:
    __slots__ = ("channels", "model_info", "state", "labels", "open_mask", "alert_id", "_hist",
                 "_cooldown_until", "shelved_until", "acknowledged", "_last_score", "_standing",
                 "standing_since", "_start", "_start_el", "_peak", "_peak_err", "_last_update",
                 "_normal_run", "_normal_since", "node", "stream", "cfg", "_last_ms", "rtn")

    def __init__(self, node: str, stream: str, cfg: AlertConfig, channels: list[str],
                 model_info: dict) -> None:
        self.node, self.stream, self.cfg = node, stream, cfg
        # not copied: the engine's, shared by all its streams (a copy each is 1 KB a
        # stream); read only here, and a swapped provider updates every stream's "ep" at once
        self.channels = channels
        self.model_info = model_info
        self.state = "normal"
        self.labels = np.empty(0, np.int8)
        self.open_mask = np.empty(0, np.int8)
        self.alert_id: str | None = None
        self._last_ms = -math.inf           # the start ms of the stream's latest alert id
        c = len(self.channels)
        # The last open_n - 1 windows, needed by the k-of-n rule across blocks.
        self._hist = _History(cfg.open_n - 1, c)
        # the gates, in elapsed time (see the module docstring)
        self._cooldown_until = -np.inf
        # operator shelving (ISA-18.2): no alert opens on windows before this time
        self.shelved_until = -np.inf
        # open-alert state
        self.acknowledged = False
        # the end event of the latest alert, while it ended unacknowledged (ISA-18.2's
        # "returned to normal, unacknowledged": still the operator's to ack); the next
        # alert takes its place
        self.rtn: dict | None = None
        self._last_score = float("nan")
        # the open alert's recent scores (standing_after_s of them; only while one is open:
        # a span at 100 Hz is a megabyte) and since when it stands
        self._standing: StandingCheck | None = None
        self.standing_since: float | None = None     # elapsed time
        self._start = 0.0
        self._start_el = 0.0           # _start in elapsed time
        self._peak = -np.inf
        self._peak_err = np.zeros(c)
        self._last_update = 0.0        # elapsed time
        self._normal_run = 0           # consecutive normal windows so far
        self._normal_since = 0.0       # timestamp of the first of them

    # ------------------------------------------------------------ events
    def _event(self, typ: str, score: float, threshold: float, end: float | None,
               reason: str | None = None) -> dict:
        ev = {
            "schema": SCHEMA, "type": typ, "id": self.alert_id,
            "node": self.node, "stream": self.stream,
            "start": iso_utc(self._start), "end": None if end is None else iso_utc(end),
            "score": _num(score), "peak_score": _num(self._peak), "threshold": _num(threshold),
            "top_channels": top_channels(self._peak_err, self.channels, self.cfg.top_channels),
            "model": dict(self.model_info), "acknowledged": self.acknowledged,
            "standing": self.standing_since is not None,
        }
        if typ != "update":
            self.rtn = ev if typ == "end" and not self.acknowledged else None
        if typ == "end":
            ev["reason"] = reason
        return ev

    @property
    def alarm(self) -> str:
        """The stream's alarm state for operators: normal, unacknowledged, acknowledged or
        rtn_unacknowledged (its latest alert ended before anyone acked it)."""
        if self.state != "anomaly":
            return "normal" if self.rtn is None else "rtn_unacknowledged"
        return "acknowledged" if self.acknowledged else "unacknowledged"

    def ack(self, alert_id: str | None, threshold: float) -> dict | None:
        """Acknowledge alert `alert_id` (None: the stream's own): the open one, shown by an
        "update", or one that ended unacknowledged, shown by its "end" again, acknowledged;
        None when neither is that alert (acked, superseded, or another stream's)."""
        if self.state == "anomaly" and alert_id in (None, self.alert_id):
            self.acknowledged = True
            return self._event("update", self._last_score, threshold, None)
        if self.rtn is not None and alert_id in (None, self.rtn["id"]):
            ev, self.rtn = {**self.rtn, "acknowledged": True}, None
            return ev
        return None

    def _track_standing(self, el: np.ndarray, scores: np.ndarray, threshold: float) -> None:
        """Feed the open alert's windows of this block (elapsed times `el`) to its standing
        check (agent/standing.py)."""
        if self.state != "anomaly":
            self.standing_since = self._standing = None
            return
        mine = (el >= self._start_el) & (self.open_mask == 1)
        self._standing.add(el[mine], scores[mine])
        if not self._standing.settled(self._start_el, threshold):
            self.standing_since = None
        elif self.standing_since is None:
            self.standing_since = self._standing.last_ts

    def rebaseline_due(self) -> bool:
        """Standing for alerts.rebaseline_after_s: the stream should learn its new normal."""
        after = self.cfg.rebaseline_after_s
        return (after is not None and self.state == "anomaly" and self.standing_since is not None
                and self._standing.last_ts - self.standing_since >= after)

    def shelve(self, until: float) -> None:
        """No new alert opens on windows before elapsed time `until`; an open one runs on."""
        self.shelved_until = until

    def close(self, ts: float, threshold: float, reason: str) -> dict | None:
        """End the open alert now, stamped `ts`, for `reason` (END_REASONS); None if none
        is open.  A stop, reload or re-baseline would otherwise leave it open forever."""
        if self.state != "anomaly":
            return None
        self.state = "normal"
        ev = self._event("end", float("nan"), threshold, ts, reason)
        self.standing_since = self._standing = None
        return ev

    def restart(self) -> None:
        """A new run of windows (a machine started again: agent/running.py): no window
        before it counts toward the k-of-n rule."""
        self._hist.n, self._hist._quiet = 0, True

    # ------------------------------------------------------------ update
    def update(self, ts: np.ndarray, scores: np.ndarray, threshold: float,
               err: np.ndarray, off: float | np.ndarray = 0.0) -> list[dict]:
        """Feed a block of windows (timestamps, scores, err [n, C], clock offsets: one
        for all or one each); returns its events in order."""
        ts = np.asarray(ts, np.float64)
        # elapsed time; a stream whose clock never stepped back pays nothing for it
        el = ts if type(off) is float and off == 0.0 else ts + off
        scores = np.asarray(scores, np.float64)
        err = np.asarray(err, np.float64)
        n = len(ts)
        if scores.shape != (n,) or err.shape != (n, len(self.channels)):
            raise ValueError(f"block shapes disagree: ts {ts.shape}, scores {scores.shape}, "
                             f"err {err.shape} (expected [n] and [n, {len(self.channels)}])")
        # NaN compares False: never anomalous.  A bool array seen as 0/1 bytes: no copy.
        above = scores >= threshold
        lab = above.view(np.int8)
        self.labels = lab
        # per-window "alert open as known at that window": from the window that opened
        # it up to (not including) the window that closed it
        self.open_mask = np.ones(n, np.int8) if self.state == "anomaly" else np.zeros(n, np.int8)
        if n == 0:
            return []
        if self.state == "normal" and not (above[0] if n == 1 else np.logical_or.reduce(above)):
            # The common case: nothing can open.  Only the k-of-n history moves on.
            self._hist.push(ts, el, scores, lab, err, quiet=True)
            return []
        self._last_score = float(scores[-1])
        if n == 1 and self.state == "anomaly":
            return self._open_one(ts, el, scores, lab, err, threshold)
        b = _Block(self, ts, el, scores, err, lab, threshold)
        events: list[dict] = []
        pos = b.h
        while pos is not None and pos < b.N:
            pos = (self._scan_normal if self.state == "normal" else self._scan_open)(b, pos, events)
        # the scan may have cleared labels that belong to a closed alert, held ones included
        self._hist.relabel(b.L[:b.h])
        self._hist.push(ts, el, scores, b.L[b.h:], err)
        self._track_standing(el, scores, threshold)
        return events

    def _scan_normal(self, b: "_Block", pos: int, events: list) -> int | None:
        """Open an alert at the first window from `pos` where the k-of-n rule holds;
        the position after it, or None when none does."""
        E, L, Sp, N = b.E, b.L, b.Sp, b.N
        k, wn = self.cfg.open_k, self.cfg.open_n
        lo = max(pos - wn + 1, 0)
        c = np.concatenate([[0], np.cumsum(L[lo:N], dtype=np.int64)])
        j_idx = np.arange(pos, N)
        cnt = c[j_idx - lo + 1] - c[np.maximum(j_idx - wn + 1, lo) - lo]
        ok = (L[pos:N] == 1) & (cnt >= k) & (E[pos:N] >= self._cooldown_until) \
            & (E[pos:N] >= self.shelved_until)
        if not ok.any():
            return None
        j = pos + int(np.argmax(ok))
        w0 = max(j - wn + 1, 0)
        onset = w0 + int(np.argmax(L[w0:j + 1]))
        p = onset + int(np.argmax(Sp[onset:j + 1]))
        self.state = "anomaly"
        self.acknowledged = False
        self._standing = StandingCheck(self.cfg.standing_after_s)
        self._start, self._start_el = float(b.T[onset]), float(E[onset])
        # a device clock that restarts at the same time at each power-up (no RTC battery)
        # repeats start times: ids must not, consumers key their upserts and acks on them
        self._last_ms = ms = max(int(round(self._start * 1000)), self._last_ms + 1)
        self.alert_id = f"{self.node}:{self.stream}:{ms}"
        self._peak = float(Sp[p])
        self._peak_err = np.array(b.err_row(p))
        self._last_update = float(E[j])
        self._normal_run = 0
        events.append(self._event("new", b.S[j], b.threshold, None))
        self.open_mask[j - b.h:] = 1
        return j + 1

    def _scan_open(self, b: "_Block", pos: int, events: list) -> int | None:
        """While open: updates, the peak, and the close at the close_m-th normal window;
        the position after the close, or None when the alert stays open."""
        T, E, S, L, Sp, N = b.T, b.E, b.S, b.L, b.Sp, b.N
        seg = L[pos:N]
        idx = np.arange(N - pos)
        last = np.maximum.accumulate(np.where(seg == 1, idx, -1 - self._normal_run))
        run = idx - last
        closing = run >= self.cfg.close_m
        close = pos + int(np.argmax(closing)) if closing.any() else None
        upper = close if close is not None else N
        # Updates: each at the first window >= interval after the previous one.
        p0 = pos
        while p0 < upper:
            due = E[p0:upper] >= self._last_update + self.cfg.update_interval_s
            if not due.any():
                break
            u = p0 + int(np.argmax(due))
            self._take_peak(Sp, p0, u + 1, b.err_row)
            self._last_update = float(E[u])
            events.append(self._event("update", S[u], b.threshold, None))
            p0 = u + 1
        stop = close + 1 if close is not None else N
        self._take_peak(Sp, p0, stop, b.err_row)
        end_at = stop - 1
        rl = int(last[end_at - pos])
        if rl >= 0 or self._normal_run == 0:
            # the normal run (if any) began inside this block
            if run[end_at - pos] > 0:
                self._normal_since = float(T[pos + rl + 1])
        self._normal_run = int(run[end_at - pos])
        if close is None:
            return None
        events.append(self._event("end", S[close], b.threshold, self._normal_since,
                                  "recovered"))
        self.open_mask[close - b.h:] = 0
        self.state = "normal"
        self._cooldown_until = float(E[close]) + self.cfg.cooldown_s
        # Windows up to the end belong to the closed alert, not to the next one.
        L[max(close - self.cfg.open_n + 1, 0):close + 1] = 0
        return close + 1

    def _open_one(self, ts, el, scores, lab, err, threshold: float) -> list[dict]:
        """The rest of `update` for one window while an alert is open: `_scan_open`'s rules
        and arithmetic on Python floats instead of block arrays (a stream stepped a sample
        at a time pays some twenty numpy calls per window there)."""
        t, e, s, events = float(ts[0]), float(el[0]), float(scores[0]), []
        if s > self._peak:      # NaN never is: _take_peak skips NaN scores
            self._peak, self._peak_err = s, np.array(err[0])
        run = 0 if lab[0] else self._normal_run + 1
        if run == 1 and self._normal_run == 0:
            self._normal_since = t
        self._normal_run = run
        closing = run >= self.cfg.close_m
        if not closing and e >= self._last_update + self.cfg.update_interval_s:
            self._last_update = e
            events.append(self._event("update", s, threshold, None))
        if closing:
            events.append(self._event("end", s, threshold, self._normal_since, "recovered"))
            self.open_mask[0] = 0
            self.state = "normal"
            self._cooldown_until = e + self.cfg.cooldown_s
            # the history holds at most open_n - 1 windows: all of them belong to this alert
            self._hist.relabel(0)
            lab = np.zeros(1, np.int8)
        self._hist.push(ts, el, scores, lab, err)
        self._track_standing(el, scores, threshold)
        return events

    def _take_peak(self, Sp: np.ndarray, a: int, b: int, err_row) -> None:
        if b <= a:
            return
        p = a + int(np.argmax(Sp[a:b]))
        if Sp[p] > self._peak:
            self._peak = float(Sp[p])
            self._peak_err = np.array(err_row(p))


class _Block:
    """One update's windows joined to the k-of-n history carried from the last block."""

    def __init__(self, t: AlertTracker, ts, el, scores, err, lab, threshold: float):
        h_ts, h_el, h_sc, h_lab, self._h_err = t._hist.held()
        self.h = len(h_ts)
        self.T = np.concatenate([h_ts, ts])     # timestamps, shown in events
        self.E = np.concatenate([h_el, el])     # elapsed times: the gates
        self.S = np.concatenate([h_sc, scores])
        self.L = np.concatenate([h_lab, lab])
        # Peak search must skip NaN scores.
        self.Sp = np.where(np.isnan(self.S), -np.inf, self.S)
        self.N = self.h + len(ts)
        self.threshold = threshold
        self._err = err

    def err_row(self, i: int) -> np.ndarray:
        return self._h_err[i] if i < self.h else self._err[i - self.h]


class _History:
    """The last `keep` windows of a stream (timestamps, elapsed times, scores, labels,
    per-channel errors)
    in arrays allocated once, newest last, shifted in place as blocks arrive: a stream
    stepped a sample at a time allocates nothing here and holds no block's arrays.

    Only anomalous windows and those newer than them are ever read: an alert's start is
    an anomalous window and its peak one at or after it.  So while every window held is
    normal, a block of normal windows only moves the count (`quiet`): the values held
    then go stale, and each is older than any window written after it."""

    __slots__ = ("ts", "el", "sc", "lab", "err", "n", "_quiet")

    def __init__(self, keep: int, channels: int) -> None:
        self.ts = np.zeros(keep, np.float64)
        self.el = np.zeros(keep, np.float64)
        self.sc = np.zeros(keep, np.float64)
        self.lab = np.zeros(keep, np.int8)
        self.err = np.zeros((keep, channels), np.float64)
        self.n = 0              # windows held: the last n rows
        self._quiet = True      # no window held is anomalous

    def push(self, ts: np.ndarray, el: np.ndarray, scores: np.ndarray, lab: np.ndarray,
             err: np.ndarray, quiet: bool = False) -> None:
        """Hold a block's windows; `quiet`: none of them is anomalous."""
        k, m = len(self.ts), len(ts)
        if not (quiet and self._quiet):
            for held, new in ((self.ts, ts), (self.el, el), (self.sc, scores), (self.lab, lab),
                              (self.err, err)):
                if m >= k:
                    held[:] = new[m - k:]
                else:
                    held[:k - m] = held[m:]
                    held[k - m:] = new
            self._quiet = not np.logical_or.reduce(self.lab)
        self.n = min(self.n + m, k)

    def relabel(self, lab) -> None:
        """New labels for the windows held (a scan clears those of an alert it closed)."""
        self.lab[len(self.lab) - self.n:] = lab

    def held(self) -> tuple[np.ndarray, ...]:
        """Views of the windows held, oldest first (valid until the next push)."""
        a = len(self.ts) - self.n
        return self.ts[a:], self.el[a:], self.sc[a:], self.lab[a:], self.err[a:]

"""The engine: every stream's detection, synchronous, no threads.

    results = engine.step(batches)

Batches of raw samples in (any streams, any sizes), per-window results and alert
events out.  The daemon, replay, evaluate, predict, the HTTP API and the benchmarks
all call `step`, so what is measured is what is deployed.

Rules of a step:
- Batches of one stream are joined first (a stream's samples stay in order), so a
  tick of many one-sample messages costs one ring push per stream, not per message.
- The windows that fall due, whatever their stream, are served by one batched ONNX
  Runtime call per `max_batch` windows: memory stays bounded however large a batch
  is (a 4 MB payload of 140k samples is inferred chunk by chunk).
- A step fits learning periods while its fits have taken under a budget of time (the
  first one whatever it takes: agent/fit_budget.py); a stream whose period ends after
  that waits, with its later samples, for the next step, which the daemon runs at once.
  Results do not change, only their step.
- A stream's clock takes its steps forward out by the real time its batches carry (their
  latest `arrived`: agent/sample_clock.py); batches from a file carry none.
- A stream that fails (a bug, a value no sink can format) is logged and counted in
  `metrics.errors`; the other streams of the step go on.
- Streams are created on their first sample, as agent/admission.py allows (at most
  `max_streams` per source, one source per stream id), and evicted after `idle_evict_s`
  without samples (a learning one after as long as it has learned, if longer) unless an
  alert is open; a learned baseline comes back from the state store with its next sample.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable

import numpy as np

from .adaptation import SPAN
from .admission import Admission
from .alerts import AlertTracker
from .bad_input import named
from .baseline import Baseline
from .config import DetectionConfig
from .detector import Detector, DetectorError
from .fit_budget import FitBudget
from .metrics import Metrics
from .model_call import scored
from .operator_commands import OperatorCommands
from .pace import Pace
from .policy import baseline_basis, effective
from .ring import RingBuffer, Windows
from .running import RunGate, channel_of
from .saving import SaveQueue
from .scoring import Smoother, add_levels, normalized
from .sources.base import Batch, join
from .state_store import StateStore
from .stream import Stream, StreamResult

log = logging.getLogger("tsad.engine")


class Engine(OperatorCommands):
    def __init__(self, cfg: DetectionConfig, detector: Detector, store: StateStore | None = None,
                 metrics: Metrics | None = None, max_streams: dict[str, int] | None = None,
                 default_max_streams: int = 1, intervals: dict[str, float] | None = None,
                 named: Iterable[str] = ()):
        self.cfg = effective(cfg, detector.meta)
        self.detector, self.store, self.meta = detector, store, detector.meta
        self.metrics = metrics or detector.metrics or Metrics()
        self.model_info = {"name": self.meta.name, "sha256": self.meta.onnx_sha256,
                           "ep": detector.ep}
        self.streams: dict[str, Stream] = {}
        # per source id: how many streams it may create (1 unless it names them by topic)
        self.admission = Admission(self.metrics, max_streams, default_max_streams, named)
        # per source id: the sampling interval its config gives (else streams learn theirs)
        self.intervals = dict(intervals or {})
        self.saves = SaveQueue()        # streams whose baselines are due on disk
        self.fits = FitBudget()
        # streams whose fit waits for a step with room (self.fits): their samples since
        self.held_back: dict[str, list[Batch]] = {}
        # alerts that ended unacknowledged on streams since dropped (OperatorCommands)
        self.held_rtn: dict[str, dict] = {}
        if self.cfg.running is not None:      # a wrong name fails here, not at a sample
            channel_of(self.cfg.running, self.meta.channels)

    # ------------------------------------------------------------ streams
    def stream(self, sid: str, source: str | None = None) -> Stream | None:
        """The stream `sid`, created on first use; None when agent/admission.py refuses
        it (`source` at its cap, or, when given, not the source that owns `sid`)."""
        st = self.streams.get(sid)
        if st is not None:
            if source is None or source == st.source:
                return st
            self.admission.collision(sid, source, st.source)
            return None
        src = sid if source is None else source
        if not self.admission.may_create(sid, src):
            return None
        st = self._new_stream(sid, src)
        self.streams[sid] = st
        self.admission.created(src)
        return st

    def _new_stream(self, sid: str, source: str) -> Stream:
        c, m = self.cfg, self.meta
        fixed = None if c.scoring.threshold == "model" else float(c.scoring.threshold)
        baseline = Baseline(m, c.calibration, fixed)
        saved = None
        if c.calibration.enabled:
            saved = self.store and self.store.load(sid, m.onnx_sha256, m.n_channels,
                                                   baseline_basis(c, m))
            if saved:
                baseline.restore(saved)
                log.info("stream %s: baseline restored (threshold %.4g)", sid, baseline.threshold)
            else:
                log.info("stream %s: learning its baseline on its first %s", sid,
                         f"{c.calibration.duration_s:g} s" if c.calibration.duration_s
                         else f"{c.calibration.samples} samples")
        gap = c.buffer.gap_reset_s
        ring = RingBuffer(m.window, m.n_channels, stride=c.buffer.stride, metrics=self.metrics,
                          ffill_max=c.buffer.ffill_max, gap_reset_s=None if gap == "auto" else gap,
                          max_block=max(m.window, SPAN if c.adaptation.enabled else 64))
        pace = Pace(ring, c.buffer.gap_factor if gap == "auto" else None, self.intervals.get(source),
                    m.interval_s)
        tracker = AlertTracker(c.node, sid, c.alerts, m.channels, self.model_info)
        st = Stream(sid, source, ring, Smoother(c.scoring.smoothing), baseline, tracker,
                    self.detector.max_batch, pace, c.adaptation,
                    c.scoring.normalize == "channel", c.scoring.level_band)
        if saved and st.adapter is not None:
            st.adapter.restore(saved)
        if c.running is not None:
            st.gate = RunGate(c.running, channel_of(c.running, m.channels))
        st.tracker.rtn = self.held_rtn.pop(sid, None)
        return st

    def pending(self, sid: str) -> dict:      # why a stream gave no score yet
        return self.streams[sid].pending()

    def drop(self, sid: str) -> None:
        self.held_back.pop(sid, None)
        if (st := self.streams.pop(sid, None)) is not None:
            self.admission.removed(st.source)
            if st.tracker.rtn is not None:      # still the operator's to ack
                self.held_rtn[sid] = st.tracker.rtn

    def retain(self, new_sources: dict, old_sources: dict, reason: str) -> list[dict]:
        """Keep the streams whose source is configured unchanged (source id -> settings,
        new and old); drop the others, ending their open alerts for `reason`."""
        events = []
        for sid, st in list(self.streams.items()):
            if st.source in new_sources and new_sources[st.source] == old_sources.get(st.source):
                continue
            ev = st.tracker.close(st.last_ts, st.threshold, reason)
            if ev is not None:
                self.metrics.alerts["end"] += 1
                events.append(ev)
            self.drop(sid)
        return events

    def swap_detector(self, detector: Detector) -> None:
        """The same model loaded anew (other providers or threads): streams carry on."""
        if detector.meta.onnx_sha256 != self.meta.onnx_sha256:
            raise ValueError("swap_detector needs the same model; build a new engine instead")
        self.detector = detector
        self.model_info["ep"] = detector.ep       # the dict every stream's tracker shares

    # ------------------------------------------------------------ the step
    def step(self, batches: Iterable[Batch]) -> list[StreamResult]:
        """Process a tick's batches; the results in stream order of first appearance."""
        joined: dict[str, list[Batch]] = {}
        for b in batches:
            joined.setdefault(b.stream, []).append(b)
        results: list[StreamResult] = []
        self._due: list[tuple[Stream, Windows]] = []
        self._pending, now = 0, time.monotonic()
        self.fits.new_step()
        self.metrics.steps += 1
        for sid in (touched := list(self.held_back)):
            st = self.streams[sid]
            if not st.fit_due or self.fits.room():
                results += self._feed(st, *join(self.held_back.pop(sid)))
        for sid, parts in joined.items():
            if len(parts) > 1 and any(p.source != parts[0].source for p in parts):
                st = self.streams.get(sid)
                parts = self.admission.owned(sid, parts, st and st.source)
            st = self.stream(sid, parts[0].source or sid) if parts else None
            if st is None:
                continue
            st.last_seen = now
            ts, values, arrived = join(parts)
            self.metrics.samples_in += len(ts)
            self.metrics.stream_steps += 1
            if sid in self.held_back:
                self.held_back[sid].append(Batch(sid, ts, values, arrived=arrived))
            else:
                results += self._feed(st, ts, values, arrived)
        results += self._flush()
        touched += joined
        for sid in joined:
            st = self.streams.get(sid)
            if st is not None and st.rebaseline_due:
                results += self._rebaseline_standing(st)
        self.saves.run(self.save)
        return self._with_states(dict.fromkeys(touched), results)

    def _feed(self, st: Stream, ts: np.ndarray, values: np.ndarray,
              arrived: float | None) -> list[StreamResult]:
        """One stream's samples (handed over at `arrived`: Batch), piece by piece as it takes
        them; inference runs whenever max_batch windows wait, or the stream waits for its
        earlier windows' scores."""
        st.clock.arrive(arrived, st.pace.interval)
        out: list[StreamResult] = []
        a, stalled = 0, False
        while True:
            if st.fit_due:
                if not self.fits.room():
                    self.held_back[st.id] = [Batch(st.id, ts[a:], values[a:], arrived=arrived)]
                    return out
                self._fit(st)
            if a >= len(ts):
                return out
            if st.rebaseline_due:
                out += self._flush()
                out += self._rebaseline_standing(st)
            end = len(ts)
            if st.gate is not None:     # `running:`, on the stream's elapsed time
                el = ts[a:] + st.clock.peek(ts[a:])
                n, judged = st.gate.split(el, values[a:])
                if not judged:
                    out += self._idle(st, ts[a:a + n], el[:n])
                    a += n
                    continue
                if st.gate.idle:
                    st.resume(float(el[0]))
                end = a + n
            try:
                k, w = st.ingest(ts[a:end], values[a:end])
                if st.gate is not None and k:
                    st.gate.take(el[:k])
            except Exception:
                self._failed(st, "ingest")
                return out
            if k == 0:
                if stalled:    # nothing left to conclude and still no room: a bug, not a wait
                    self._failed(st, "ingest")
                    return out
                out += self._flush()
                stalled = True
                continue
            stalled = False
            a += k
            if w is not None:
                self._due.append((st, w))
                self._pending += len(w)
                if self._pending >= self.detector.max_batch:
                    out += self._flush()

    def _idle(self, st: Stream, ts: np.ndarray, el: np.ndarray) -> list[StreamResult]:
        """Samples taken while the machine is stopped (agent/running.py).  At the stop, the
        windows before it are concluded first, then an open alert ends."""
        out = []
        if not st.gate.idle:
            out = self._flush()
            if (ev := st.go_idle(float(el[0]))) is not None:
                self.metrics.alerts["end"] += 1
                out.append(StreamResult.of_events(st.id, st.threshold, [ev]))
        st.gate.take(el)
        st.took_idle(ts)
        self.metrics.samples_idle += len(ts)
        return out

    def _fit(self, st: Stream) -> None:
        """End a stream's learning period, in the step's budget.  A fit that fails (the
        model's call, or no finite output to fit on) starts a new period: a stream half
        fitted had a threshold of 0, an alert on normal data that never closed (ORT audit,
        twenty-second session)."""
        held = st.baseline.held
        try:
            self.fits.spent(st.end_learning(self.fits.infer(self.detector.infer)))
        except Exception as e:
            if (n := self.metrics.error("learning")) is not None:
                log.error("stream %s: its learning period could not be fitted (%s; %d so far): "
                          "its %d samples are dropped and it learns again from its next one",
                          st.id, e, n, held, exc_info=not isinstance(e, (DetectorError, ValueError)))
            st.relearn()
        else:
            self.saves.due(st.id, first=True)

    def _flush(self) -> list[StreamResult]:
        due, self._due, self._pending = self._due, [], 0
        return self._infer(due) if due else []

    def _with_states(self, touched, results: list[StreamResult]) -> list[StreamResult]:
        """Hand each stream's entered states to its last result (an empty one if none)."""
        last = {r.stream: r for r in results}
        for sid in touched:
            st = self.streams.get(sid)
            if st is None or not st.entered:
                continue
            r = last.get(sid)
            if r is None:
                r = StreamResult.of_events(sid, st.threshold, [])
                results.append(r)
            r.entered, st.entered = st.entered, []
        return results

    def _infer(self, due: list[tuple[Stream, Windows]]) -> list[StreamResult]:
        try:
            due, scores, err = scored(self.detector, due, self.metrics)
            add_levels(due, scores, err)
            scores, shown = normalized(due, scores, err)
        except Exception:       # a bug in what every due stream shares: not the daemon's end
            for st, w in due:
                st.abandon(len(w))
            if (n := self.metrics.error("stream_inference")) is not None:
                log.exception("the model call shared by %s failed (%d so far): their windows of "
                              "this step are dropped", named(list(dict.fromkeys(
                                  st.id for st, _ in due)), 5), n)
            return []
        out, off = [], 0
        for st, w in due:
            k = len(w)
            try:
                r = st.conclude(w, scores[off:off + k], err[off:off + k], shown[off:off + k])
            except Exception:
                st.abandon(k)
                self._failed(st, "conclude")
            else:
                self.metrics.alerts.update(ev["type"] for ev in r.events)
                out.append(r)
                if st.baseline.unsaved:
                    st.baseline.unsaved = False
                    self.saves.due(st.id, first=True)
            off += k
        return out

    def _failed(self, st: Stream, where: str) -> None:
        if (n := self.metrics.error(f"stream_{where}")) is not None:
            log.exception("stream %s: %s failed (%d so far); its other samples go on", st.id,
                          where, n)

    # ------------------------------------------------------------ lifecycle
    def close_alerts(self, reason: str) -> list[dict]:
        """End every open alert (a stop, a reload that changes the model); the end events."""
        out = []
        for st in self.streams.values():
            ev = st.tracker.close(st.last_ts, st.threshold, reason)
            if ev is not None:
                log.info("stream %s: alert %s ended (%s)", st.id, ev["id"], reason)
                self.metrics.alerts["end"] += 1
                out.append(ev)
        return out

    def save(self, sid: str) -> None:
        """Write a learned stream's baseline to the store (saving.py says when)."""
        st = self.streams.get(sid)
        if st and self.store and self.cfg.calibration.enabled and not st.baseline.learning:
            record = {**st.baseline.to_record(), "basis": baseline_basis(self.cfg, self.meta)}
            if st.adapter is not None:
                record.update(st.adapter.to_record())
            self.store.save(sid, self.meta.onnx_sha256, record)

    def save_baselines(self) -> None:
        """Persist every learned baseline now (a clean stop, a reload)."""
        self.saves.clear()
        for sid in list(self.streams):
            self.save(sid)

    def evict_idle(self, now: float | None = None) -> list[str]:
        """Drop streams without samples for idle_evict_s (none with an open alert)."""
        limit = self.cfg.buffer.idle_evict_s
        if limit is None:
            return []
        now = time.monotonic() if now is None else now
        gone = [sid for sid, st in self.streams.items() if st.tracker.state != "anomaly"
                and now - st.last_seen > max(limit, st.baseline.learning_for(st.last_seen))]
        for sid in gone:
            if held := self.streams[sid].baseline.held:
                log.warning("stream %s: dropped while learning, silent for longer than it had "
                            "learned and than buffer.idle_evict_s: %d held samples lost", sid, held)
            self.save(sid)
            self.drop(sid)
        if gone:
            self.metrics.dropped["stream_evicted"] += len(gone)
            log.info("evicted %d idle stream(s) (no sample for %g s): %s", len(gone), limit,
                     named(gone, 5))
        return gone

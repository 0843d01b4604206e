"""The one code path: source -> ring buffer -> detector -> scorer -> alerts -> sinks.

Live serial/MQTT streams, file replay, `evaluate`, the demo and the benchmarks
all run through `Pipeline`, so what is measured is what is deployed.

Threading: every source runs in its own thread and hands `Batch`es to a bounded
queue (a full queue blocks the source: back-pressure, not data loss).  One
pipeline thread drains the queue; all windows that fall due in one drain are
scaled, stacked and served by ONE batched ONNX Runtime call.

A reload hands the sources of unchanged streams, still reading, and the queue to
the next pipeline (`stop(keep=...)` -> `Handover`): closing and reopening a serial
port would lose what the device sent in between and any half-received line.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .alerts import AlertTracker
from .calibration import CalibrationStore
from .config import AgentConfig, StreamConfig
from .contract import StreamScaler, fit_scaler, fit_threshold, score_windows
from .detector import Detector
from .metrics import Metrics
from .ring import RingBuffer
from .scoring import Smoother
from .sinks.base import Sink
from .sources import build_source
from .sources.base import Batch, Source

log = logging.getLogger("tsad.pipeline")


class SourceRunner:
    """One source in its own thread, with its own stop, feeding a queue.

    It holds no reference to a pipeline, so it can outlive one: when its source has
    finished it puts itself on the queue as the end marker."""

    def __init__(self, stream: StreamConfig, source: Source, out: queue.Queue,
                 metrics: Metrics) -> None:
        self.stream, self.source, self.out, self.metrics = stream, source, out, metrics
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"source-{self.stream.id}")
            self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _put(self, item) -> None:
        # blocks when the pipeline is behind: back-pressure instead of dropping data
        while True:
            try:
                self.out.put(item, timeout=0.5)
                return
            except queue.Full:
                if self.stop_event.is_set():
                    self.metrics.dropped["queue_full_at_stop"] += 1
                    return

    def _run(self) -> None:
        try:
            self.source.run(self._put, self.stop_event)
        except Exception:
            log.exception("source %s crashed", type(self.source).__name__)
            self.metrics.bad("source_crash")
        finally:
            try:
                self.source.close()
            finally:
                self._put(self)


@dataclass
class Handover:
    """What a stopping pipeline passes to the next one: the shared queue and the
    runners that keep reading; `ended` are those whose end marker it already took."""
    queue: queue.Queue
    runners: dict[str, SourceRunner]
    ended: set[str]


@dataclass
class StreamState:
    id: str
    ring: RingBuffer
    smoother: Smoother
    tracker: AlertTracker
    scaler: StreamScaler | None = None
    threshold: float = 0.0
    samples: int = 0
    last_ts: float = float("nan")     # newest sample seen (ends alerts closed at a stop)
    # raw samples held back until calibration has enough of them
    calib_ts: list = field(default_factory=list)
    calib_values: list = field(default_factory=list)
    calib_n: int = 0

    @property
    def ready(self) -> bool:
        return self.scaler is not None


class Pipeline:
    def __init__(self, cfg: AgentConfig, sinks: list[Sink], metrics: Metrics | None = None,
                 detector: Detector | None = None, sources: list[Source] | None = None,
                 handover: Handover | None = None):
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.sinks = sinks
        self.detector = detector or Detector(
            cfg.model.path, providers=list(cfg.model.providers), threads=cfg.model.threads,
            verify_checksum=cfg.model.verify_checksum, max_batch=cfg.model.max_batch,
            metrics=self.metrics)
        self.meta = self.detector.meta
        self.model_info = {"name": self.meta.name, "sha256": self.meta.onnx_sha256,
                           "ep": self.detector.ep}
        self.store = (CalibrationStore(cfg.state_dir)
                      if cfg.calibration.enabled and cfg.state_dir else None)
        self.streams: dict[str, StreamState] = {}
        self.queue: queue.Queue = handover.queue if handover else queue.Queue(maxsize=1024)
        if sources is not None:
            self.runners = [SourceRunner(s, src, self.queue, self.metrics)
                            for s, src in zip(cfg.streams, sources)]
        else:
            kept = handover.runners if handover else {}
            self.runners = [kept.get(s.id) or SourceRunner(
                s, build_source(s, self.meta.channels, self.metrics, cfg.mqtt, cfg.node),
                self.queue, self.metrics) for s in cfg.streams]
        self._ended = set(handover.ended) if handover else set()
        self.stop_event = threading.Event()
        self._last_health = 0.0
        self._sink_errors = 0
        #: called once per main-loop iteration (the systemd watchdog hooks in here)
        self.on_tick = None

    # ------------------------------------------------------------ streams
    def _stream(self, sid: str) -> StreamState:
        st = self.streams.get(sid)
        if st is not None:
            return st
        m, c = self.meta, self.cfg
        st = StreamState(
            id=sid,
            ring=RingBuffer(m.window, m.n_channels, stride=c.buffer.stride,
                            ffill_max=c.buffer.ffill_max, gap_reset_s=c.buffer.gap_reset_s),
            smoother=Smoother(c.scoring.smoothing),
            tracker=AlertTracker(c.node, sid, c.alerts, m.channels, self.model_info))
        if c.calibration.enabled:
            saved = self.store.load(sid, m.onnx_sha256) if self.store else None
            if saved:
                st.scaler = StreamScaler(np.asarray(saved["mean"]), np.asarray(saved["std"]))
                st.threshold = float(saved["threshold"])
                log.info("stream %s: calibration restored (threshold %.4g)", sid, st.threshold)
            else:
                log.info("stream %s: calibrating on the first %d samples", sid,
                         c.calibration.samples)
        else:
            st.scaler = StreamScaler(np.asarray(m.scaler.mean), np.asarray(m.scaler.std))
            st.threshold = self._configured_threshold()
        self.streams[sid] = st
        return st

    def _configured_threshold(self) -> float:
        t = self.cfg.scoring.threshold
        return float(self.meta.threshold.value if t == "model" else t)

    def _calibrate(self, st: StreamState) -> None:
        """Fit the stream's scaler and threshold on its first N samples (SKAB protocol)."""
        c = self.cfg.calibration
        ts = np.concatenate(st.calib_ts)
        raw = np.concatenate(st.calib_values)
        st.calib_ts, st.calib_values, st.calib_n = [], [], 0
        try:
            st.scaler = fit_scaler(raw, np.asarray(self.meta.scaler.std), c.std_floor,
                                   self.meta.calibration_std_scale)
        except ValueError as e:
            st.scaler = StreamScaler(np.asarray(self.meta.scaler.mean),
                                     np.asarray(self.meta.scaler.std))
            log.error("stream %s: cannot calibrate (%s); using the model's scaler", st.id, e)
        w = st.ring.push(ts, st.scaler.apply(raw))
        if len(w.ts):
            scores, _ = score_windows(w.x, self.detector.infer(w.x))
            st.threshold = fit_threshold(st.smoother.update(scores), c.quantile,
                                         c.margin * (self.meta.calibration_margin or 1.0))
        else:
            st.threshold = self._configured_threshold()
            log.error("stream %s: no complete window in the %d calibration samples "
                      "(too many missing values?); using the configured threshold %.4g",
                      st.id, len(ts), st.threshold)
        if self.cfg.scoring.threshold != "model":
            st.threshold = float(self.cfg.scoring.threshold)
        log.info("stream %s: calibrated on %d samples, threshold %.4g", st.id, len(ts),
                 st.threshold)
        if self.store:
            self.store.save(st.id, self.meta.onnx_sha256, {
                "mean": st.scaler.mean.tolist(), "std": st.scaler.std.tolist(),
                "threshold": st.threshold, "samples": int(len(ts)),
                "quantile": c.quantile, "margin": c.margin,
                "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    # ------------------------------------------------------------ processing
    def process(self, batches: list[Batch]) -> None:
        """Run one tick: every batch through its ring; all due windows in one ORT call."""
        due: list[tuple[StreamState, object]] = []
        n_cal = self.cfg.calibration.samples
        for b in batches:
            st = self._stream(b.stream)
            self.metrics.samples_in += len(b)
            st.samples += len(b)
            ts, values = b.ts, b.values
            if len(ts):
                st.last_ts = float(ts[-1])
            if not st.ready:
                take = min(len(ts), n_cal - st.calib_n)
                st.calib_ts.append(ts[:take])
                st.calib_values.append(values[:take])
                st.calib_n += take
                if st.calib_n >= n_cal:
                    self._calibrate(st)
                ts, values = ts[take:], values[take:]
                if not len(ts):
                    continue
            w = st.ring.push(ts, st.scaler.apply(values))
            if len(w.ts):
                due.append((st, w))
        if not due:
            return
        x = due[0][1].x if len(due) == 1 else np.concatenate([w.x for _, w in due])
        recon = self.detector.infer(x)
        scores, err = score_windows(x, recon)
        self.metrics.windows_inferred += len(x)
        off = 0
        for st, w in due:
            k = len(w.ts)
            s = st.smoother.update(scores[off:off + k])
            events = st.tracker.update(w.ts, s, st.threshold, err[off:off + k])
            off += k
            self._emit(st, w.ts, s, events)

    def _emit(self, st: StreamState, ts, scores, events) -> None:
        tr = st.tracker
        for sink in self.sinks:
            try:
                sink.scores(st.id, ts, scores, st.threshold, tr.labels, tr.open_mask)
                for ev in events:
                    sink.alert(ev)
                    if ev["type"] in ("new", "end"):
                        sink.state(st.id, "anomaly" if ev["type"] == "new" else "normal")
            except Exception:   # one broken sink must not stop detection or the others
                self._sink_errors += 1
                if self._sink_errors <= 5 or self._sink_errors % 1000 == 0:
                    log.exception("sink %s failed (%d failures so far)",
                                  type(sink).__name__, self._sink_errors)
        for ev in events:
            self.metrics.alerts[ev["type"]] += 1

    # ------------------------------------------------------------ health
    def health(self) -> dict:
        h = self.metrics.snapshot()
        h.update({
            "node": self.cfg.node,
            "model": {**self.model_info, "window": self.meta.window},
            "ep": self.detector.ep,
            "sources": {r.stream.id: {"type": r.stream.source.type,
                                      "connected": bool(r.source.connected)}
                        for r in self.runners},
            "streams": {sid: {"state": st.tracker.state, "samples": st.samples,
                              "calibrated": st.ready, "threshold": st.threshold,
                              "ring_resets": st.ring.resets, "windows_skipped": st.ring.skipped}
                        for sid, st in self.streams.items()},
        })
        return h

    def _maybe_health(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_health >= self.cfg.mqtt.health_interval_s:
            self._last_health = now
            h = self.health()
            for sink in self.sinks:
                try:
                    sink.health(h)
                except Exception:
                    log.exception("sink %s failed on health", type(sink).__name__)

    # ------------------------------------------------------------ lifecycle
    def _drain(self) -> list:
        items = []
        while True:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                return items

    def start(self, start_sinks: bool = True) -> None:
        if start_sinks:
            for sink in self.sinks:
                sink.start()
        for r in self.runners:
            r.start()   # a runner handed over by a reload is already running

    def run(self, until_exhausted: bool = False, interrupted=None) -> None:
        """Drain the queue until stopped, `interrupted()` is true, or (replay) every source ended."""
        ended = self._ended
        while not self.stop_event.is_set() and not (interrupted and interrupted()):
            if self.on_tick:
                self.on_tick()
            try:
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                self._maybe_health()
                continue
            batch: list[Batch] = []
            while True:
                if isinstance(item, SourceRunner):
                    ended.add(item.stream.id)
                else:
                    batch.append(item)
                if len(batch) >= 256:
                    break
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self.process(batch)
            self._maybe_health()
            if until_exhausted and len(ended) >= len(self.runners):
                break

    def close_alerts(self, why: str) -> None:
        """Send "end" for every open alert, stamped with its stream's newest sample.

        Alert state lives in this pipeline; the one replacing it (reload) or the next
        process starts with every stream normal and could never close these."""
        for st in self.streams.values():
            ev = st.tracker.close(st.last_ts, st.threshold)
            if ev is None:
                continue
            log.info("stream %s: alert %s ended (%s)", st.id, ev["id"], why)
            self.metrics.alerts["end"] += 1
            for sink in self.sinks:
                try:
                    sink.alert(ev)
                    sink.state(st.id, "normal")
                except Exception:
                    log.exception("sink %s failed", type(sink).__name__)

    def reusable_sources(self, cfg: AgentConfig, channels: list[str]) -> set[str]:
        """Ids of the streams whose running source can serve a pipeline for `cfg` and a
        model with `channels`: same source settings, same channel order (the decoders
        map fields onto it) and, for MQTT sources, the same broker settings and node.
        A source that has ended (a crash, a replay at its end) is rebuilt instead."""
        if list(channels) != list(self.meta.channels):
            return set()
        new = {s.id: s for s in cfg.streams}
        same_broker = (cfg.mqtt, cfg.node) == (self.cfg.mqtt, self.cfg.node)
        return {r.stream.id for r in self.runners
                if r.running and new.get(r.stream.id) == r.stream
                and (r.stream.source.type != "mqtt" or same_broker)}

    def stop(self, stop_sinks: bool = True, close_alerts: str | None = None,
             keep: set[str] = frozenset()) -> Handover:
        """Stop the sources (but those of the streams in `keep`) and process what they
        delivered; with `close_alerts` (the reason), end the open alerts; with
        `stop_sinks`, stop the sinks.  Returns what the next pipeline takes over."""
        self.stop_event.set()
        going = [r for r in self.runners if r.stream.id not in keep]
        for r in going:
            r.stop()
        for r in going:
            r.join(timeout=3)
        # What arrived before this point is processed here, the rest by the next
        # pipeline: every sample exactly once, in order.
        rest = self._drain()
        ended = self._ended | {r.stream.id for r in rest if isinstance(r, SourceRunner)}
        rest = [b for b in rest if isinstance(b, Batch)]
        if rest:
            self.process(rest)
        if close_alerts:
            self.close_alerts(close_alerts)
        self._maybe_health(force=True)
        if stop_sinks:
            for sink in self.sinks:
                try:
                    sink.stop()
                except Exception:
                    log.exception("sink %s failed to stop cleanly", type(sink).__name__)
        kept = {r.stream.id: r for r in self.runners if r.stream.id in keep}
        return Handover(self.queue, kept, ended & set(kept))

"""What the HTTP endpoints compute, with no HTTP in it: the server maps the domain
errors below to status codes.

- `predict_csv`: one CSV file through `agent.prediction` (the PaddleX endpoint).
- `push_sample`: one sample appended to a named stream (the default stream
  `DEFAULT_STREAM` when the caller names none), run by the daemon's engine (learning
  period, ring buffer, alert hysteresis), so a stream fed over HTTP is judged exactly
  as one fed over MQTT.  The answer is the score, or why there is none yet
  (`Engine.pending`: learning / warming_up / skipped, with the samples needed), or
  "learned" for the sample that ended the learning period.  Streams idle for
  `buffer.idle_evict_s` (3600 s) are dropped as the daemon drops them (none with an
  open alert), looked for at most once a second, before a new stream is admitted.
- `score_window`: one window scored, never against a baseline that does not fit it:
  with a stream, against that stream's learned baseline (scaler and threshold; refused
  while it is still learning); without one, against the model's own scaler and
  threshold, but only when those mean something on raw data: the model needs no
  per-stream baseline (`jobs.model_learning_rows` is None), or the server was started
  with `calibrate=0` (the operator chose the model's scaler for everything, as PaddleX
  does).  Otherwise it is refused with the way to get a score.  A window's score is
  its newest step's, unsmoothed (`Stream.judge`: the scaler the stream applied to its
  newest sample); a stream whose policy smooths its scores (the shipped SKAB models:
  over 10) fitted its threshold on smoothed scores, so a window near the threshold can
  be judged otherwise than the stream judges the same samples: the sample form is the
  stream's own judgement.
"""
from __future__ import annotations

import base64
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..contract import StreamScaler, score_windows, top_channels
from ..detector import Detector, DetectorError
from ..engine import Engine
from ..jobs import detection_config, model_learning_rows
from ..metrics import Metrics
from ..prediction import DEFAULT_MAX_GAP, PredictError, plot_png, predict
from ..sources.base import Batch

MAX_STREAMS = 1024
DEFAULT_STREAM = "default"
EVICT_EVERY_S = 1.0     # idle streams are looked for at most this often (a pass over all)


class InputError(ValueError):
    """Well-formed but unusable input (the server answers 422)."""


class NotJudgeable(InputError):
    """A window that no fitting baseline can judge (yet); the message says what to do."""


class TooManyStreams(RuntimeError):
    """The named-stream limit is reached (the server answers 429)."""


class AnomalyService:
    def __init__(self, model_path: str, calibrate: int | None = None, compat: bool = False,
                 max_gap: float = DEFAULT_MAX_GAP, visualize: bool = False,
                 metrics: Metrics | None = None, max_streams: int = MAX_STREAMS,
                 workers: int = 4, idle_evict_s: float | None = None):
        self.metrics = metrics or Metrics()
        self.detector = Detector(model_path, metrics=self.metrics)
        self.meta = self.detector.meta
        self.calibrate = model_learning_rows(self.meta) if calibrate is None else calibrate
        self.compat, self.max_gap, self.visualize = compat, max_gap, visualize
        self.scaler = StreamScaler.from_meta(self.meta)
        self.threshold = float(self.meta.threshold.value)
        # the model's scaler means something on raw data: see the module doc
        self.model_scaler_ok = model_learning_rows(self.meta) is None or calibrate == 0
        # file predictions run a whole file each: bound how many at once
        self._files = threading.BoundedSemaphore(workers)
        # idle_evict_s: buffer.idle_evict_s, the daemon's default unless given
        over = {"buffer": {"idle_evict_s": idle_evict_s}} if idle_evict_s else None
        self.engine = Engine(detection_config(self.meta, self.calibrate or 0, over, node="http"),
                             self.detector, metrics=self.metrics, default_max_streams=max_streams)
        self._lock = threading.Lock()
        self._evicted = time.monotonic()

    # ------------------------------------------------------------ files
    def predict_csv(self, data: bytes) -> tuple[str, str | None]:
        """(result CSV text, base64 PNG or None) for one CSV file's bytes."""
        with self._files, tempfile.TemporaryDirectory(prefix="tsad-http-") as d:
            path = Path(d) / "input.csv"
            path.write_bytes(data)
            try:
                pred = predict(path, self.detector, self.calibrate, self.compat, self.max_gap,
                               metrics=self.metrics)
                image = (base64.b64encode(plot_png(pred)).decode("ascii")
                         if self.visualize else None)
            except PredictError as e:
                # the temporary path means nothing to the client
                raise InputError(str(e).replace(str(path), "csv")) from None
            return pred.result_csv(), image

    # ------------------------------------------------------------ windows and streams
    def score_window(self, values: np.ndarray, stream: str | None = None) -> dict:
        with np.errstate(over="ignore", invalid="ignore"):     # overflow is answered below
            s, err, threshold = self._judge(values, stream)
        self.metrics.samples_in += len(values)
        self.metrics.windows_inferred += 1
        if not np.isfinite(s):
            scaler = self.scaler if stream is None else self.engine.streams[stream].scaler
            with np.errstate(over="ignore", invalid="ignore"):
                if np.isfinite(scaler.apply(values)).all():
                    # not the input: the model's own output (ORT audit, twenty-second session)
                    raise DetectorError("the model returned NaN or infinity for this window: "
                                        "no score (tsad-export verify MODEL checks a model)")
            # a stream forward-fills such a value as missing; a window has nothing to fill
            # it with, and a NaN score is neither valid JSON nor "normal"
            raise InputError("values overflow float32 once scaled by the "
                             + ("model's scaler" if stream is None else f"baseline of stream {stream}")
                             + ": no score; a stream takes such a sample as missing")
        return {"score": s, "status": "anomaly" if s >= threshold else "normal",
                "threshold": threshold, "channels": top_channels(err, self.meta.channels, 3)}

    def _judge(self, values: np.ndarray, stream: str | None) -> tuple[float, np.ndarray, float]:
        """(score, channel errors, threshold): against the stream's baseline as it scaled
        its newest sample (unsmoothed), or without a stream the model's own scaler and
        threshold."""
        c = self.meta.n_channels
        if stream is None:
            if self.model_scaler_ok:
                x = self.scaler.apply(values)[None]
                scores, err = score_windows(x, self.detector.infer(x))
                return float(scores[0]), err[0], self.threshold
            raise NotJudgeable(
                f"model {self.meta.name} judges data against a baseline learned per stream "
                f"(its first {self.calibrate} samples); a window without a stream has none. "
                f"Send samples one at a time ({{\"values\": [{c} numbers]}} feeds stream "
                f"'{DEFAULT_STREAM}', {{\"stream\": ID, \"values\": [...]}} a named one), "
                f"then windows with that \"stream\"")
        with self._lock:
            st = self.engine.streams.get(stream)
            if st is None:
                raise NotJudgeable(f"no stream {stream!r}: send it samples first; a window "
                                   f"is judged against its stream's learned baseline")
            if st.baseline.learning:
                n = st.baseline.needed
                raise NotJudgeable(f"stream {stream} is still learning: "
                                   + (f"{n} samples needed" if n is not None
                                      else "its learning period is set by time"))
            return (*st.judge(values, self.detector.infer), st.threshold)

    def stream_count(self) -> int:
        return len(self.engine.streams)

    def push_sample(self, stream: str, ts: float, values: np.ndarray) -> dict:
        with self._lock:
            now = time.monotonic()
            if now - self._evicted >= EVICT_EVERY_S:
                # as the daemon does: per-session stream ids must not fill the table for good
                self._evicted = now
                self.engine.evict_idle(now)
            if stream not in self.engine.streams and \
                    len(self.engine.streams) >= self.engine.admission.default_cap:
                idle = self.engine.cfg.buffer.idle_evict_s
                raise TooManyStreams(
                    f"too many streams ({self.engine.admission.default_cap}); reuse stream ids"
                    + (f" (a stream without samples for {idle:g} s is dropped)" if idle else ""))
            results = self.engine.step([Batch(stream, np.array([ts], np.float64), values[None],
                                              source="http", arrived=now)])
            done = [r for r in results if len(r.ts)]
            if done:
                r = done[-1]
                s = float(r.scores[-1])
                if not np.isfinite(s):      # never seen (overflow is missing data): never NaN
                    raise InputError(f"stream {stream}: the sample was taken, but its window "
                                     f"has no finite score ({s})")
                return {"score": s, "status": "anomaly" if s >= r.threshold else "normal",
                        "threshold": r.threshold, "alert": self.engine.streams[stream].tracker.state}
            pending = self.engine.pending(stream)
            if pending["status"] == "skipped" and any("normal" in r.entered for r in results):
                # the sample that ended the learning period: its window fitted the
                # threshold and is not reported; the next sample is scored
                st = self.engine.streams[stream]
                return {"status": "learned", "needed": 1, "threshold": st.threshold}
            return pending


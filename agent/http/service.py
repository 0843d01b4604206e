"""What the HTTP endpoints compute, with no HTTP in it: the server maps the domain
errors below to status codes.

- `predict_csv`: one CSV file through `agent.prediction` (the PaddleX endpoint).
- `score_window`: one window scored with the model's scaler and threshold.
- `push_sample`: one sample appended to a named stream, run by the daemon's engine
  (learning period, ring buffer, alert hysteresis), so a stream fed over HTTP is
  judged exactly as one fed over MQTT.
"""
from __future__ import annotations

import base64
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..contract import StreamScaler, score_windows, top_channels
from ..detector import Detector
from ..engine import Engine
from ..jobs import detection_config, model_learning_rows
from ..metrics import Metrics
from ..prediction import DEFAULT_MAX_GAP, PredictError, plot_png, predict
from ..sources.base import Batch

MAX_STREAMS = 1024


class InputError(ValueError):
    """Well-formed but unusable input (the server answers 422)."""


class TooManyStreams(RuntimeError):
    """The named-stream limit is reached (the server answers 429)."""


class AnomalyService:
    def __init__(self, model_path: str, calibrate: int | None = None, compat: bool = False,
                 max_gap: float = DEFAULT_MAX_GAP, visualize: bool = False,
                 metrics: Metrics | None = None, max_streams: int = MAX_STREAMS,
                 workers: int = 4):
        self.metrics = metrics or Metrics()
        self.detector = Detector(model_path, metrics=self.metrics)
        self.meta = self.detector.meta
        self.calibrate = model_learning_rows(self.meta) if calibrate is None else calibrate
        self.compat, self.max_gap, self.visualize = compat, max_gap, visualize
        self.scaler = StreamScaler.from_meta(self.meta)
        self.threshold = float(self.meta.threshold.value)
        # file predictions run a whole file each: bound how many at once
        self._files = threading.BoundedSemaphore(workers)
        self.engine = Engine(detection_config(self.meta, self.calibrate or None, node="http"),
                             self.detector, metrics=self.metrics, default_max_streams=max_streams)
        self._lock = threading.Lock()

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
    def score_window(self, values: np.ndarray) -> dict:
        x = self.scaler.apply(values)[None]
        scores, err = score_windows(x, self.detector.infer(x))
        self.metrics.samples_in += len(values)
        self.metrics.windows_inferred += 1
        s = float(scores[0])
        return {"score": s, "status": "anomaly" if s >= self.threshold else "normal",
                "threshold": self.threshold,
                "channels": top_channels(err[0], self.meta.channels, 3)}

    def stream_count(self) -> int:
        return len(self.engine.streams)

    def push_sample(self, stream: str, ts: float, values: np.ndarray) -> dict:
        with self._lock:
            if stream not in self.engine.streams and \
                    len(self.engine.streams) >= self.engine.default_max_streams:
                raise TooManyStreams(f"too many streams ({self.engine.default_max_streams}); "
                                     f"reuse stream ids")
            results = self.engine.step([Batch(stream, np.array([ts], np.float64), values[None],
                                              source="http")])
            done = [r for r in results if len(r.ts)]
            if done:
                r = done[-1]
                s = float(r.scores[-1])
                return {"score": s, "status": "anomaly" if s >= r.threshold else "normal",
                        "threshold": r.threshold, "alert": self.engine.streams[stream].tracker.state}
            return self.engine.pending(stream)


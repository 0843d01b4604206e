"""The engine's model call over a step's due windows, and the windows it cannot judge.

One batched call serves every stream with windows due (agent/engine.py).  Two outcomes must
not reach a stream's alert tracker (ORT audit, twenty-second session):
- a call that fails (an ONNX Runtime error: a value the graph refuses, memory on a small
  board, a device error).  It killed the daemon, every stream with it, and the samples the
  broker kept for its session killed it again at the restart.  Now the windows are tried
  again stream by stream, so one stream's windows do not take the others' with them; a
  stream whose own call fails has its windows dropped;
- windows whose reconstruction is NaN or infinite.  Their score says nothing: a NaN counted
  as normal and closed an open alert in the middle of a fault (then opened a second one),
  an infinity opened an alert with no score and no channel to blame.
A dropped window is judged by nothing: an open alert stays open, the k-of-n history and the
adaptation skip it.  Both are counted (health `errors.inference`: failed calls;
`errors.nonfinite_output`: windows) and logged, the first 5 times and every 1000th.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from .contract import score_windows
from .detector import Detector, DetectorError
from .metrics import Metrics
from .scoring import places

if TYPE_CHECKING:
    from .ring import Windows
    from .stream import Stream

log = logging.getLogger("tsad.engine")

Due = list[tuple["Stream", "Windows"]]


def scored(detector: Detector, due: Due, metrics: Metrics) -> tuple[Due, np.ndarray, np.ndarray]:
    """(the due blocks left, their windows' scores, per-channel errors), every window of
    them with a finite score."""
    x = due[0][1].x if len(due) == 1 else np.concatenate([w.x for _, w in due])
    try:
        recon, failed = detector.infer(x), 0
    except DetectorError as e:
        recon, failed = _one_by_one(detector, due, metrics, e)
    metrics.windows_inferred += len(x) - failed
    scores, err = score_windows(x, recon)
    ok = np.isfinite(scores) & np.isfinite(err).all(axis=1)
    if ok.all():
        return due, scores, err
    return _drop(due, ok, metrics, failed), scores[ok], err[ok]


def _one_by_one(detector: Detector, due: Due, metrics: Metrics,
                e: DetectorError) -> tuple[np.ndarray, int]:
    """Each stream's windows on their own call, NaN where that call fails too; and how
    many windows failed."""
    if len(due) == 1:
        _failed(metrics, due[0][0].id, e)
        return np.full(due[0][1].x.shape, np.nan, np.float32), len(due[0][1])
    out, failed = [], 0
    for st, w in due:
        try:
            out.append(detector.infer(w.x))
        except DetectorError as one:
            _failed(metrics, st.id, one)
            out.append(np.full(w.x.shape, np.nan, np.float32))
            failed += len(w)
    return np.concatenate(out), failed


def _failed(metrics: Metrics, sid: str, e: DetectorError) -> None:
    if (n := metrics.error("inference")) is not None:
        log.error("stream %s: %s (%d failed call(s) so far): its windows are dropped, judged "
                  "by nothing; the other streams go on", sid, e, n)


def _drop(due: Due, ok: np.ndarray, metrics: Metrics, failed: int) -> Due:
    """The due blocks without their windows not `ok` (Stream.unjudged)."""
    bad = int(len(ok) - ok.sum()) - failed          # a failed call's windows are NaN too
    if bad > 0:
        metrics.errors["nonfinite_output"] += bad
        n = metrics.errors["nonfinite_output"]
        if n - bad < 5 or n // 1000 > (n - bad) // 1000:
            log.error("the model returned NaN or infinity for %d window(s) (%d so far): they "
                      "are dropped, judged by nothing (check the model: tsad-export verify)",
                      bad, n)
    out, off = [], 0
    for (st, w), i in zip(due, places(due)):
        keep = ok[off:off + len(w)]
        off += len(w)
        out.append((st, w if keep.all() else st.unjudged(i, w, keep)))
    return out

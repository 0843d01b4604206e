"""Running recorded data through the engine: the one way every file-based entry point
(replay, evaluate, predict, the demo, the HTTP file endpoint, the benchmarks) turns a
table into per-window results, so they all see exactly what the daemon would.

A file is fed to `Engine.step` at full speed or paced by its timestamps.  At full speed
`chunk` rows go in each step (the replay source's batch size; CHUNK = adaptation.SPAN, the
most one ingest holds), counted again from the end of a learning period set in rows.  So
every step after learning starts on an adaptation epoch and the model gets whole batches:
9-15 % less time per window for the two small models than 256-row chunks counted from
row 0, whose epochs were cut into batches of 16 and 48 (docs/RESULTS.md, ninth session).
The results do not depend on the chunking (adaptation.py).  Every result may go to sinks
as it is produced, and a `Recording` keeps them as arrays per stream.
"""
from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .adaptation import SPAN
from .config import AgentConfig, BufferConfig, DetectionConfig
from .config_build import build
from .contract import read_table
from .detector import Detector
from .engine import Engine
from .model_meta import ModelMeta
from .policy import effective, learning_rows
from .running import rule
from .sinks import build_sinks
from .sinks.base import Sink
from .sources.base import Batch
from .stream import StreamResult
from .stream_status import unscored, unscored_text

CHUNK = SPAN


def detection_config_dict(learning_rows: int | None, overrides: dict | None,
                          node: str) -> dict:
    d: dict = {"node": node}
    if learning_rows is not None:
        # 0: the bare model, its own scaler and threshold, none of its policy
        d.update({"calibration": {"enabled": True, "samples": learning_rows}} if learning_rows
                 else {"model_policy": False})
    for key, val in (overrides or {}).items():
        d[key] = {**d.get(key, {}), **val} if isinstance(val, dict) else val
    return d


def flag_overrides(smoothing: int | None = None, quantile: float | None = None,
                   margin: float | None = None, std_floor: float | None = None,
                   running: str | None = None, running_start_s: float | None = None) -> dict:
    """The detection sections a file command's flags set (None: left unset); ValueError
    for a --running that is not CHANNEL>LEVEL or CHANNEL<LEVEL."""
    out: dict = {}
    if smoothing is not None:
        out["scoring"] = {"smoothing": smoothing}
    cal = {k: v for k, v in (("quantile", quantile), ("margin", margin),
                             ("std_floor", std_floor)) if v is not None}
    if cal:
        out["calibration"] = cal
    if running is not None:
        out["running"] = rule(running, running_start_s)
    return out


def detection_config(meta: ModelMeta, learning_rows: int | None = None,
                     overrides: dict | None = None, node: str = "replay") -> DetectionConfig:
    """The detection settings for a file job: the model's own policy (agent/policy.py),
    except a learning period on the first `learning_rows` rows when given (0: none of the
    policy, the bare model with its own scaler and threshold), and `overrides` (merged one
    level deep per section)."""
    return effective(build(DetectionConfig, detection_config_dict(learning_rows, overrides, node)),
                     meta)


def file_config(path: str, model: str, learning_rows: int | None, overrides: dict | None = None,
                node: str = "replay", stream: str = "replay", speed: float = 0.0) -> AgentConfig:
    """The daemon config of one file replayed as one stream, with no broker and no state
    (the replay and demo commands; `overrides` may enable sinks or the broker)."""
    over = dict(overrides or {})
    det = detection_config_dict(learning_rows, {k: over.pop(k) for k in list(over)
                                                if k in DetectionConfig.__struct_fields__}, node)
    # a daemon config says model.policy where a detection config says model_policy
    policy = det.pop("model_policy", True)
    d = {**det, "state_dir": None, "model": {"path": model, "policy": policy},
         "streams": [{"id": stream, "source": {"type": "replay", "path": str(path),
                                               "speed": speed}}],
         "mqtt": {"enabled": False}, "sinks": {"console": {"enabled": False}}}
    for key, val in over.items():
        d[key] = {**d.get(key, {}), **val} if isinstance(val, dict) else val
    return build(AgentConfig, d)


def replay_config(cfg: AgentConfig, detector: Detector,
                  stop: Callable[[], bool] | None = None) -> tuple[Engine, Recording]:
    """Run a one-file config (`file_config`) to the end of its file, through its sinks."""
    s = cfg.streams[0]
    t = read_table(s.source.path, detector.meta.channels)
    engine = Engine(cfg.detection, detector)
    sinks = build_sinks(cfg, engine.metrics)
    for sink in sinks:
        sink.start()
    try:
        rec = run_table(engine, s.id, t.ts, t.values, chunk=s.source.chunk,
                        speed=s.source.speed, sinks=sinks, stop=stop)
    finally:
        for sink in sinks:
            sink.stop()
    return engine, rec


def replay_line(engine: Engine, rec: Recording, stream: str) -> str:
    """The replay command's summary: samples, windows scored, those left unscored for want
    of a channel's values (named), alert events, rejected input."""
    m, skipped = engine.metrics.snapshot(), unscored_text(unscored(engine.streams.get(stream)))
    return (f"replayed {m['samples_in']} samples, {m['windows_inferred']} windows, "
            + (f"{skipped}, " if skipped else "")
            + f"{len(rec.events)} alert events; malformed {m['malformed'] or 0}")


def model_learning_rows(meta: ModelMeta) -> int | None:
    """The learning period the model's policy asks for, in rows (None: none)."""
    return learning_rows(detection_config(meta)) or None


@dataclass
class Recording:
    """Per-window results kept as numpy blocks per stream, joined once on read."""
    blocks: dict[str, list[StreamResult]] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)

    def add(self, results: list[StreamResult]) -> None:
        for r in results:
            if len(r.ts):
                self.blocks.setdefault(r.stream, []).append(r)
            self.events += r.events

    def table(self, stream: str) -> dict[str, np.ndarray]:
        """{"ts", "score", "label", "alert", "threshold"} arrays for one stream, in order."""
        rs = self.blocks.get(stream, [])
        if not rs:
            return {k: np.empty(0) for k in ("ts", "score", "label", "alert", "threshold")}
        return {"ts": np.concatenate([r.ts for r in rs]),
                "score": np.concatenate([r.scores for r in rs]),
                "label": np.concatenate([r.labels for r in rs]),
                "alert": np.concatenate([r.alert_open for r in rs]),
                "threshold": np.concatenate([np.full(len(r.ts), r.threshold) for r in rs])}


def deliver(results: list[StreamResult], sinks: list[Sink], on_error=None) -> None:
    """Hand results to sinks in order: scores, then each event, then the states entered.
    A sink that raises is reported to `on_error(sink)` and does not stop the others."""
    for sink in sinks:
        try:
            for r in results:
                if len(r.ts):
                    sink.scores(r.stream, r.ts, r.scores, r.threshold, r.labels, r.alert_open)
                for ev in r.events:
                    sink.alert(ev)
                for state in r.entered:
                    sink.state(r.stream, state)
        except Exception:
            if on_error is None:
                raise
            on_error(sink)


def step_bounds(n: int, learning: int, chunk: int) -> list[tuple[int, int]]:
    """(start, end) rows of each step over n rows: `chunk` rows at a time, restarted where
    the first `learning` rows end (0: no learning period in rows)."""
    cut = min(learning, n)
    return [(a, min(a + chunk, cut)) for a in range(0, cut, chunk)] + \
        [(a, min(a + chunk, n)) for a in range(cut, n, chunk)]


def run_table(engine: Engine, stream: str, ts: np.ndarray, values: np.ndarray,
              chunk: int = CHUNK, speed: float = 0.0, sinks: list[Sink] = (),
              stop: Callable[[], bool] | None = None) -> Recording:
    """Feed one stream's rows to the engine to the end (or until `stop()`); speed 0 = as
    fast as possible, else real time x speed by the rows' timestamps."""
    rec = Recording()
    t0 = time.monotonic()
    failed = sum(engine.metrics.errors.values())
    for a, b in (zip(range(len(ts)), range(1, len(ts) + 1)) if speed > 0 else
                 step_bounds(len(ts), learning_rows(engine.cfg), chunk)):
        if stop is not None and stop():
            break
        if speed > 0:
            delay = t0 + (ts[a] - ts[0]) / speed - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        results = engine.step([Batch(stream, ts[a:b], values[a:b])])
        rec.add(results)
        if sinks:
            deliver(results, sinks)
    # the engine logs a stream's failure and goes on, as a daemon must; a file job's
    # figures would then describe part of the file, so it ends with an error instead
    failed = sum(engine.metrics.errors.values()) - failed
    if failed:
        raise ValueError(f"stream {stream}: the engine failed {failed} time(s) on it (logged "
                         f"above); its results would be incomplete")
    return rec


def write_results_csv(path: Path, table: dict) -> None:
    """`timestamp,score,label,alert` per window (the replay command's --out)."""
    import pandas as pd
    pd.DataFrame({"timestamp": pd.to_datetime(table["ts"], unit="s").strftime("%Y-%m-%d %H:%M:%S"),
                  "score": table["score"], "label": table["label"].astype(int),
                  "alert": table["alert"].astype(int)}).to_csv(path, index=False,
                                                               float_format="%.6g")


def rows_prediction(row_ts: np.ndarray, table: dict, by: str) -> np.ndarray:
    """Per-row 0/1 from per-window results (`by`: "alert" or "label"); rows without a
    window of their own (warm-up, learning) are 0."""
    pred = np.zeros(len(row_ts), dtype=np.int8)
    if len(table["ts"]):
        if np.all(np.diff(row_ts) > 0):
            idx = np.searchsorted(row_ts, table["ts"])
            ok = (idx < len(row_ts))
            ok[ok] = row_ts[idx[ok]] == table["ts"][ok]
        else:
            idx = _window_rows(row_ts, table["ts"])
            ok = idx >= 0
        pred[idx[ok]] = table[by][ok].astype(np.int8)
    return pred


def _window_rows(row_ts: np.ndarray, window_ts: np.ndarray) -> np.ndarray:
    """Each window's row (-1: none) in a file whose times repeat (10 Hz logged to the
    second) or jitter back, where a search by time would give every window of a repeated
    time its first row.  Windows are rows' newest samples in file order, so they are
    matched from the end, each to the latest unused row of its time: exact where the rows
    without a window come before those with one (a warm-up, a window refilling after
    missing values)."""
    out = np.full(len(window_ts), -1, np.intp)
    rows, j = row_ts.tolist(), len(row_ts) - 1
    for k, t in zip(range(len(window_ts) - 1, -1, -1), reversed(window_ts.tolist())):
        while j >= 0 and rows[j] != t:
            j -= 1
        if j < 0:
            break
        out[k], j = j, j - 1
    return out


def long_run(ts: np.ndarray, pred: np.ndarray) -> dict:
    """What an operator lives with: the share of rows with an alert open and the alerts
    that opened, per hour and per day of the recording's running.  A step over
    buffer.gap_factor x the median step (a historian outage, a stop cut out) is no running
    time: counted as time, three 6-hour outages in 96 hours made fit-policy's budget of
    alerts per day a fifth looser than asked (training audit, twenty-second session)."""
    steps = np.diff(ts)
    steps = steps[steps > 0]
    hours = float(steps[steps <= BufferConfig().gap_factor * np.median(steps)].sum()) / 3600 \
        if len(steps) else 0.0
    opened = int(np.sum(np.diff(np.concatenate([[0], pred])) == 1))
    return {"rows": int(len(pred)), "hours": round(hours, 3),
            "alert_open_share": float(pred.mean()) if len(pred) else 0.0, "alerts": opened,
            "alerts_per_hour": opened / hours if hours else None,
            "alerts_per_day": 24 * opened / hours if hours else None}

"""Per-stream calibration: fit a scaler and threshold on the stream's own normal
data, and keep them across restarts.

A sensor on site rarely has the test bed's offsets, so with calibration enabled
each stream gets its own mean/std and score threshold.  The fit is tied to the
model's sha256: a new model invalidates it and the stream recalibrates.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np


log = logging.getLogger(__name__)

SCHEMA = 1


def _filename(stream: str) -> str:
    # Stream ids from MQTT topic levels can hold any character; percent-encode
    # everything else (and '%' itself, so the mapping stays one-to-one).
    safe = re.sub(r"[^A-Za-z0-9_.\-]",
                  lambda m: "".join("%%%02X" % b for b in m.group().encode()), stream)
    if safe.startswith("."):
        safe = "%2E" + safe[1:]   # no hidden files, no "." or ".."
    return safe + ".json"


def _vector(d: dict, key: str) -> np.ndarray:
    v = d.get(key)
    if not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) for x in v):
        raise ValueError(f"'{key}' must be a non-empty list of numbers")
    a = np.asarray(v, np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"'{key}' holds non-finite values")
    return a


class CalibrationStore:
    """One JSON file per stream under `<state_dir>/calibration/`."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir) / "calibration"

    def path(self, stream: str) -> Path:
        return self.dir / _filename(stream)

    def load(self, stream: str, model_sha: str) -> dict | None:
        """The saved fit ("mean"/"std" as float64 arrays), or None when there is none usable."""
        p = self.path(stream)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            log.warning("stream %s: calibration file %s is unreadable (%s); recalibrating", stream, p, e)
            return None
        try:
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            if d.get("schema") != SCHEMA:
                raise ValueError(f"schema {d.get('schema')!r}, expected {SCHEMA}")
            mean, std = _vector(d, "mean"), _vector(d, "std")
            if mean.shape != std.shape:
                raise ValueError(f"{len(mean)} means but {len(std)} stds")
            if not np.all(std > 0):
                raise ValueError("'std' must be > 0")
            thr = d.get("threshold")
            if not isinstance(thr, (int, float)) or not (0 < thr < float("inf")):
                raise ValueError(f"'threshold' is {thr!r}, expected a finite number > 0")
        except ValueError as e:
            log.warning("stream %s: calibration file %s is invalid (%s); recalibrating", stream, p, e)
            return None
        if d.get("model_sha256") != model_sha:
            log.info("stream %s: calibration was fitted for model %.12s..., now %.12s...; recalibrating",
                     stream, str(d.get("model_sha256")), model_sha)
            return None
        return {**d, "mean": mean, "std": std, "threshold": float(thr)}

    def save(self, stream: str, model_sha: str, record: dict) -> Path:
        """Write {"mean","std","threshold","samples","quantile","margin","fitted_at"} atomically."""
        body = {"schema": SCHEMA, "stream": stream, "model_sha256": model_sha}
        for k, v in record.items():
            body[k] = np.asarray(v).tolist() if isinstance(v, (np.ndarray, list, tuple)) else (
                v.item() if isinstance(v, np.generic) else v)
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.path(stream)
        # tmp + fsync + rename: a power cut leaves the old file or the new one, never half of one.
        fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(body, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        try:
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass   # some filesystems cannot fsync a directory; the rename is still atomic
        return p

"""Per-stream baselines on disk: `<state_dir>/calibration/<stream>.json`.

A learned baseline (scaler and threshold, see baseline.py; with them the adapted mean and
a threshold refinement under way, refine.py) is saved when its learning period ends, at
intervals and on a clean stop, so a restart resumes it instead of learning again.  Each
file is tied to the model's sha256 and to the settings its values were computed under
(`basis`: policy.baseline_basis): a new model, or a change in one of those settings
(the model's policy refitted, a config key, a release that ships another policy), and
the stream learns again, with a log line naming what changed.

Rules:
- A file saved before the basis was (tsad-agent < 0.2.0) is refused too: it records only
  calibration.quantile and margin, so the settings that set the scores' scale
  (scoring.normalize, smoothing) cannot be shown equal to today's, and a threshold on
  another scale is an alert that never ends or a blind stream.  One learning period per
  stream, once, is the price.
- A file that is unreadable, malformed, for another model, whose vectors do not have
  one value per model channel, or any of whose values has the wrong type or range, is
  refused with a log line; the stream learns.
- A save that fails (read-only or full disk) never stops detection: the error is
  logged, the baseline stays in memory, the save is retried by `retry()` (the
  pipeline calls it on its health tick), and `health()` reports the trouble.
- Writes are atomic (tmp + fsync + rename): a power cut leaves the old file or the
  new one, never half of one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from .refine import check_progress

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


def _vector(d: dict, key: str, n: int) -> np.ndarray:
    v = d.get(key)
    if not isinstance(v, list) or not all(type(x) in (int, float) for x in v):
        raise ValueError(f"'{key}' must be a list of numbers")
    if len(v) != n:
        raise ValueError(f"'{key}' has {len(v)} value(s), the model has {n} channel(s)")
    a = np.asarray(v, np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"'{key}' holds non-finite values")
    return a


def _check(d, n_channels: int) -> dict:
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    if d.get("schema") != SCHEMA:
        raise ValueError(f"schema {d.get('schema')!r}, expected {SCHEMA}")
    mean, std = _vector(d, "mean", n_channels), _vector(d, "std", n_channels)
    # the scaler multiplies by 1 / std in float32: a smaller std scales every value to
    # infinity, and every window would be skipped
    if not np.all(std >= np.finfo(np.float32).tiny):
        raise ValueError(f"'std' must be >= {np.finfo(np.float32).tiny:.3g}")
    thr = d.get("threshold")
    if not isinstance(thr, (int, float)) or not (0 < thr < float("inf")):
        raise ValueError(f"'threshold' is {thr!r}, expected a finite number > 0")
    rec = {**d, "mean": mean, "std": std, "threshold": float(thr)}
    # the optional keys too: a value of the wrong type would otherwise pass here and fail
    # when the stream's first sample restores it, taking the daemon down at every start
    samples = d.get("samples")
    if samples is not None and (type(samples) is not int or samples < 0):
        raise ValueError(f"'samples' is {samples!r}, expected a whole number >= 0")
    for key in ("level", "adapted_mean", "adapted_level"):
        if d.get(key) is not None:
            rec[key] = _vector(d, key, n_channels)
            if key != "adapted_mean" and not np.all(rec[key] > 0):
                raise ValueError(f"'{key}' must be > 0")
    was = d.get("refined_from")     # the threshold before its refinement (refine.py)
    if was is not None and (type(was) not in (int, float) or not 0 < was < float("inf")):
        raise ValueError(f"'refined_from' is {was!r}, expected a finite number > 0 or null")
    if d.get("refining") is not None:
        check_progress(d["refining"])
    if not isinstance(d.get("basis"), (dict, type(None))):
        raise ValueError(f"'basis' is {d.get('basis')!r}, expected an object")
    if not isinstance(d.get("fitted_at"), (str, type(None))):
        raise ValueError(f"'fitted_at' is {d.get('fitted_at')!r}, expected a text or null")
    return rec


def _plain(v):
    if isinstance(v, (np.ndarray, list, tuple)):
        return np.asarray(v).tolist()
    return v.item() if isinstance(v, np.generic) else v


class StateStore:
    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir) / "calibration"
        self._pending: dict[str, tuple[str, dict]] = {}
        self.problem: str | None = None
        # a digest of each stream's file as last written: the periodic save of a silent
        # stream rewrote the same bytes every 5 minutes (2 fsyncs each, on an SD card)
        self._written: dict[str, bytes] = {}

    def path(self, stream: str) -> Path:
        return self.dir / _filename(stream)

    def load(self, stream: str, model_sha: str, n_channels: int, basis: dict) -> dict | None:
        """The saved baseline ("mean"/"std" as float64 arrays), or None when none is usable:
        `basis`, the settings it must have been learned under (policy.baseline_basis)."""
        p = self.path(stream)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            log.warning("stream %s: baseline file %s is unreadable (%s); learning again",
                        stream, p, e)
            return None
        try:
            rec = _check(d, n_channels)
        except ValueError as e:
            log.warning("stream %s: baseline file %s is invalid (%s); learning again", stream, p, e)
            return None
        if rec.get("model_sha256") != model_sha:
            log.info("stream %s: baseline was learned for model %.12s..., now %.12s...; "
                     "learning again", stream, str(rec.get("model_sha256")), model_sha)
            return None
        if changed := basis_change(rec.get("basis"), basis):
            log.warning("stream %s: baseline file %s %s; learning again", stream, p, changed)
            return None
        return rec

    def save(self, stream: str, model_sha: str, record: dict) -> bool:
        """Write the record; False (logged, kept for `retry`) when the disk refuses it."""
        body = {"schema": SCHEMA, "stream": stream, "model_sha256": model_sha,
                **{k: _plain(v) for k, v in record.items()}}
        digest = hashlib.blake2b(json.dumps(body).encode(), digest_size=16).digest()
        if self._written.get(stream) == digest and stream not in self._pending:
            return True
        try:
            write_json(self.path(stream), body)
        except OSError as e:
            self._pending[stream] = (model_sha, record)
            problem = f"cannot save baselines in {self.dir}: {e.strerror or e}"
            if problem != self.problem:
                log.error("%s; keeping them in memory and retrying", problem)
            self.problem = problem
            return False
        self._pending.pop(stream, None)
        self._written[stream] = digest
        if not self._pending and self.problem:
            log.info("baselines saved again in %s", self.dir)
            self.problem = None
        return True

    def retry(self) -> None:
        for stream, (sha, record) in list(self._pending.items()):
            if not self.save(stream, sha, record):
                return

    def streams(self) -> list[str]:
        """The streams that have a baseline file here (none when the folder cannot be read)."""
        try:
            names = sorted(p.name for p in self.dir.glob("*.json"))
        except OSError:
            return []
        return [unquote(n[:-len(".json")]) for n in names]

    def forget(self, stream: str) -> None:
        self._pending.pop(stream, None)
        self._written.pop(stream, None)
        try:
            self.path(stream).unlink(missing_ok=True)
        except OSError as e:
            log.warning("stream %s: cannot remove its old baseline file: %s", stream, e)

    def health(self) -> dict:
        return {"ok": self.problem is None, "error": self.problem, "unsaved": len(self._pending)}


def basis_change(saved: dict | None, now: dict) -> str | None:
    """How the settings a baseline was learned under (`saved`) differ from `now`, in words;
    None when they do not.  A key `now` has and `saved` lacks is a difference (a later
    version's new setting: its old files cannot vouch for it); one only `saved` has is not
    (a rollback's older version does not know it)."""
    if saved is None:
        return ("was saved without the settings it was learned under (tsad-agent before "
                "0.2.0), so they cannot be checked against today's")
    diff = [f"{k} {_shown(saved[k]) if k in saved else 'unrecorded'} (now {_shown(v)})"
            for k, v in now.items() if k not in saved or saved[k] != v]
    return f"was learned with {', '.join(diff)}" if diff else None


def _shown(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


class FileWriter:
    """write_json to one file of state_dir, its failure logged once per distinct error and
    its recovery once: a full disk logged a warning at every 5-minute save (288 a day), and
    nothing when it was writable again.  `what`: what is kept in memory meanwhile."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        self.problem: str | None = None

    def write(self, body: dict) -> bool:
        try:
            write_json(self.path, body)
        except OSError as e:
            # strerror: the full text names mkstemp's random file, new at every try
            problem = (f"{self.path}: cannot be written ({e.strerror or type(e).__name__}); "
                       f"{self.what} kept in memory only")
            if problem != self.problem:
                log.warning("%s", problem)
            self.problem = problem
            return False
        if self.problem is not None:
            log.info("%s: written again", self.path)
            self.problem = None
        return True


def write_json(p: Path, body: dict) -> None:
    """Write `body` to `p` all or nothing: tmp + fsync + rename, then the folder's fsync,
    so a power cut leaves the old file or the new one (the folder is created). OSError
    when it cannot be written."""
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
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
        dfd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass   # some filesystems cannot fsync a directory; the rename is still atomic

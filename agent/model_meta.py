"""The model contract: the JSON metadata that sits beside every ONNX model.

`tsad-export` writes it, the runtime reads it, and nothing else is assumed:
window, channel order, scaler, threshold and score definition all come from here.
The file lives at ``<model>.onnx.json``.  See README "Model metadata".
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .contract import LABEL_COLUMNS

FORMAT = "tsad-model"
FORMAT_VERSION = 1

# The only score the runtime implements.  Defined once here, documented in README:
#   e_{t,c} = (xhat_{t,c} - x_{t,c})^2 in the model's scaled space (float64),
#   score_t = mean_c e_{t,c} at the NEWEST time step t of the window,
#   share_c = e_{t,c} / sum_c e_{t,c} (per-channel contribution).
SCORE_DEFINITION = "mse_last_step_scaled"

# The reconstruction models of the PaddleX time-series anomaly-detection pipeline, by the
# name a model's metadata carries: what tsad-export trains and models_onnx/ ships.
PADDLEX_MODELS = ("AutoEncoder_ad", "DLinear_ad", "Nonstationary_ad", "PatchTST_ad",
                  "TimesNet_ad")


class ModelMetaError(ValueError):
    """Metadata missing, malformed or inconsistent with the ONNX file."""


def name_problem(name: object) -> str | None:
    """Why `name` cannot name a model, or None. It goes into alerts, logs and metric
    labels, so it is one printable line of text."""
    if not isinstance(name, str) or not name.strip():
        return f"a model name is non-empty text, got {json.dumps(name)[:40]}"
    if len(name) > 128 or not name.isprintable():
        return f"a model name is at most 128 printable characters, got {name[:40]!r}"
    return None


def channel_problem(names: list[str]) -> str | None:
    """Why these channel names cannot be a model's, or None.  A name goes into log lines,
    alerts and metric labels: a newline in one split the log's lines in two."""
    # control characters and line breaks only: a no-break space, common inside a
    # spreadsheet's headers, is text (str.isprintable would refuse it)
    odd = [c for c in names if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in c)]
    if odd:
        return (f"channel names are printable text (no newline, tab or other control "
                f"character), got {odd[0][:40]!r}")
    return None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def meta_path_for(model_path: str | Path) -> Path:
    return Path(str(model_path) + ".json")


@dataclass
class Scaler:
    mean: list[float]
    std: list[float]


@dataclass
class Threshold:
    value: float
    # how it was chosen, e.g. "quantile(0.995) of held-out normal window scores x 1.2"
    method: str
    quantile: float | None = None
    margin: float | None = None


@dataclass
class ModelMeta:
    name: str                      # e.g. "DLinear_ad"
    architecture: str              # e.g. "DLinear"
    window: int                    # input time steps
    channels: list[str]            # names, in model input order
    scaler: Scaler
    threshold: Threshold
    onnx_sha256: str
    opset: int
    input_name: str = "x"          # float32 [batch, window, channels], scaled
    output_name: str = "recon"     # float32 [batch, window, channels], scaled
    dynamic_batch: bool = True
    score: str = SCORE_DEFINITION
    # Architecture settings needed to rebuild the model, e.g. TimesNet's fixed periods.
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    # {"files": [{"path", "sha256", "rows"}], "interval_s", "seed", "epochs", "val_loss", ...}
    training: dict[str, Any] = field(default_factory=dict)
    tool: dict[str, Any] = field(default_factory=dict)   # {"name", "version"}
    exported_at: str = ""
    parameters: int | None = None
    # Per-channel factor on the std a stream calibration fits (agent/calibration.fit_scaler):
    # a few hundred calibration rows understate how far a slowly drifting channel (a fluid
    # temperature) wanders later in normal operation; learned from normal data at export.
    calibration_std_scale: list[float] | None = None
    # Factor on calibration.margin learned at export: how much higher this model's scores
    # run on normal data after calibration than on the calibration rows themselves (a
    # model that reproduces its calibration block closely needs a wider margin than one
    # that does not).  None = 1.
    calibration_margin: float | None = None
    # The model's default detection policy: {"settings": {section: {key: value}}, "fitted":
    # how its numbers were found, "reason": why}.  Sections are those of the agent's
    # detection config (buffer, scoring, calibration, adaptation, alerts); a key the
    # agent's config sets explicitly wins (agent/policy.py).  None: the agent's defaults.
    policy: dict[str, Any] | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def interval_s(self) -> float | None:
        """The training rows' sampling interval (median step, seconds); None where the
        training files had no time column, or the model predates the key."""
        return self.training.get("interval_s")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "metadata") -> "ModelMeta":
        if not isinstance(d, dict):
            raise ModelMetaError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ModelMetaError(f"{where}: 'format' is {d.get('format')!r}, expected {FORMAT!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise ModelMetaError(
                f"{where}: 'format_version' is {d.get('format_version')!r}, "
                f"this runtime reads version {FORMAT_VERSION}")
        required = ["name", "architecture", "window", "channels", "scaler", "threshold",
                    "onnx_sha256", "opset"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ModelMetaError(f"{where}: missing key(s) {', '.join(missing)}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelMetaError(f"{where}: unknown key(s) {', '.join(unknown)}")
        try:
            scaler = Scaler(**d["scaler"])
            threshold = Threshold(**d["threshold"])
        except TypeError as e:
            raise ModelMetaError(f"{where}: bad 'scaler' or 'threshold': {e}") from None
        meta = cls(**{**d, "scaler": scaler, "threshold": threshold})
        meta.validate(where)
        return meta

    def validate(self, where: str = "metadata") -> None:
        if problem := name_problem(self.name):
            raise ModelMetaError(f"{where}: 'name': {problem}")
        if not isinstance(self.window, int) or self.window < 2:
            raise ModelMetaError(f"{where}: 'window' is {self.window!r}, expected an integer >= 2")
        if (not isinstance(self.channels, list) or not self.channels
                or not all(isinstance(c, str) and c for c in self.channels)):
            raise ModelMetaError(f"{where}: 'channels' must be a non-empty list of names")
        if len(set(self.channels)) != len(self.channels):
            raise ModelMetaError(f"{where}: 'channels' has duplicate names")
        if problem := channel_problem(self.channels):
            raise ModelMetaError(f"{where}: 'channels': {problem}")
        # a model fed the labels it is scored on scores perfectly and detects nothing
        labels = [c for c in self.channels if c.strip().lower() in LABEL_COLUMNS]
        if labels:
            raise ModelMetaError(f"{where}: 'channels' holds the label column(s) {labels}, "
                                 "which no sensor sends")
        n = len(self.channels)
        for key in ("mean", "std"):
            v = getattr(self.scaler, key)
            if not isinstance(v, list) or len(v) != n:
                raise ModelMetaError(
                    f"{where}: 'scaler.{key}' has {len(v) if isinstance(v, list) else v!r} "
                    f"values, expected {n} (one per channel)")
            if not all(isinstance(x, (int, float)) and x == x and abs(x) != float("inf") for x in v):
                raise ModelMetaError(f"{where}: 'scaler.{key}' must hold finite numbers")
        if any(s <= 0 for s in self.scaler.std):
            raise ModelMetaError(f"{where}: 'scaler.std' must be > 0 for every channel")
        k = self.calibration_std_scale
        if k is not None:
            if not isinstance(k, list) or len(k) != n:
                raise ModelMetaError(
                    f"{where}: 'calibration_std_scale' has {len(k) if isinstance(k, list) else k!r} "
                    f"values, expected {n} (one per channel)")
            if not all(isinstance(x, (int, float)) and x == x and 0 < x < float("inf") for x in k):
                raise ModelMetaError(f"{where}: 'calibration_std_scale' must hold finite numbers > 0")
        cm = self.calibration_margin
        if cm is not None and (not isinstance(cm, (int, float)) or not (0 < cm < float("inf"))):
            raise ModelMetaError(f"{where}: 'calibration_margin' is {cm!r}, expected a finite number > 0")
        p = self.policy
        if p is not None:
            sections = ("buffer", "scoring", "calibration", "adaptation", "alerts")
            settings = p.get("settings") if isinstance(p, dict) else None
            if not isinstance(settings, dict) or not all(
                    k in sections and isinstance(v, dict) for k, v in settings.items()):
                raise ModelMetaError(f"{where}: 'policy.settings' must map sections of "
                                     f"{', '.join(sections)} to key/value objects")
        for key in ("hyperparameters", "training", "tool"):
            if not isinstance(getattr(self, key), dict):
                raise ModelMetaError(f"{where}: {key!r} must be an object, got "
                                     f"{json.dumps(getattr(self, key))[:40]}")
        iv = self.training.get("interval_s")
        if iv is not None and (type(iv) not in (int, float) or not 0 < iv < float("inf")):
            raise ModelMetaError(f"{where}: 'training.interval_s' is {iv!r}, expected null or "
                                 "the training rows' sampling interval (a number of seconds > 0)")
        rows = self.training.get("calibration_rows")
        if rows is not None and (type(rows) is not int or rows < 1):
            raise ModelMetaError(f"{where}: 'training.calibration_rows' is {rows!r}, expected "
                                 "null or the rows each block was scaled on (an integer >= 1)")
        t = self.threshold.value
        if not isinstance(t, (int, float)) or not (t > 0) or t == float("inf"):
            raise ModelMetaError(f"{where}: 'threshold.value' is {t!r}, expected a finite number > 0")
        if self.score != SCORE_DEFINITION:
            raise ModelMetaError(
                f"{where}: 'score' is {self.score!r}, this runtime implements {SCORE_DEFINITION!r}")
        if not (isinstance(self.onnx_sha256, str) and len(self.onnx_sha256) == 64):
            raise ModelMetaError(f"{where}: 'onnx_sha256' must be a 64-hex-digit sha256")


def load_meta(model_path: str | Path, verify_checksum: bool = True) -> ModelMeta:
    """Read ``<model>.onnx.json`` and, by default, check the ONNX file's sha256 against it."""
    model_path = Path(model_path)
    mp = meta_path_for(model_path)
    if not model_path.is_file():
        raise ModelMetaError(f"model file not found: {model_path}")
    if not mp.is_file():
        raise ModelMetaError(f"metadata not found: {mp} (every model needs its .onnx.json)")
    try:
        d = json.loads(mp.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelMetaError(f"{mp}: not valid JSON: {e}") from None
    meta = ModelMeta.from_dict(d, where=str(mp))
    if verify_checksum:
        actual = sha256_file(model_path)
        if actual != meta.onnx_sha256:
            raise ModelMetaError(
                f"{model_path}: sha256 {actual[:16]}... does not match metadata "
                f"{meta.onnx_sha256[:16]}... (file corrupt or tampered; refusing to load)")
    return meta

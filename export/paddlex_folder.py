"""A PaddleX time-series anomaly-detection inference folder, read and checked.

``inference.yml`` gives window (``size.in_chunk_len``), channel order
(``info_params.feature_cols``) and threshold (``model_threshold``); PaddleTS writes
input shapes as Python tuples (``!!python/tuple``), the only non-standard tag read.
``scaler.pkl`` is unpickled here, once, and stored as plain numbers: the runtime
never unpickles.  Unpickling runs code: import only folders you trust.  Reading the
YAML and the folder layout needs neither Paddle nor joblib.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

MODEL_FILES = ("inference.json", "inference.pdmodel")
PARAMS_FILE = "inference.pdiparams"
CONFIG_FILE = "inference.yml"
SCALER_FILE = "scaler.pkl"
# The dict keys PaddleTS anomaly networks read their series from (the order PaddleX's
# GetAnomaly looks for the series it compares the reconstruction with).
SERIES_INPUTS = ("past_target", "observed_cov_numeric")
TUPLE_TAG = "tag:yaml.org,2002:python/tuple"


class PaddleXImportError(ValueError):
    """The folder cannot be imported; the message names the file and the reason."""


# ------------------------------------------------------------------ inference.yml
class InferenceYamlLoader(yaml.SafeLoader):
    """SafeLoader plus ``!!python/tuple`` (built as a tuple of plain values).

    Every other Python tag (``!!python/object/apply:os.system`` ...) stays unknown to
    this loader and is refused: nothing in the file can make it run code."""


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple:
    if not isinstance(node, yaml.SequenceNode):
        raise yaml.constructor.ConstructorError(
            None, None, f"!!python/tuple must tag a sequence, found a {node.id}", node.start_mark)
    return tuple(loader.construct_sequence(node, deep=True))


InferenceYamlLoader.add_constructor(TUPLE_TAG, _construct_tuple)


def load_inference_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PaddleXImportError(f"{path}: not found (a PaddleX inference folder has {CONFIG_FILE})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PaddleXImportError(f"{path}: cannot read: {e}") from None
    try:
        cfg = yaml.load(text, Loader=InferenceYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as e:
        where = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
        raise PaddleXImportError(
            f"{path}: {where}{e.problem}; only the !!python/tuple tag is accepted "
            "(PaddleX itself reads no other), other Python tags could run code and are refused") from None
    except yaml.YAMLError as e:
        raise PaddleXImportError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise PaddleXImportError(f"{path}: nested too deeply") from None
    if not isinstance(cfg, dict):
        raise PaddleXImportError(f"{path}: expected a mapping at the top, got {type(cfg).__name__}")
    return cfg


# ------------------------------------------------------------------ folder layout
@dataclass
class PaddleXFolder:
    path: Path
    model_file: Path
    params_file: Path
    config_file: Path
    scaler_file: Path | None          # None: the model was trained unscaled
    config: dict
    name: str
    architecture: str
    window: int
    channels: list[str]
    series_input: str                 # the Paddle input the series goes to
    threshold: float
    time_col: str | None
    freq: Any

    def files(self) -> list[Path]:
        return [p for p in (self.model_file, self.params_file, self.config_file, self.scaler_file) if p]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_folder(folder: str | Path) -> PaddleXFolder:
    """Check the folder's files and ``inference.yml``; unpickles nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PaddleXImportError(f"{folder}: not a directory (expected a PaddleX *_infer folder)")
    model_file = next((folder / m for m in MODEL_FILES if (folder / m).is_file()), None)
    if model_file is None:
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise PaddleXImportError(
            f"{folder}: no Paddle program ({' or '.join(MODEL_FILES)}); the folder holds {present}")
    params_file = folder / PARAMS_FILE
    if not params_file.is_file():
        raise PaddleXImportError(f"{folder}: {PARAMS_FILE} missing (the model's weights)")
    config_file = folder / CONFIG_FILE
    cfg = load_inference_yaml(config_file)
    window, cols, threshold, series = _model_settings(cfg, str(config_file))
    scaler_file = None
    if cfg.get("scale"):
        scaler_file = folder / SCALER_FILE
        if not scaler_file.is_file():
            raise PaddleXImportError(f"{folder}: {SCALER_FILE} missing but {CONFIG_FILE} says scale: true")

    glob = cfg.get("Global") if isinstance(cfg.get("Global"), dict) else {}
    name = glob.get("model_name") or cfg.get("pdx_model_name") or folder.name.removesuffix("_infer")
    classes = cfg.get("ancestor_classname_set")
    architecture = classes[0] if isinstance(classes, list) and classes and isinstance(classes[0], str) else name
    info = cfg.get("info_params")
    return PaddleXFolder(
        path=folder, model_file=model_file, params_file=params_file, config_file=config_file,
        scaler_file=scaler_file, config=cfg, name=str(name), architecture=str(architecture),
        window=window, channels=list(cols), series_input=series, threshold=float(threshold),
        time_col=info.get("time_col"), freq=info.get("freq"))


def _model_settings(cfg: dict, where: str) -> tuple[int, list[str], float, str]:
    """(window, channels, threshold, series input) from inference.yml, checked."""
    model_type = cfg.get("model_type")
    if model_type is not None and model_type != "anomaly":
        raise PaddleXImportError(f"{where}: model_type is {model_type!r}, expected 'anomaly' "
                                 "(only time-series anomaly-detection models can be imported)")
    if cfg.get("time_feat"):
        raise PaddleXImportError(f"{where}: time_feat is on: the model takes calendar features "
                                 "as extra inputs, which the runtime does not compute")

    size = cfg.get("size")
    window = size.get("in_chunk_len") if isinstance(size, dict) else None
    if not isinstance(window, int) or isinstance(window, bool) or window < 2:
        raise PaddleXImportError(f"{where}: size.in_chunk_len is {window!r}, expected an integer >= 2")

    info = cfg.get("info_params")
    if not isinstance(info, dict):
        raise PaddleXImportError(f"{where}: info_params missing or not a mapping")
    if info.get("target_cols"):
        raise PaddleXImportError(f"{where}: info_params.target_cols is set: a forecasting or "
                                 "classification model, not anomaly detection")
    cols = info.get("feature_cols")
    if isinstance(cols, str):
        cols = [c.strip() for c in cols.split(",")]
    if (not isinstance(cols, list) or not cols
            or not all(isinstance(c, str) and c for c in cols)):
        raise PaddleXImportError(f"{where}: info_params.feature_cols is {cols!r}, "
                                 "expected a non-empty list of column names")
    if len(set(cols)) != len(cols):
        raise PaddleXImportError(f"{where}: info_params.feature_cols has duplicate names")

    threshold = cfg.get("model_threshold")
    if not _number(threshold) or not math.isfinite(threshold) or threshold <= 0:
        raise PaddleXImportError(f"{where}: model_threshold is {threshold!r}, expected a finite number > 0")

    inputs = cfg.get("input_data")
    if not isinstance(inputs, dict) or not inputs:
        raise PaddleXImportError(f"{where}: input_data missing or empty")
    series = [k for k in inputs if k in SERIES_INPUTS]
    others = sorted(k for k in inputs if k not in SERIES_INPUTS)
    if len(series) != 1 or others:
        raise PaddleXImportError(
            f"{where}: input_data has {sorted(inputs)}; the runtime feeds exactly one series "
            f"input (one of {', '.join(SERIES_INPUTS)}) and no covariates")
    shape = inputs[series[0]]
    if not isinstance(shape, (list, tuple)) or len(shape) != 3:
        raise PaddleXImportError(f"{where}: input_data.{series[0]} is {shape!r}, "
                                 "expected (batch, window, channels)")
    if shape[1] != window or shape[2] != len(cols):
        raise PaddleXImportError(
            f"{where}: input_data.{series[0]} is {tuple(shape)} but size.in_chunk_len is {window} "
            f"and info_params.feature_cols lists {len(cols)} columns")
    return window, cols, threshold, series[0]


# ------------------------------------------------------------------ scaler.pkl
def read_scaler(path: Path, n_channels: int) -> tuple[list[float], list[float], str]:
    """Unpickle a scikit-learn scaler; return (mean, std, kind) with x_scaled = (x - mean) / std."""
    try:
        import joblib
    except ImportError:
        raise PaddleXImportError("reading scaler.pkl needs joblib and scikit-learn "
                                 "(run export/recipes/paddle_env.sh)") from None
    try:
        obj = joblib.load(path)
    except Exception as e:  # unpickling raises anything the pickled objects raise
        raise PaddleXImportError(f"{path}: cannot unpickle: {type(e).__name__}: {e}") from None
    kind = type(obj).__name__
    n_in = getattr(obj, "n_features_in_", None)
    if n_in is not None and n_in != n_channels:
        raise PaddleXImportError(f"{path}: {kind} was fitted on {n_in} columns, "
                                 f"inference.yml lists {n_channels} feature_cols")
    if kind == "StandardScaler":
        mean = np.asarray(obj.mean_ if obj.with_mean else np.zeros(n_channels), dtype=np.float64)
        std = np.asarray(obj.scale_ if obj.with_std else np.ones(n_channels), dtype=np.float64)
    elif kind == "MinMaxScaler":
        # sklearn computes x * scale_ + min_, i.e. (x - (-min_ / scale_)) / (1 / scale_).
        if getattr(obj, "clip", False):
            raise PaddleXImportError(f"{path}: MinMaxScaler(clip=True) cannot be written as mean/std")
        mean = -np.asarray(obj.min_, dtype=np.float64) / np.asarray(obj.scale_, dtype=np.float64)
        std = 1.0 / np.asarray(obj.scale_, dtype=np.float64)
    else:
        raise PaddleXImportError(f"{path}: a {kind}; only StandardScaler and MinMaxScaler "
                                 "can be expressed as the runtime's (x - mean) / std")
    if mean.shape != (n_channels,) or std.shape != (n_channels,):
        raise PaddleXImportError(f"{path}: scaler holds {mean.shape}/{std.shape} values, "
                                 f"expected {n_channels} per channel")
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise PaddleXImportError(f"{path}: scaler has non-finite or non-positive values")
    return mean.tolist(), std.tolist(), kind

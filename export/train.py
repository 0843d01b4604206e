"""`tsad-export train`: from normal CSV files to a shipped model (ONNX + metadata).

Three ways to put the data into the model's scaled space, by how the model will run:
- global z-score (no --scale-rows): one scaler for every stream, the metadata's;
- per-block (--scale-rows N): each N-row block z-scored on its own statistics, as the
  runtime's per-stream calibration does;
- calibrate-then-run (--scale-rows N --drift-rows H): as per-block, and the H rows after
  each block are scaled by that block, so the model learns normal drift after
  calibration; the drift per channel and the rise of normal scores go into the metadata.
"""
from __future__ import annotations

import inspect
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.contract import DEFAULT_STD_FLOOR, MIN_LEARN, score_windows
from agent.model_meta import name_problem
from export import data as D
from export.data import DEFAULT_NOISE
from export import drift
from export import fit as F
from export import package as P
from export.onnx_export import count_parameters, opset_problem

PARITY_WINDOWS = 64
# A model whose held-out error (or threshold) is below this fraction of the data's own
# variance in the scaled space reproduces its input, anomalies included: an identity map
# scores every window ~0, so its threshold sits at numerical noise and any later window
# scores either over it (noise) or not at all.  Real reconstructions of noisy sensor data
# stay far above it (SKAB, TEP: 0.05-0.5 of the variance); the identity sits at 1e-5-1e-12.
DEGENERATE_REL = 1e-3
# Predicting each window's mean scores ~1 x the data variance, and reconstructions of
# scaled normal data stay within tens of units; a model this far beyond either has blown
# up (too high --lr).  Outputs of ~1e3 also break the float32 ONNX parity check (1e-4)
# on rounding alone, which must not be reported as an export fault.
DIVERGED_REL = 1e3
DIVERGED_OUTPUT = 1e3
# numpy's seeds are unsigned 32-bit; outside them seeding fails after the data is loaded.
MAX_SEED = 2**32 - 1
# Window scores are squared float32 differences (< 5e77): up to this margin the threshold
# stays finite, and a threshold a million times the normal quantile never fires anyway.
MAX_MARGIN = 1e6


class TrainError(ValueError):
    """Options that cannot train a model; the message says which and why."""


@dataclass
class TrainOptions:
    model: str
    data: list[str]
    out: str
    data_root: str | None = None
    columns: list[str] | None = None
    rows_per_file: int | None = None
    window: int = 96
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    patience: int = 5
    val_frac: float = 0.2
    seed: int = 0
    quantile: float = 0.99
    margin: float = 1.0
    noise: float = DEFAULT_NOISE
    level_noise: float = 0.0
    scale_rows: int = 0
    block_std_floor: float = DEFAULT_STD_FLOOR
    drift_rows: int = 0
    drift_quantile: float = 0.5
    train_stride: int = 1
    hparams: dict = field(default_factory=dict)
    threads: int = 1
    opset: int = 17
    save_checkpoint: str | None = None
    check_degenerate: bool = True
    name: str | None = None        # the metadata's model name; None: the architecture's

    def check(self) -> None:
        self._check_ranges()
        if self.name is not None and (problem := name_problem(self.name)):
            raise TrainError(f"--name: {problem}")
        if self.columns:
            D.check_column_names(self.columns)
        if self.columns and len(set(self.columns)) < len(self.columns):
            dup = sorted({c for c in self.columns if self.columns.count(c) > 1})
            raise TrainError(f"--columns: {', '.join(map(repr, dup))} given more than once; "
                             "each channel is one model input")
        if not 0 < self.val_frac < 1:
            raise TrainError(f"--val-frac {self.val_frac}: expected a fraction between 0 and 1")
        if not 0 < self.quantile <= 1 or not 0 < self.margin < math.inf:
            raise TrainError("--quantile must be in (0, 1] and --margin > 0")
        if self.margin > MAX_MARGIN:
            raise TrainError(f"--margin {self.margin:g}: expected at most {MAX_MARGIN:g}")
        if self.train_stride < 1:
            raise TrainError(f"--train-stride {self.train_stride}: expected at least 1")
        if self.window < 2:
            raise TrainError(f"--window {self.window}: expected at least 2")
        if self.drift_rows < 0 or (self.drift_rows and not self.scale_rows):
            raise TrainError(f"--drift-rows {self.drift_rows}: expected >= 0, and only with "
                             f"--scale-rows")
        if not 0 < self.drift_quantile < 1:
            raise TrainError(f"--drift-quantile {self.drift_quantile}: expected a fraction "
                             f"between 0 and 1")

    def _check_ranges(self) -> None:
        # (flag, value, lowest allowed, inclusive, allowed range in words); NaN fails every test
        limits = [("--epochs", self.epochs, 1, True, "an integer >= 1"),
                  ("--batch-size", self.batch_size, 1, True, "an integer >= 1"),
                  ("--threads", self.threads, 1, True, "an integer >= 1"),
                  ("--patience", self.patience, 0, True, "an integer >= 0"),
                  ("--lr", self.lr, 0, False, "a finite number > 0"),
                  ("--noise", self.noise, 0, True, "a finite number >= 0"),
                  ("--level-noise", self.level_noise, 0, True, "a finite number >= 0"),
                  ("--block-std-floor", self.block_std_floor, 0, True, "a finite number >= 0")]
        if self.rows_per_file is not None:
            limits.append(("--rows-per-file", self.rows_per_file, 1, True, "an integer >= 1"))
        for flag, value, low, inclusive, words in limits:
            ok = math.isfinite(value) and (value >= low if inclusive else value > low)
            if not ok:
                raise TrainError(f"{flag} {value}: expected {words}")
        # --scale-rows becomes the model's learning period (training.calibration_rows)
        if self.scale_rows < 0 or 0 < self.scale_rows < MIN_LEARN:
            raise TrainError(f"--scale-rows {self.scale_rows}: expected 0 (off) or an integer "
                             f">= {MIN_LEARN} (the runtime's shortest learning period)")
        if not 0 <= self.seed <= MAX_SEED:
            raise TrainError(f"--seed {self.seed}: expected an integer 0..{MAX_SEED}")
        if problem := opset_problem(self.opset):
            raise TrainError(problem)


class OptionError(TrainError):
    """A bad --hparam, found only once the data gives the channel count: a usage error."""


# Set by --window and the data, never by --hparam.
_SHAPE_ARGS = ("window", "n_channels")


def accepted_hparams(name: str) -> list[str]:
    from export.models import REGISTRY
    params = inspect.signature(REGISTRY[name].__init__).parameters
    return [p for p in params if p != "self" and p not in _SHAPE_ARGS]


def check_hparam_keys(name: str, hparams: dict) -> None:
    """OptionError naming an unknown hyperparameter and the ones `name` accepts."""
    known = accepted_hparams(name)
    unknown = [k for k in hparams if k not in known and k not in _SHAPE_ARGS]
    if unknown:
        raise OptionError(f"--hparam {unknown[0]}: {name} has no such hyperparameter; "
                          f"it accepts {', '.join(known) or 'none'}")


def build(name: str, window: int, n_channels: int, hparams: dict):
    """The architecture `name` with `hparams`; OptionError for a bad setting."""
    from export.models import build_model
    check_hparam_keys(name, hparams)
    kwargs = {k: v for k, v in hparams.items() if k not in _SHAPE_ARGS}
    try:
        return build_model(name, window, n_channels, **kwargs)
    # torch's layers raise RuntimeError on a negative size, the models ValueError on the rest.
    except (TypeError, ValueError, RuntimeError, ArithmeticError) as e:
        given = " ".join(f"{k}={json.dumps(v)}" for k, v in kwargs.items())
        raise OptionError(f"--hparam {given}: {e} ({name} accepts "
                          f"{', '.join(accepted_hparams(name))})") from None


@dataclass
class _Space:
    """The training data in the model's scaled space, and how it got there."""
    global_scaler: tuple[np.ndarray, np.ndarray]     # plain mean/std of all training rows
    mean: np.ndarray
    std: np.ndarray
    scaled: list[np.ndarray]
    split: D.Split
    std_scale: np.ndarray | None
    description: str


def _scaled_space(o: TrainOptions, files: list[D.DataFile]) -> _Space:
    arrays = [f.values for f in files]
    paths = [f.path for f in files]
    g_mean, g_std = D.fit_scaler(arrays)
    if not o.scale_rows:
        scaled = [D.scale(v, g_mean, g_std) for v in arrays]
        return _Space((g_mean, g_std), g_mean, g_std, scaled,
                      D.chronological_split(scaled, paths, o.window, o.val_frac, o.train_stride),
                      None, "global z-score: the metadata scaler (mean/std of all training rows)")
    # The model's unit is normal within-block variability; the runtime floors a
    # calibrated std at std_floor x scaler.std, so scaler.std must be that unit, not a
    # std inflated by the gaps between operating points.
    m_std = D.pooled_block_std(arrays, o.scale_rows)
    if not o.drift_rows:
        scaled = [D.scale_per_block(v, o.scale_rows, o.block_std_floor * m_std) for v in arrays]
        return _Space(
            (g_mean, g_std), g_mean, m_std, scaled,
            D.chronological_split(scaled, paths, o.window, o.val_frac, o.train_stride), None,
            f"per-block z-score: each file cut into blocks of {o.scale_rows} rows, each block "
            f"scaled with its own mean and max(own std, {o.block_std_floor} x scaler.std), as "
            f"the runtime's per-stream calibration does with calibration.std_floor = "
            f"{o.block_std_floor}. scaler.mean is the global mean, scaler.std the pooled "
            "within-block std (the model's unit); use with per-stream calibration. "
            "global_scaler is the plain mean/std of all training rows")
    # Calibration rows understate later normal drift: learn by how much per channel,
    # widen the unit by it (metadata tells the runtime) and train on calibration blocks
    # followed by the rows after them, as a calibrated stream runs.
    k = drift.drift_std_scale(arrays, o.scale_rows, o.drift_rows, o.block_std_floor * m_std,
                              o.drift_quantile)
    m_std = m_std * k
    floor = o.block_std_floor * m_std
    split = drift.runtime_split(arrays, paths, o.window, o.val_frac, o.scale_rows, o.drift_rows,
                                k, floor, o.train_stride)
    scaled = [s for v in arrays for s in drift.calibration_segments(v, o.scale_rows, 0, k, floor)]
    return _Space(
        (g_mean, g_std), g_mean, m_std, scaled, split, k,
        f"calibrate-then-run: each {o.scale_rows}-row block scales itself and the "
        f"{o.drift_rows} rows after it with its mean and max(own std x calibration_std_scale, "
        f"{o.block_std_floor} x scaler.std), as the runtime's per-stream calibration does with "
        f"calibration.std_floor = {o.block_std_floor}. calibration_std_scale: per channel, "
        f"quantile {o.drift_quantile} over blocks of the RMS deviation of the next "
        f"{o.drift_rows} rows from the block mean / block std (>= 1). scaler.std is the pooled "
        "within-block std x calibration_std_scale (the model's unit). Validation: each file's "
        "last rows scaled by the block before them. global_scaler is the plain mean/std of "
        "all training rows")


def _variance(val: np.ndarray) -> float:
    return float(np.mean(np.var(val[:, -1, :].astype(np.float64), axis=0))) if len(val) else 0.0


def check_not_diverged(name: str, val: np.ndarray, recon: np.ndarray, val_loss: float) -> None:
    """TrainError when training blew up (DIVERGED_REL, DIVERGED_OUTPUT)."""
    var = _variance(val)
    biggest = float(np.max(np.abs(recon))) if recon.size else 0.0
    if not np.isfinite(val_loss) or not np.isfinite(biggest):
        raise TrainError(f"{name}: validation error is {val_loss}: training diverged; "
                         "lower --lr or check the data")
    if val_loss > DIVERGED_REL * max(var, 1.0) or biggest > DIVERGED_OUTPUT:
        raise TrainError(f"{name}: training diverged: validation error {val_loss:.3g}, "
                         f"outputs up to {biggest:.3g} in scaled units where the data variance "
                         f"is {var:.3g}; lower --lr or check the data")


def check_not_degenerate(name: str, val: np.ndarray, val_loss: float, threshold: float) -> None:
    """TrainError when the model reproduces its validation windows (DEGENERATE_REL)."""
    var = _variance(val)
    if not np.isfinite(val_loss):
        raise TrainError(f"{name}: validation error is {val_loss}: training diverged; "
                         "lower --lr or check the data")
    if var <= 0:
        raise TrainError(f"{name}: the validation rows do not vary in any channel: "
                         "nothing to learn normal behaviour from")
    if min(val_loss, threshold) < DEGENERATE_REL * var:
        raise TrainError(
            f"{name}: degenerate model: it reproduces its input (validation error {val_loss:.2g}, "
            f"threshold {threshold:.2g}, data variance {var:.2g} in scaled units; refused below "
            f"{DEGENERATE_REL:g} x variance), so it would copy anomalies through and score "
            f"every window ~0. Train with input noise (--noise {DEFAULT_NOISE:g}, the default) or a smaller model")


def _training_record(o: TrainOptions, files, space: _Space, result: F.TrainResult,
                     root: Path) -> dict:
    g_mean, g_std = space.global_scaler
    return {
        "model": o.model,
        "data_root": root.name,
        "files": [f.describe(root) for f in files],
        "interval_s": D.interval_s(files),
        "validation": {"method": f"chronological: last {o.val_frac} of the rows of each file "
                                 "long enough to hold a full window on both sides of the cut",
                       "files": [D.relative_path(p, root) for p in space.split.held_out_files],
                       "windows": int(len(space.split.val))},
        "train_windows": int(len(space.split.train)), "train_stride": o.train_stride,
        "scaling": space.description,
        "global_scaler": {"mean": g_mean.tolist(), "std": g_std.tolist()},
        "std_floor": {"abs": D.STD_FLOOR_ABS, "rel_to_mean": D.STD_FLOOR_REL},
        "calibration_std_floor": o.block_std_floor if o.scale_rows else None,
        "calibration_rows": o.scale_rows or None,
        "drift_rows": o.drift_rows or None,
        "drift_quantile": o.drift_quantile if o.drift_rows else None,
        "seed": o.seed, "epochs": result.epochs_run, "best_epoch": result.best_epoch,
        "max_epochs": o.epochs, "patience": o.patience, "batch_size": o.batch_size,
        "lr": o.lr, "noise": o.noise, "level_noise": o.level_noise,
        "val_loss": result.best_val_loss,
        "train_seconds": round(result.seconds, 1), "threads": o.threads,
    }


def _warn_constant(files: list[D.DataFile], channels: list[str]) -> None:
    # A warning, not a refusal: a channel that never moves in normal operation (a setpoint,
    # a unit switched off; TEP has such valves) may be one whose every move is a fault, and
    # the floored std (export/data.py) exists to train on it.
    flat = D.constant_channels(files, channels)
    if flat:
        D.warn(f"channel(s) {', '.join(map(repr, flat))} never change in the training data: "
               "their std is floored, so any later change scores enormously. Leave them out "
               "with --columns unless every change of them is a fault")


def _warn_long_blocks(files: list[D.DataFile], scale_rows: int) -> None:
    # The model then learns no within-file block structure, and a stream scores nothing
    # until scale_rows samples have passed: likely a typo, yet a long stream may want it.
    longest = max(f.rows for f in files)
    if scale_rows > longest:
        D.warn(f"--scale-rows {scale_rows} is longer than every training file (longest has "
               f"{longest} rows): each file is one block, and the runtime learns for "
               f"{scale_rows} samples before it scores any")


def train(o: TrainOptions) -> dict:
    """Train, calibrate, export and parity-check one model; returns a summary.

    Nothing is written unless every step succeeded."""
    from export.models import ARCHITECTURE
    o.check()
    out = Path(o.out)
    D.check_writable(out)
    ckpt_path = Path(o.save_checkpoint) if o.save_checkpoint else None
    if ckpt_path is not None:
        D.check_writable(ckpt_path, suffix=".pt")
    files, channels = D.load_files(o.data, o.columns, o.rows_per_file, normal_only=True)
    root = D.data_root([f.path for f in files], o.data_root)
    D.check_lengths(files, o.window)
    _warn_constant(files, channels)
    if o.scale_rows:
        _warn_long_blocks(files, o.scale_rows)
    cfg = F.TrainConfig(window=o.window, epochs=o.epochs, batch_size=o.batch_size, lr=o.lr,
                        patience=o.patience, val_frac=o.val_frac, seed=o.seed,
                        quantile=o.quantile, margin=o.margin, noise=o.noise,
                        level_noise=o.level_noise, threads=o.threads)
    F.seed_everything(cfg.seed, cfg.threads)
    space = _scaled_space(o, files)
    split = space.split

    model = build(o.model, o.window, len(channels), o.hparams)
    try:
        model.prepare(np.concatenate(space.scaled).astype(np.float32))
    except ValueError as e:
        raise TrainError(f"{o.model}: {e}") from None
    print(f"{o.model}: {len(channels)} channels, window {o.window}, "
          f"{len(split.train)} train / {len(split.val)} validation windows", file=sys.stderr)
    result = F.fit(model, split.train, split.val, cfg, desc=o.model)
    recon = F.reconstruct(model, split.val)
    check_not_diverged(o.model, split.val, recon, result.best_val_loss)

    cal_margin = None
    if space.std_scale is not None:
        cal_margin = drift.calibration_margin(
            model, [f.values for f in files], o.window, o.scale_rows, o.drift_rows,
            space.std_scale, o.block_std_floor * space.std, o.quantile)
    scores = score_windows(split.val, recon)[0]
    threshold = F.calibrate(scores, o.quantile, o.margin)
    if o.check_degenerate:
        check_not_degenerate(o.model, split.val, result.best_val_loss, threshold.value)
    meta = P.build_meta(o.name or o.model, ARCHITECTURE[o.model], o.window, channels,
                        P.Scaler(mean=space.mean.tolist(), std=space.std.tolist()), threshold,
                        model.hparams(), _training_record(o, files, space, result, root),
                        int(count_parameters(model)),
                        None if space.std_scale is None else space.std_scale.tolist(),
                        cal_margin)
    idx = np.linspace(0, len(split.val) - 1, min(PARITY_WINDOWS, len(split.val))).astype(int)
    parity = split.val[idx]
    meta = P.write_model(model, meta, out, parity, opset=o.opset)
    if ckpt_path is not None:
        P.save_checkpoint(P.make_checkpoint(model, meta, parity), ckpt_path)
    return {"model": str(out), "val_loss": result.best_val_loss,
            "threshold": threshold.value, "epochs": result.epochs_run,
            "train_seconds": round(result.seconds, 1), "parameters": meta.parameters,
            "onnx_bytes": out.stat().st_size, "onnx_sha256": meta.onnx_sha256}

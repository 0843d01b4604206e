"""Replicas of the runtime's per-stream calibration on training data.

A stream calibrates on its first rows and then runs for hours: these functions cut
normal training files the same way (a block, then the rows after it), scale them as
the runtime would (`agent.contract.fit_scaler`), and measure how far normal data
drifts beyond a block (`calibration_std_scale`) and how far normal scores rise after
it (`calibration_margin`).  Both go into the model's metadata.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from agent.contract import fit_scaler, score_windows
from export.data import DataError, Split, windows
from export.fit import reconstruct


def _block_stats(block: np.ndarray, std_scale: np.ndarray, min_std: np.ndarray):
    """(mean, std) of the runtime's scaler (contract.fit_scaler) fitted on one block;
    `min_std` is std_floor x the model's std, given as one vector."""
    sc = fit_scaler(block, min_std, 1.0, std_scale)
    return sc.mean, sc.std


def _drift_ratio(block: np.ndarray, future: np.ndarray, min_std: np.ndarray) -> np.ndarray:
    mean, std = _block_stats(block, np.ones(block.shape[1]), min_std)
    return np.sqrt(((future - mean) ** 2).mean(axis=0)) / std


def drift_std_scale(arrays: list[np.ndarray], block_rows: int, horizon: int,
                    min_std: np.ndarray, quantile: float = 0.5) -> np.ndarray:
    """Per-channel factor by which normal data drifts beyond a calibration block.

    Drift ratio of a block and the rows after it: RMS deviation of those rows from the
    block's mean over the block's (floored) std.  Long files give blocks of
    ``block_rows`` followed by ``horizon`` rows (stride a quarter block); files of one
    block (calibration rows of other recordings) give their first half against their
    second.  Per channel, the larger of the two ``quantile``s (0.5: the medians), never
    below 1: the std must cover the drift seen at either horizon (a fluid temperature
    wandering over an hour, a motor still warming up in the first minutes).  A quantile
    above the median makes the std cover the drift of most blocks, not just a typical
    one: a channel whose drift is heavy-tailed is trusted less.  Scale-free, so it
    carries over to streams with other offsets and noise levels.
    """
    long, short = [], []
    for values in arrays:
        if len(values) >= block_rows + horizon:
            for s in range(0, len(values) - block_rows - horizon + 1, max(1, block_rows // 4)):
                long.append(_drift_ratio(values[s:s + block_rows],
                                         values[s + block_rows:s + block_rows + horizon], min_std))
        elif len(values) >= 4:
            half = min(len(values), block_rows) // 2
            short.append(_drift_ratio(values[:half], values[half:2 * half], min_std))
    out = np.ones(arrays[0].shape[1])
    for ratios in (long, short):
        if ratios:
            out = np.maximum(out, np.quantile(np.asarray(ratios), quantile, axis=0))
    return out


def calibration_segments(values: np.ndarray, block_rows: int, horizon: int, std_scale: np.ndarray,
              min_std: np.ndarray) -> list[np.ndarray]:
    """Each block scales itself and the ``horizon`` rows after it, as a stream calibrated
    on that block would see them; a part shorter than a block calibrates on all of itself."""
    starts = range(0, max(1, len(values) - block_rows + 1), block_rows)
    out = []
    for s in starts:
        mean, std = _block_stats(values[s:s + block_rows], std_scale, min_std)
        out.append((values[s:s + block_rows + horizon] - mean) / std)
    return out


def runtime_split(arrays: list[np.ndarray], paths: list[Path], window: int, val_frac: float,
                  block_rows: int, horizon: int, std_scale: np.ndarray, min_std: np.ndarray,
                  train_stride: int = 1):
    """Train/validation windows in the space the runtime feeds after calibrating a stream.

    Each file is cut chronologically first (last ``val_frac`` of its rows held out), so
    no row is in both sets.  Training: every calibration block with the rows that follow
    it, scaled by that block's statistics, so the model learns normal drift after
    calibration.  Validation: the held-out rows scaled by the statistics of the last
    block before the cut (calibrate, then run).
    """
    train, val, held = [], [], []
    for values, p in zip(arrays, paths):
        n_val = int(round(len(values) * val_frac))
        cut = len(values) - n_val
        if n_val < window or cut < window:
            cut, n_val = len(values), 0
        for seg in calibration_segments(values[:cut], block_rows, horizon, std_scale, min_std):
            train.append(windows(seg, window)[::train_stride])
        if n_val:
            mean, std = _block_stats(values[max(0, cut - block_rows):cut], std_scale, min_std)
            val.append(windows((values[cut:] - mean) / std, window))
            held.append(str(p))
    if not val:
        raise DataError(f"no file is long enough for a held-out validation split with window "
                        f"{window} and --val-frac {val_frac}")
    tr = np.concatenate(train).astype(np.float32)
    if len(tr) == 0:
        raise DataError(f"no training windows: every file is shorter than the window ({window})")
    return Split(train=tr, val=np.concatenate(val).astype(np.float32), held_out_files=held)


def calibration_margin(model: torch.nn.Module, arrays: list[np.ndarray], window: int,
                       block_rows: int, horizon: int, std_scale: np.ndarray, min_std: np.ndarray,
                       quantile: float) -> float | None:
    """How far normal scores rise once a calibrated stream runs on (ModelMeta.calibration_margin).

    Replays the runtime on normal data: every block of ``block_rows`` rows followed by at
    least ``horizon`` rows is a calibration, scaled as the runtime scales it; the ratio is
    quantile(scores of windows ending after the block) / quantile(scores of windows inside
    it).  The median over blocks, never below 1; None when no file is long enough.
    """
    ratios = []
    for values in arrays:
        for s in range(0, len(values) - block_rows - horizon + 1, block_rows):
            mean, std = _block_stats(values[s:s + block_rows], std_scale, min_std)
            seg = ((values[s:s + block_rows + horizon] - mean) / std).astype(np.float32)
            w = np.ascontiguousarray(windows(seg, window))
            scores = score_windows(w, reconstruct(model, w))[0]
            n_cal = block_rows - window + 1
            cal = float(np.quantile(scores[:n_cal], quantile))
            if cal > 0:
                ratios.append(float(np.quantile(scores[n_cal:], quantile)) / cal)
    return max(float(np.median(ratios)), 1.0) if ratios else None

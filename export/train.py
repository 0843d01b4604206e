"""Fit a reconstruction model, calibrate its threshold, package it as ONNX + metadata.

Everything is seeded (torch, numpy, batch order, noise) so one seed gives one
ONNX file, byte for byte.  The threshold is calibrated on held-out NORMAL
windows only, using the runtime's score (agent.model_meta.SCORE_DEFINITION).
"""
from __future__ import annotations

import copy
import datetime as dt
import os
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from agent.model_meta import ModelMeta, Scaler, Threshold, meta_path_for, sha256_file
from export.data import check_writable
from export.publish import publish

TOOL_NAME = "tsad-export"
CHECKPOINT_FORMAT = "tsad-checkpoint"
PARITY_WINDOWS = 64


def tool_info() -> dict:
    try:
        version = importlib_metadata.version("tsad-agent")
    except importlib_metadata.PackageNotFoundError:
        version = "unknown"
    return {"name": TOOL_NAME, "version": version, "torch": torch.__version__}


@dataclass
class TrainConfig:
    window: int = 96
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    patience: int = 5
    val_frac: float = 0.2
    seed: int = 0
    quantile: float = 0.99
    margin: float = 1.0
    noise: float = 0.0          # std of Gaussian input noise (scaled units): denoising objective
    level_noise: float = 0.0    # std of a per-window, per-channel input offset (scaled units)
    threads: int = 1


@dataclass
class TrainResult:
    best_val_loss: float
    best_epoch: int
    epochs_run: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def _block_stats(block: np.ndarray, std_scale: np.ndarray, min_std: np.ndarray):
    """The runtime's calibration (agent/calibration.fit_scaler) applied to one block."""
    return block.mean(axis=0), np.maximum(block.std(axis=0) * std_scale, min_std)


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
    from export.data import DataError, Split, windows
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
    from export.data import windows
    ratios = []
    for values in arrays:
        for s in range(0, len(values) - block_rows - horizon + 1, block_rows):
            mean, std = _block_stats(values[s:s + block_rows], std_scale, min_std)
            seg = ((values[s:s + block_rows + horizon] - mean) / std).astype(np.float32)
            w = np.ascontiguousarray(windows(seg, window))
            scores = window_scores(w, reconstruct(model, w))
            n_cal = block_rows - window + 1
            cal = float(np.quantile(scores[:n_cal], quantile))
            if cal > 0:
                ratios.append(float(np.quantile(scores[n_cal:], quantile)) / cal)
    return max(float(np.median(ratios)), 1.0) if ratios else None


def seed_everything(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


@torch.no_grad()
def reconstruct(model: torch.nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    model.eval()
    out = [model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))).numpy()
           for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.empty_like(x)


def window_scores(x: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """SCORE_DEFINITION: mean over channels of the squared error at the newest step, float64."""
    err = (recon[:, -1, :].astype(np.float64) - x[:, -1, :].astype(np.float64)) ** 2
    return err.mean(axis=1)


def calibrate(scores: np.ndarray, quantile: float, margin: float) -> Threshold:
    value = float(np.quantile(scores, quantile)) * margin
    return Threshold(
        value=value,
        method=f"quantile({quantile}) of {len(scores)} held-out normal window scores x {margin}",
        quantile=quantile, margin=margin)


def _mse(model: torch.nn.Module, x: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            total += float(torch.mean((model(xb) - xb) ** 2)) * len(xb)
    return total / len(x)


def fit(model: torch.nn.Module, train: np.ndarray, val: np.ndarray, cfg: TrainConfig,
        desc: str = "train") -> TrainResult:
    """Adam on window MSE with early stopping on validation MSE; restores the best epoch."""
    gen = torch.Generator().manual_seed(cfg.seed)
    xt, xv = torch.from_numpy(train), torch.from_numpy(val)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    best, best_epoch, best_state, stale = float("inf"), 0, copy.deepcopy(model.state_dict()), 0
    history: list[dict] = []
    start = time.monotonic()
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        running = 0.0
        for i in range(0, len(xt), cfg.batch_size):
            xb = xt[perm[i:i + cfg.batch_size]]
            inp = xb
            if cfg.noise > 0:
                inp = inp + cfg.noise * torch.randn(xb.shape, generator=gen)
            if cfg.level_noise > 0:
                # A random offset the model must undo teaches it where normal levels lie, so a
                # sustained shift is reconstructed back towards them (and scores high) instead
                # of being copied through.
                inp = inp + cfg.level_noise * torch.randn((len(xb), 1, xb.shape[2]), generator=gen)
            loss = torch.mean((model(inp) - xb) ** 2)
            opt.zero_grad()
            loss.backward()
            # Outlier batches from other operating points must not wreck a converged model.
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            running += loss.detach().item() * len(xb)
        val_loss = _mse(model, xv)
        history.append({"epoch": epoch, "train_loss": running / len(xt), "val_loss": val_loss})
        bar.set_postfix(train=f"{running / len(xt):.4f}", val=f"{val_loss:.4f}")
        if val_loss < best:
            best, best_epoch, best_state, stale = val_loss, epoch, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    bar.close()
    model.load_state_dict(best_state)
    return TrainResult(best_val_loss=best, best_epoch=best_epoch, epochs_run=len(history),
                       seconds=time.monotonic() - start, history=history)


def build_meta(name: str, architecture: str, window: int, channels: list[str], scaler: Scaler,
               threshold: Threshold, hyperparameters: dict, training: dict,
               parameters: int, calibration_std_scale: list[float] | None = None,
               calibration_margin: float | None = None) -> ModelMeta:
    """Metadata minus what only the exported file knows (sha256, opset)."""
    return ModelMeta(
        name=name, architecture=architecture, window=window, channels=list(channels),
        scaler=scaler, threshold=threshold, onnx_sha256="0" * 64, opset=0,
        hyperparameters=hyperparameters, training=training, tool=tool_info(),
        exported_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        parameters=parameters, calibration_std_scale=calibration_std_scale,
        calibration_margin=calibration_margin)


def write_model(model: torch.nn.Module, meta: ModelMeta, out: Path, parity_windows: np.ndarray,
                opset: int = 17) -> ModelMeta:
    """Export, parity-check and write ``out`` + ``out.json`` atomically: all or nothing."""
    from export.onnx_export import export_onnx, parity_check
    check_writable(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.onnx")
    tmp_meta = meta_path_for(tmp)
    leftovers = [tmp, tmp_meta, Path(str(tmp) + ".data")]
    try:
        model.eval()
        meta.opset = int(export_onnx(model, tmp, meta.window, meta.n_channels, opset=opset))
        diff = parity_check(model, tmp, parity_windows)
        meta.training["parity_max_abs_diff"] = float(diff)
        meta.onnx_sha256 = sha256_file(tmp)
        publish(meta, tmp, tmp_meta, out)
    finally:
        for p in leftovers:
            p.unlink(missing_ok=True)
    return meta


def make_checkpoint(model: torch.nn.Module, meta: ModelMeta, parity_windows: np.ndarray) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "name": meta.name,
        "architecture": meta.architecture,
        "window": meta.window,
        "channels": list(meta.channels),
        "hparams": dict(meta.hyperparameters),
        "state_dict": model.state_dict(),
        "scaler": asdict(meta.scaler),
        "threshold": asdict(meta.threshold),
        "training": dict(meta.training),
        "parameters": meta.parameters,
        "calibration_std_scale": meta.calibration_std_scale,
        "calibration_margin": meta.calibration_margin,
        "parity_windows": torch.from_numpy(np.ascontiguousarray(parity_windows)),
    }


def save_checkpoint(ckpt: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

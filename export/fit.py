"""The training loop: Adam on window MSE, early stopping, a seeded run.

Everything is seeded (torch, numpy, batch order, noise) so one seed gives one
ONNX file, byte for byte.  The threshold is calibrated on held-out NORMAL
windows only, with the runtime's score and threshold rule (agent.contract).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from agent.contract import fit_threshold
from agent.model_meta import Threshold
from export.data import DEFAULT_NOISE

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
    noise: float = DEFAULT_NOISE  # std of Gaussian input noise (scaled units): denoising objective
    level_noise: float = 0.0    # std of a per-window, per-channel input offset (scaled units)
    threads: int = 1


@dataclass
class TrainResult:
    best_val_loss: float
    best_epoch: int
    epochs_run: int
    seconds: float
    history: list[dict] = field(default_factory=list)


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


def calibrate(scores: np.ndarray, quantile: float, margin: float) -> Threshold:
    value = fit_threshold(scores, quantile, margin)
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

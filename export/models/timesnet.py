"""TimesNet_ad: TimesNet (Wu et al. 2023) as a window reconstructor, following
Time-Series-Library / PaddleTS TimesNet_AD.

The normalised window is embedded, then each TimesBlock folds the 1-D sequence into a
2-D [length/period, period] grid for each of its top-k periods, runs a shared
Inception block of 2-D convs over the grid, unfolds back, and mixes the k results with
softmax weights from the per-sample spectral amplitude at those periods' frequencies.

Deviation from the reference, on purpose: the reference picks the top-k frequencies
inside every forward pass from the batch's FFT.  Those are Python ints, so an ONNX
trace would silently freeze whatever the tracing batch happened to give.  Here
`prepare(train)` picks them ONCE from the (scaled) training series, they are stored in
the module and in `hparams()` ("freqs", "periods"), and forward only ever uses them.
The per-sample period weights stay dynamic, computed as a real DFT at the fixed
frequencies (two small matmuls), which keeps torch.fft out of the exported graph.

`revin=False` skips the reference's per-window normalisation ("Normalization from
Non-stationary Transformer"): it removes the window's level, so a level shift longer
than the window is reconstructed perfectly.  The shipped models feed streams already
standardised by their calibration statistics and turn it off.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .layers import DataEmbedding, check_dims, normalize_window


class InceptionBlock(nn.Module):
    """Mean of `num_kernels` Conv2d with kernel sizes 1, 3, 5, ... ('same' padding).

    The mean of same-padded convs is one conv whose kernel is the mean of the
    zero-padded kernels, so forward runs that single conv: identical maths, ~2.4x fewer
    multiply-adds for 6 kernels, and the exporter folds the kernel into one constant."""

    def __init__(self, c_in: int, c_out: int, num_kernels: int):
        super().__init__()
        self.kernels = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=2 * i + 1, padding=i) for i in range(num_kernels))
        for conv in self.kernels:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        self.half = num_kernels - 1
        self.c_in, self.c_out = c_in, c_out
        # Constant 0/1 maps placing each k x k kernel at the centre of the largest one.
        size = 2 * self.half + 1
        for i in range(num_kernels):
            k = 2 * i + 1
            place = torch.zeros(k * k, size * size)
            off = self.half - i
            for r in range(k):
                for c in range(k):
                    place[r * k + c, (r + off) * size + (c + off)] = 1.0
            self.register_buffer(f"place{i}", place, persistent=False)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the single equivalent conv; computed once per forward and
        shared by all periods, so the exported graph holds one folded kernel."""
        size = 2 * self.half + 1
        weight = sum(torch.matmul(c.weight.reshape(self.c_out * self.c_in, -1),
                                  getattr(self, f"place{i}"))
                     for i, c in enumerate(self.kernels)) / len(self.kernels)
        bias = torch.stack([c.bias for c in self.kernels]).mean(0)
        return weight.reshape(self.c_out, self.c_in, size, size), bias


class TimesBlock(nn.Module):
    def __init__(self, window: int, d_model: int, d_ff: int, num_kernels: int):
        super().__init__()
        self.window, self.d_model = window, d_model
        self.inception1 = InceptionBlock(d_model, d_ff, num_kernels)
        self.inception2 = InceptionBlock(d_ff, d_model, num_kernels)

    def forward(self, x: torch.Tensor, periods: list[int], basis: torch.Tensor) -> torch.Tensor:
        k = len(periods)
        # Spectral amplitude |X(f)| at the k fixed frequencies, averaged over features.
        proj = torch.matmul(x.transpose(1, 2), basis)                 # [B, D, 2k]
        amp = torch.sqrt(proj[..., :k].pow(2) + proj[..., k:].pow(2) + 1e-12).mean(1)  # [B, k]
        weights = torch.softmax(amp, dim=-1)
        w1, b1 = self.inception1.fused()
        w2, b2 = self.inception2.fused()
        pad2d = self.inception1.half
        outs = []
        for p in periods:
            rows = math.ceil(self.window / p)
            pad = rows * p - self.window
            grid = F.pad(x, (0, 0, 0, pad)) if pad else x
            grid = grid.reshape(-1, rows, p, self.d_model).permute(0, 3, 1, 2)
            y = F.conv2d(F.gelu(F.conv2d(grid, w1, b1, padding=pad2d)), w2, b2, padding=pad2d)
            y = y.permute(0, 2, 3, 1).reshape(-1, rows * p, self.d_model)
            outs.append(y[:, : self.window, :])
        res = torch.stack(outs, dim=-1)                               # [B, W, D, k]
        return (res * weights[:, None, None, :]).sum(-1) + x


def dft_basis(window: int, freqs: list[int]) -> torch.Tensor:
    """[window, 2k]: cos columns then sin columns of the given DFT bins."""
    t = np.arange(window)[:, None]
    ang = 2.0 * np.pi * t * np.asarray(freqs, dtype=np.float64)[None, :] / window
    return torch.tensor(np.concatenate([np.cos(ang), np.sin(ang)], axis=1), dtype=torch.float32)


class TimesNetAD(nn.Module):
    def __init__(self, window: int, n_channels: int, d_model: int = 16, d_ff: int = 32,
                 e_layers: int = 1, top_k: int = 5, num_kernels: int = 6, dropout: float = 0.1,
                 freqs: list[int] | None = None, periods: list[int] | None = None,
                 revin: bool = True):
        super().__init__()
        check_dims(window, n_channels)
        if not 1 <= top_k <= window // 2:
            raise ValueError(f"top_k must be in 1..{window // 2} for window {window}, got {top_k}")
        self.window, self.n_channels = window, n_channels
        self._hp = {"d_model": d_model, "d_ff": d_ff, "e_layers": e_layers, "top_k": top_k,
                    "num_kernels": num_kernels, "dropout": float(dropout), "revin": bool(revin)}
        self.embedding = DataEmbedding(n_channels, d_model, window, dropout)
        self.blocks = nn.ModuleList(
            TimesBlock(window, d_model, d_ff, num_kernels) for _ in range(e_layers))
        self.norm = nn.LayerNorm(d_model)
        self.projection = nn.Linear(d_model, n_channels)
        self.freqs: list[int] | None = None
        self.periods: list[int] | None = None
        if freqs is not None or periods is not None:
            self.set_frequencies(self._freqs_from(freqs, periods))

    def _freqs_from(self, freqs, periods) -> list[int]:
        if freqs is None:
            # Only periods given (e.g. hand-written): use the DFT bin nearest to each period.
            freqs = [max(1, round(self.window / int(p))) for p in periods]
        freqs = [int(f) for f in freqs]
        if periods is not None and [int(p) for p in periods] != [self.window // f for f in freqs]:
            raise ValueError(f"periods {list(periods)} do not match freqs {freqs} "
                             f"(expected window // freq = {[self.window // f for f in freqs]})")
        return freqs

    def set_frequencies(self, freqs: list[int]) -> None:
        freqs = [int(f) for f in freqs]
        if len(freqs) != self._hp["top_k"]:
            raise ValueError(f"expected top_k={self._hp['top_k']} frequencies, got {freqs}")
        if any(not 1 <= f <= self.window // 2 for f in freqs):
            raise ValueError(f"frequencies must be DFT bins in 1..{self.window // 2}, got {freqs}")
        self.freqs = freqs
        self.periods = [self.window // f for f in freqs]
        # Derived from freqs, which travel in hparams, so it stays out of the state dict.
        self.register_buffer("basis", dft_basis(self.window, freqs).to(self.projection.weight.device),
                             persistent=False)

    def prepare(self, train: np.ndarray) -> None:
        """Fix the top-k periods from the scaled training series [T, C]: mean spectral
        amplitude of per-window-normalised windows (what the network sees), DC excluded."""
        train = np.asarray(train, dtype=np.float64)
        if train.ndim != 2 or train.shape[1] != self.n_channels:
            raise ValueError(f"train must be [T, {self.n_channels}], got shape {train.shape}")
        if train.shape[0] < self.window:
            raise ValueError(f"train has {train.shape[0]} rows, fewer than the window {self.window}")
        if not np.isfinite(train).all():
            raise ValueError("train contains NaN or inf")
        windows = np.lib.stride_tricks.sliding_window_view(train, self.window, axis=0)  # [N, C, W]
        step = max(1, len(windows) // 4096)   # bound the cost on long series
        windows = windows[::step]
        centred = windows - windows.mean(-1, keepdims=True)
        normed = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5)
        amp = np.abs(np.fft.rfft(normed, axis=-1)).mean(axis=(0, 1))
        amp[0] = 0.0
        top = np.argsort(-amp, kind="stable")[: self._hp["top_k"]]
        self.set_frequencies([int(f) for f in top])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.periods is None:
            raise RuntimeError("TimesNet_ad periods are not fixed: call prepare(train) "
                               "or build with freqs=/periods= from saved hparams")
        if not self._hp["revin"]:
            h = self.embedding(x)
            for block in self.blocks:
                h = self.norm(block(h, self.periods, self.basis))
            return self.projection(h)
        xn, mean, std = normalize_window(x)
        h = self.embedding(xn)
        for block in self.blocks:
            h = self.norm(block(h, self.periods, self.basis))
        return self.projection(h) * std + mean

    def hparams(self) -> dict:
        hp = dict(self._hp)
        hp["freqs"] = list(self.freqs) if self.freqs is not None else None
        hp["periods"] = list(self.periods) if self.periods is not None else None
        return hp

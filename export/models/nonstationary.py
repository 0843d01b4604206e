"""Nonstationary_ad: Non-stationary Transformer (Liu et al. 2022), encoder-only
reconstruction as in Time-Series-Library / PaddleTS NonStationary_AD.

Series stationarization normalises each window per channel; the encoder runs on the
stationary series with De-stationary Attention, whose scores are rescaled by tau and
shifted by delta, both learned by small MLPs ("projectors") from the *raw* window and
its statistics, so the attention can recover what normalisation removed.  The output
is de-normalised with the window's mean/std.  Defaults follow PaddleX's
Nonstationary_ad config (d_model 64, d_ff 64, projector [32, 32], 2 layers, 8 heads).

`revin=False` keeps the de-stationary attention (tau/delta still learned from the raw
window and its statistics) but feeds the encoder the window itself and does not add the
window's mean back: a de-normalised output copies the window's level, so a level shift
longer than the window would be reconstructed perfectly.  The shipped models feed
streams already standardised by their calibration statistics and turn it off.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .layers import DataEmbedding, HeadProjections, check_dims, circular_pad, normalize_window


class Projector(nn.Module):
    """MLP for tau/delta: a conv that mixes the time axis (time steps as conv channels,
    sliding over the sensor channels with circular padding) + the statistic -> MLP."""

    def __init__(self, n_channels: int, window: int, hidden_dims: list[int], output_dim: int):
        super().__init__()
        self.series_conv = nn.Conv1d(window, 1, kernel_size=3, padding=0, bias=False)
        dims = [2 * n_channels] + list(hidden_dims)
        layers: list[nn.Module] = []
        for i in range(1, len(dims)):
            layers += [nn.Linear(dims[i - 1], dims[i]), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], output_dim, bias=False))
        self.backbone = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        # x [B, W, C], stats [B, 1, C]
        s = self.series_conv(circular_pad(x, 1))             # [B, 1, C]
        return self.backbone(torch.cat([s, stats], dim=1).flatten(1))


class DSAttention(HeadProjections):
    """Multi-head self-attention with de-stationary factors: softmax(scale*(QK^T*tau + delta))."""

    def __init__(self, seq_len: int, d_model: int, n_heads: int, dropout: float):
        super().__init__(seq_len, d_model, n_heads)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, tau: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores = scores * tau[:, :, None, None] + delta[:, None, None, :]
        attn = self.dropout(torch.softmax(scores / math.sqrt(self.d_head), dim=-1))
        out = torch.matmul(attn, v).transpose(1, 2).flatten(2)
        return self.out(out)


class EncoderLayer(nn.Module):
    def __init__(self, seq_len: int, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.attention = DSAttention(seq_len, d_model, n_heads, dropout)
        # The reference's kernel-1 Conv1d pair is exactly a position-wise Linear pair.
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, tau, delta):
        x = self.norm1(x + self.dropout(self.attention(x, tau, delta)))
        y = self.dropout(self.ff2(self.dropout(F.gelu(self.ff1(x)))))
        return self.norm2(x + y)


class NonstationaryAD(nn.Module):
    def __init__(self, window: int, n_channels: int, d_model: int = 64, d_ff: int = 64,
                 n_heads: int = 8, e_layers: int = 2, p_hidden_dims: list[int] | None = None,
                 dropout: float = 0.05, revin: bool = True):
        super().__init__()
        check_dims(window, n_channels)
        p_hidden = list(p_hidden_dims) if p_hidden_dims else [32, 32]
        self.window, self.n_channels = window, n_channels
        self._hp = {"d_model": d_model, "d_ff": d_ff, "n_heads": n_heads, "e_layers": e_layers,
                    "p_hidden_dims": p_hidden, "dropout": float(dropout), "revin": bool(revin)}
        self.embedding = DataEmbedding(n_channels, d_model, window, dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(window, d_model, n_heads, d_ff, dropout) for _ in range(e_layers))
        self.norm = nn.LayerNorm(d_model)
        self.tau_learner = Projector(n_channels, window, p_hidden, 1)
        self.delta_learner = Projector(n_channels, window, p_hidden, window)
        self.projection = nn.Linear(d_model, n_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn, mean, std = normalize_window(x)
        tau = self.tau_learner(x, std).exp()                 # [B, 1]  rescales scores
        delta = self.delta_learner(x, mean)                  # [B, W]  shifts scores per key
        h = self.embedding(xn if self._hp["revin"] else x)
        for layer in self.layers:
            h = layer(h, tau, delta)
        out = self.projection(self.norm(h))
        return out * std + mean if self._hp["revin"] else out

    def hparams(self) -> dict:
        return {**self._hp, "p_hidden_dims": list(self._hp["p_hidden_dims"])}

    def prepare(self, train: np.ndarray) -> None:
        """Nothing is fixed from data for this architecture."""

"""Building blocks shared by the reconstruction models.

Everything here exports with the TorchScript ONNX exporter at opset 17 using only
ops ONNX Runtime's CPU provider implements (no FFT, no circular-pad attribute).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def check_dims(window: int, n_channels: int) -> None:
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer >= 2, got {window!r}")
    if not isinstance(n_channels, int) or n_channels < 1:
        raise ValueError(f"n_channels must be an integer >= 1, got {n_channels!r}")


def circular_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Wrap-around padding on the last axis, spelled as Slice+Concat so opset 17 suffices."""
    return torch.cat([x[..., -pad:], x, x[..., :pad]], dim=-1)


def normalize_window(x: torch.Tensor, eps: float = 1e-5):
    """Per-window, per-channel standardisation over time ("series stationarization"/RevIN
    without affine).  Returns the normalised series and the statistics to undo it."""
    mean = x.mean(dim=1, keepdim=True).detach()
    centred = x - mean
    std = torch.sqrt(centred.pow(2).mean(dim=1, keepdim=True) + eps).detach()
    return centred / std, mean, std


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : d_model // 2]
    return pe.unsqueeze(0)


class TokenEmbedding(nn.Module):
    """Conv1d (kernel 3, circular padding, no bias) from channels to d_model, as in
    Time-Series-Library's DataEmbedding."""

    def __init__(self, c_in: int, d_model: int):
        super().__init__()
        self.conv = nn.Conv1d(c_in, d_model, kernel_size=3, padding=0, bias=False)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_in", nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(circular_pad(x.transpose(1, 2), 1)).transpose(1, 2)


class DataEmbedding(nn.Module):
    """Value embedding + fixed sinusoidal position embedding (no calendar features: the
    edge runtime feeds bare sensor windows)."""

    def __init__(self, c_in: int, d_model: int, window: int, dropout: float):
        super().__init__()
        self.value = TokenEmbedding(c_in, d_model)
        # Deterministic, so not saved in the state dict.
        self.register_buffer("pe", sinusoidal_positions(window, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.value(x) + self.pe)


class HeadProjections(nn.Module):
    """The Q/K/V projections and head split shared by the attention variants; each
    subclass adds its own score formula and output projection."""

    def __init__(self, seq_len: int, d_model: int, n_heads: int):
        super().__init__()
        self.seq_len = seq_len
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:      # [B, L, D] -> [B, H, L, E]
        return t.reshape(-1, self.seq_len, self.n_heads, self.d_head).transpose(1, 2)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))

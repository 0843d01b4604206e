"""PatchTST_ad: PatchTST (Nie et al. 2023) as a window reconstructor, following
PaddleTS PatchTST_AD (original PatchTST backbone).

Each channel is handled independently (channel independence): its normalised window is
cut into overlapping patches (end padded by repeating the last value), patches are
linearly embedded, a learned position embedding is added, a Transformer encoder with
residual attention scores and BatchNorm runs over the patch sequence, and a flatten
head maps all patch embeddings back to the window.  RevIN without affine undoes the
normalisation.  Defaults follow PaddleTS: patch 16, stride 8, d_model 16, 4 heads,
d_ff 128, 4 layers, dropout 0.2.

`revin` switches RevIN off as the reference's ``revin`` flag does.  Per-window
normalisation removes a window's level, so a sustained level shift longer than the
window is reconstructed perfectly; where the stream is already standardised by its
calibration statistics (agent/calibration.py) the shipped models turn it off.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .layers import HeadProjections, check_dims, normalize_window


def patch_index(window: int, patch_len: int, stride: int) -> torch.Tensor:
    """Gather indices [n_patches, patch_len]; indices past the end are clamped to the last
    step, which is exactly ReplicationPad1d((0, stride)) followed by unfold."""
    n_patches = (window - patch_len) // stride + 2
    starts = torch.arange(n_patches) * stride
    idx = starts[:, None] + torch.arange(patch_len)[None, :]
    return idx.clamp(max=window - 1)


class ResidualAttention(HeadProjections):
    """Multi-head attention whose pre-softmax scores are carried to the next layer and
    added there (PatchTST's res_attention)."""

    def __init__(self, seq_len: int, d_model: int, n_heads: int, dropout: float):
        super().__init__(seq_len, d_model, n_heads)
        self.out = nn.Sequential(nn.Linear(d_model, d_model), nn.Dropout(dropout))
        self.scale = 1.0 / math.sqrt(self.d_head)

    def forward(self, x: torch.Tensor, prev: torch.Tensor | None):
        q, k, v = self.project(x)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if prev is not None:
            scores = scores + prev
        out = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).flatten(2)
        return self.out(out), scores


class BatchNormTokens(nn.Module):
    """BatchNorm1d over d_model for [N, L, D] token sequences."""

    def __init__(self, d_model: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class EncoderLayer(nn.Module):
    def __init__(self, seq_len: int, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.attention = ResidualAttention(seq_len, d_model, n_heads, dropout)
        self.norm_attn = BatchNormTokens(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(d_ff, d_model))
        self.norm_ff = BatchNormTokens(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, prev):
        a, scores = self.attention(x, prev)
        x = self.norm_attn(x + self.dropout(a))
        x = self.norm_ff(x + self.dropout(self.ff(x)))
        return x, scores


class PatchTSTAD(nn.Module):
    def __init__(self, window: int, n_channels: int, patch_len: int = 16, stride: int = 8,
                 d_model: int = 16, n_heads: int = 4, d_ff: int = 128, n_layers: int = 4,
                 dropout: float = 0.2, head_dropout: float = 0.0, revin: bool = True):
        super().__init__()
        check_dims(window, n_channels)
        if not (1 <= patch_len <= window) or stride < 1:
            raise ValueError(f"need 1 <= patch_len <= window ({window}) and stride >= 1, "
                             f"got patch_len={patch_len}, stride={stride}")
        self.window, self.n_channels = window, n_channels
        self._hp = {"patch_len": patch_len, "stride": stride, "d_model": d_model,
                    "n_heads": n_heads, "d_ff": d_ff, "n_layers": n_layers,
                    "dropout": float(dropout), "head_dropout": float(head_dropout),
                    "revin": bool(revin)}
        idx = patch_index(window, patch_len, stride)
        self.n_patches = idx.shape[0]
        self.d_model = d_model
        self.register_buffer("patch_idx", idx.reshape(-1), persistent=False)
        self.patch_embed = nn.Linear(patch_len, d_model)
        self.pos = nn.Parameter(torch.empty(self.n_patches, d_model).uniform_(-0.02, 0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(self.n_patches, d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.head = nn.Linear(d_model * self.n_patches, window)
        self.head_dropout = nn.Dropout(head_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn, mean, std = normalize_window(x) if self._hp["revin"] else (x, None, None)
        series = xn.transpose(1, 2)                                   # [B, C, W]
        patches = series.index_select(2, self.patch_idx)              # [B, C, N*P]
        patches = patches.reshape(-1, self.n_patches, self._hp["patch_len"])   # [B*C, N, P]
        h = self.dropout(self.patch_embed(patches) + self.pos)
        scores = None
        for layer in self.layers:
            h, scores = layer(h, scores)
        # Flatten head: per channel, d_model x n_patches -> window (reference order: D then N).
        z = h.transpose(1, 2).reshape(-1, self.n_channels, self.d_model * self.n_patches)
        out = self.head_dropout(self.head(z)).transpose(1, 2)         # [B, W, C]
        return out * std + mean if self._hp["revin"] else out

    def hparams(self) -> dict:
        return dict(self._hp)

    def prepare(self, train: np.ndarray) -> None:
        """Nothing is fixed from data for this architecture."""

"""AutoEncoder_ad: PaddleTS's MLP auto-encoder.

Each channel's window is encoded by an MLP over the time axis into a small bottleneck
and decoded back (weights shared across channels, as in PaddleTS with only numeric
covariates).  Defaults follow PaddleTS: hidden_config [32, 16], ReLU, dropout 0.2, no BN.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .layers import check_dims


def _mlp(dims: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(1, len(dims)):
        layers.append(nn.Linear(dims[i - 1], dims[i]))
        if i < len(dims) - 1:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class AutoEncoderAD(nn.Module):
    def __init__(self, window: int, n_channels: int, hidden_config: list[int] | None = None,
                 dropout: float = 0.2):
        super().__init__()
        check_dims(window, n_channels)
        hidden = list(hidden_config) if hidden_config else [32, 16]
        if any(not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden_config must hold positive integers, got {hidden!r}")
        self.window, self.n_channels = window, n_channels
        self._hp = {"hidden_config": hidden, "dropout": float(dropout)}
        self.encoder = _mlp([window] + hidden, dropout)
        self.decoder = _mlp([hidden[-1]] + hidden[::-1][1:] + [window], dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x.transpose(1, 2))
        return self.decoder(z).transpose(1, 2)

    def hparams(self) -> dict:
        return {"hidden_config": list(self._hp["hidden_config"]), "dropout": self._hp["dropout"]}

    def prepare(self, train: np.ndarray) -> None:
        """Nothing is fixed from data for this architecture."""

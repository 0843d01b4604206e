"""DLinear_ad: moving-average decomposition + two linear maps over time.

The window is split into a trend (edge-replicated moving average) and the seasonal
remainder; each goes through one Linear(window -> window) shared by all channels and
the two are summed (Zeng et al. 2023; PaddleTS DLinear_AD, individual=False).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .layers import check_dims


class MovingAverage(nn.Module):
    """Trend by a centred moving average whose ends are padded by repeating the edge values,
    so the trend has the window's length."""

    def __init__(self, kernel_size: int):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            # An even kernel cannot be centred and would shorten the series by one step.
            raise ValueError(f"moving_avg must be an odd integer >= 1, got {kernel_size!r}")
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # [B, W, C]
        half = (self.kernel_size - 1) // 2
        if half == 0:
            return x
        front = x[:, :1, :].expand(-1, half, -1)
        end = x[:, -1:, :].expand(-1, half, -1)
        padded = torch.cat([front, x, end], dim=1).transpose(1, 2)
        return F.avg_pool1d(padded, self.kernel_size, stride=1).transpose(1, 2)


class DLinearAD(nn.Module):
    def __init__(self, window: int, n_channels: int, moving_avg: int = 25):
        super().__init__()
        check_dims(window, n_channels)
        self.window, self.n_channels = window, n_channels
        self._hp = {"moving_avg": moving_avg}
        self.decomposition = MovingAverage(moving_avg)
        self.linear_seasonal = nn.Linear(window, window)
        self.linear_trend = nn.Linear(window, window)
        # Start as "predict the window mean" so early training is stable (as in the reference).
        for lin in (self.linear_seasonal, self.linear_trend):
            nn.init.constant_(lin.weight, 1.0 / window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trend = self.decomposition(x)
        seasonal = x - trend
        out = self.linear_seasonal(seasonal.transpose(1, 2)) + self.linear_trend(trend.transpose(1, 2))
        return out.transpose(1, 2)

    def hparams(self) -> dict:
        return dict(self._hp)

    @torch.no_grad()
    def export_module(self) -> nn.Module:
        """The graph to export: this model collapsed into the one affine map over time it is.

        The moving average, the subtraction and both Linear layers are linear in x, so
        the whole forward is recon[:, t, c] = sum_s A[t, s] x[:, s, c] + b[t].  Exporting
        that as one MatMul + Add instead of ~40 small nodes makes ONNX Runtime several times
        faster on a model whose per-call cost is all overhead.  A and b are read off the
        model itself (its response to zero and to a unit impulse at each step, in float64),
        and the export's parity check compares the folded graph with this unfolded model.
        """
        m = copy.deepcopy(self).double().eval()
        b = m(torch.zeros(1, self.window, 1, dtype=torch.float64))[0, :, 0]
        impulses = torch.eye(self.window, dtype=torch.float64).unsqueeze(-1)    # [s, W, 1]
        a = (m(impulses)[:, :, 0] - b).T                                        # [t, s]
        return FoldedTimeMap(a.float(), b.float())

    def prepare(self, train: np.ndarray) -> None:
        """Nothing is fixed from data for this architecture."""


class FoldedTimeMap(nn.Module):
    """recon = A @ x + b along the time axis, the same map for every channel."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)                 # [W, W]
        self.register_buffer("b", b.unsqueeze(-1))   # [W, 1], broadcast over channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # [B, W, C]
        return torch.matmul(self.a, x) + self.b

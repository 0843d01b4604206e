"""Anomaly scores from reconstructions, per `model_meta.SCORE_DEFINITION`.

    e_{t,c}  = (xhat_{t,c} - x_{t,c})^2 in the model's scaled space (float64)
    score_t  = mean_c e_{t,c} at the NEWEST time step t of the window
    share_c  = e_{t,c} / sum_c e_{t,c}

Everything works on whole blocks of windows at once: the hot path does no
per-window Python.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .model_meta import ModelMeta


def score_windows(x: np.ndarray, recon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores float64 [B], err float64 [B, C]) for windows x and their reconstructions [B, W, C]."""
    if x.shape != recon.shape or x.ndim != 3:
        raise ValueError(f"windows {list(x.shape)} and reconstructions {list(recon.shape)} "
                         f"must both be [B, window, channels]")
    d = recon[:, -1, :].astype(np.float64) - x[:, -1, :].astype(np.float64)
    err = d * d
    return err.mean(axis=1), err


def top_channels(err_row: np.ndarray, names: list[str], k: int) -> list[dict]:
    """The k channels with the largest share of the squared error, descending.

    Empty when the error is zero or not finite: no channel can be blamed.
    """
    err_row = np.asarray(err_row, np.float64)
    total = float(err_row.sum())
    if not (total > 0 and np.isfinite(total)):
        return []
    order = np.argsort(-err_row, kind="stable")[:k]
    return [{"name": names[i], "share": round(float(err_row[i]) / total, 4)} for i in order]


class Smoother:
    """Moving average over the last k scores of one stream; blocks in, blocks out.

    Until k scores have been seen, the mean is over those available.
    """

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"smoothing window must be >= 1, got {k}")
        self.k = k
        self._hist = np.empty(0, np.float64)

    def reset(self) -> None:
        self._hist = np.empty(0, np.float64)

    def update(self, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, np.float64)
        if self.k == 1:
            return scores
        h = len(self._hist)
        s = np.concatenate([self._hist, scores])
        # The cumulative sum only spans k-1 old scores plus this block, so float
        # error cannot build up over a long-running stream.
        c = np.concatenate([[0.0], np.cumsum(s)])
        end = np.arange(h + 1, h + len(scores) + 1)
        start = np.maximum(end - self.k, 0)
        self._hist = s[-(self.k - 1):]
        return (c[end] - c[start]) / (end - start)


@dataclass
class StreamScaler:
    """Per-channel standardisation into the model's scaled space."""
    mean: np.ndarray
    std: np.ndarray
    _mean32: np.ndarray = field(init=False, repr=False)
    _inv32: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, np.float64)
        self.std = np.asarray(self.std, np.float64)
        if self.mean.shape != self.std.shape or self.mean.ndim != 1:
            raise ValueError(f"scaler mean {self.mean.shape} and std {self.std.shape} "
                             f"must be equal-length vectors")
        if not np.all(self.std > 0):
            raise ValueError("scaler std must be > 0 for every channel")
        self._mean32 = self.mean.astype(np.float32)
        self._inv32 = (1.0 / self.std).astype(np.float32)

    @classmethod
    def from_meta(cls, meta: ModelMeta) -> "StreamScaler":
        return cls(np.asarray(meta.scaler.mean), np.asarray(meta.scaler.std))

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Raw values [n, C] -> float32 [n, C] in scaled space (NaN stays NaN)."""
        return (np.asarray(values, np.float32) - self._mean32) * self._inv32

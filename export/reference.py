"""Reference detectors for benchmarks: PCA Hotelling T² and Q (SPE), numpy only.

The classic multivariate statistical process control baseline of the Tennessee Eastman
literature, fitted on the same normal files the models train on, so a benchmark can
put its per-row alarms beside the models' alerts.

Rules:
- Each file is split as `tsad-export train` splits it (`export.data.chronological_split`
  cut): the first (1 - val_frac) of its rows fit the model, the last val_frac set the
  control limits.  A file too short to split fits only.
- Fit: z-score every channel with the mean/std of the fit rows (std floored as in
  `export.data.fit_scaler`), eigen-decompose their covariance (= correlation matrix),
  keep the fewest leading components that explain `variance` (0.90) of the variance.
- T² = sum_i t_i² / lambda_i over the kept scores t = z P;
  Q (SPE) = ||z - t P^T||², the squared residual off the principal subspace.
- Control limits: the empirical `limit_quantile` (0.99) quantile of each statistic on
  the held-out rows.  Not the F-distribution (T²) or Jackson-Mudholkar (Q) formulas:
  both assume independent Gaussian rows, and process samples every few minutes are
  strongly autocorrelated, so the formulas under-state the limits; the held-out
  quantile is what 1 % of unseen normal rows actually exceed.
- A row alarms when its statistic exceeds the limit (strictly): raw per row, no
  hysteresis, as these detectors are usually reported.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.data import fit_scaler

VARIANCE = 0.90
LIMIT_QUANTILE = 0.99
VAL_FRAC = 0.2


@dataclass
class PCAReference:
    channels: list[str]
    mean: np.ndarray          # [C]
    std: np.ndarray           # [C]
    loadings: np.ndarray      # [C, k] principal directions
    eigenvalues: np.ndarray   # [k]
    explained: float          # share of the variance the k components hold
    t2_limit: float
    q_limit: float

    @property
    def components(self) -> int:
        return self.loadings.shape[1]

    def statistics(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(T², Q) per row of raw values [n, C]; a row with a NaN gets NaN."""
        z = (np.asarray(values, np.float64) - self.mean) / self.std
        t = z @ self.loadings
        t2 = np.sum(t * t / self.eigenvalues, axis=1)
        r = z - t @ self.loadings.T
        return t2, np.sum(r * r, axis=1)

    def alarms(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """Per-row 0/1 alarms: `t2`, `q`, and `either`; NaN rows never alarm."""
        t2, q = self.statistics(values)
        a = {"t2": np.nan_to_num(t2, nan=-1.0) > self.t2_limit,
             "q": np.nan_to_num(q, nan=-1.0) > self.q_limit}
        a["either"] = a["t2"] | a["q"]
        return {k: v.astype(np.int8) for k, v in a.items()}

    def file_alarms(self, path: str | Path) -> dict[str, np.ndarray]:
        """`alarms` for a CSV file (channels picked by name, as the runtime reads it),
        plus `ts` (epoch s) and `labels` (None without an `anomaly` column)."""
        from agent.contract import read_table
        t = read_table(path, self.channels)
        return {**self.alarms(t.values), "ts": t.ts, "labels": t.labels}

    def describe(self) -> dict:
        return {"components": self.components, "channels": len(self.channels),
                "explained_variance": round(self.explained, 4),
                "t2_limit": self.t2_limit, "q_limit": self.q_limit,
                "limits": f"empirical {LIMIT_QUANTILE} quantile on held-out normal rows"}


def _split(values: np.ndarray, val_frac: float) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(round(len(values) * val_frac))
    if n_val < 2 or len(values) - n_val < 2:
        return values, values[:0]
    return values[:-n_val], values[-n_val:]


def fit_pca(arrays: list[np.ndarray], channels: list[str], variance: float = VARIANCE,
            limit_quantile: float = LIMIT_QUANTILE, val_frac: float = VAL_FRAC) -> PCAReference:
    """PCA T²/Q fitted on normal raw arrays [n_i, C] (module rules)."""
    if not 0 < variance <= 1 or not 0 < limit_quantile < 1:
        raise ValueError("variance must be in (0, 1] and limit_quantile in (0, 1)")
    parts = [_split(np.asarray(a, np.float64), val_frac) for a in arrays]
    fit_rows = np.concatenate([p[0] for p in parts])
    held = np.concatenate([p[1] for p in parts])
    if len(held) < 10:
        raise ValueError(f"only {len(held)} held-out rows to set control limits on: "
                         "give longer or more normal files")
    mean, std = fit_scaler([fit_rows])
    z = (fit_rows - mean) / std
    eigval, eigvec = np.linalg.eigh(np.cov(z, rowvar=False))
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.clip(eigval[order], 1e-12, None), eigvec[:, order]
    share = np.cumsum(eigval) / eigval.sum()
    k = int(np.searchsorted(share, variance - 1e-12) + 1)
    ref = PCAReference(list(channels), mean, std, eigvec[:, :k], eigval[:k], float(share[k - 1]),
                       0.0, 0.0)
    t2, q = ref.statistics(held)
    ref.t2_limit = float(np.quantile(t2, limit_quantile))
    ref.q_limit = float(np.quantile(q, limit_quantile))
    return ref


def fit_pca_files(paths: list[str | Path], channels: list[str], **kw) -> PCAReference:
    """`fit_pca` on normal CSV files; refuses missing values (as training does)."""
    from agent.contract import read_table
    arrays = []
    for p in paths:
        v = read_table(p, channels).values.astype(np.float64)
        if not np.isfinite(v).all():
            raise ValueError(f"{p}: missing or non-numeric values; the reference fits on "
                             "complete normal rows only")
        arrays.append(v)
    return fit_pca(arrays, channels, **kw)

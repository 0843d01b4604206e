"""Reconstruction models of the PaddleX time-series anomaly-detection pipeline, in PyTorch.

Every model maps a scaled window x [batch, window, channels] to its reconstruction of the
same shape, exports to ONNX (see export/onnx_export.py), and offers:
  hparams() -> JSON-serialisable dict; build_model(name, window, C, **hparams) rebuilds it.
  prepare(train [T, C]) -> fixes data-dependent settings (only TimesNet's periods).
"""
from __future__ import annotations

from torch import nn

from .autoencoder import AutoEncoderAD
from .dlinear import DLinearAD
from .nonstationary import NonstationaryAD
from .patchtst import PatchTSTAD
from .timesnet import TimesNetAD

REGISTRY: dict[str, type[nn.Module]] = {
    "AutoEncoder_ad": AutoEncoderAD,
    "DLinear_ad": DLinearAD,
    "Nonstationary_ad": NonstationaryAD,
    "PatchTST_ad": PatchTSTAD,
    "TimesNet_ad": TimesNetAD,
}

ARCHITECTURE: dict[str, str] = {
    "AutoEncoder_ad": "AutoEncoder",
    "DLinear_ad": "DLinear",
    "Nonstationary_ad": "Nonstationary",
    "PatchTST_ad": "PatchTST",
    "TimesNet_ad": "TimesNet",
}


def build_model(name: str, window: int, n_channels: int, **hparams) -> nn.Module:
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}") from None
    try:
        return cls(window, n_channels, **hparams)
    except TypeError as e:
        raise ValueError(f"{name}: bad hyperparameters {sorted(hparams)}: {e}") from None

"""ONNX Runtime against the framework a model came from (torch or Paddle).

Torch-free on purpose: the PaddleX importer runs in a separate environment without
torch, and both exporters must judge parity by the same rule.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def ort_session(onnx_path: str | Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1   # a check, not a benchmark: stay polite on shared machines
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def compare(got: np.ndarray, expected: np.ndarray, label: str, tol: float,
            reference: str, error: type[Exception], where: str = "") -> float:
    """Max |got - expected| (float64); raises `error` on a shape mismatch, non-finite
    values, or a difference above `tol`."""
    if got.shape != expected.shape:
        raise error(f"{where}{label}: ONNX output shape {got.shape}, {reference} {expected.shape}")
    if not (np.isfinite(got).all() and np.isfinite(expected).all()):
        raise error(f"{where}{label}: non-finite values in the output")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
    if diff > tol:
        raise error(f"{where}ONNX Runtime and {reference} disagree on {label}: "
                    f"max |diff| = {diff:.3g} > tol {tol:g}")
    return diff

"""Export a reconstruction model to ONNX and prove the file computes what torch computes.

Contract of the exported graph (see agent/model_meta.py): input "x" float32
[batch, window, channels], output "recon" of the same shape, batch axis dynamic.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from export.parity import compare, ort_session

INPUT_NAME = "x"
OUTPUT_NAME = "recon"


class ExportError(RuntimeError):
    """The model could not be exported, or the ONNX file does not match the torch model."""


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def opset_range() -> tuple[int, int]:
    """The opsets torch's TorchScript exporter (the one used here, dynamo=False) can write."""
    # Below opset 9 the exporter writes IR version 3, where the weights are graph inputs,
    # which the model contract (one input "x") refuses.
    lowest = 9
    try:
        from torch.onnx import _constants as c
        return max(lowest, c.ONNX_MIN_OPSET), c.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    except (ImportError, AttributeError):
        # Private constants: if a torch release moves them, 20 is the TorchScript
        # exporter's last opset.
        return lowest, 20


def opset_problem(opset: int) -> str | None:
    """Why `--opset` cannot be written (the flag and its range), or None."""
    lo, hi = opset_range()
    if lo <= opset <= hi:
        return None
    return f"--opset {opset}: expected {lo} to {hi} (what this torch's ONNX exporter supports)"


def export_onnx(model: torch.nn.Module, path: str | Path, window: int, n_channels: int,
                opset: int = 17) -> int:
    """Write `model` to `path` (atomically) and check it; returns the opset used.

    A TracerWarning means the trace baked a data-dependent Python value into the graph
    (the silent-freeze failure this project guards against), so it is an error here.
    A model may offer `export_module()`, an equivalent graph that runs faster; the parity
    check still compares the file with the model itself."""
    path = Path(path)
    model.eval()
    graph = model.export_module().eval() if hasattr(model, "export_module") else model
    # Batch 2, so no shape is specialised to a batch of one.
    dummy = torch.randn(2, window, n_channels)
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                torch.onnx.export(
                    graph, (dummy,), str(tmp), dynamo=False, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    do_constant_folding=True)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise ExportError(f"{type(model).__name__}: ONNX export (opset {opset}) failed: {e}") from e
    tracer = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if tracer:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{type(model).__name__}: trace froze data-dependent values: "
                          + " | ".join(tracer))
    try:
        m = onnx.load(str(tmp))
        _declare_output_shape(m, window, n_channels)
        onnx.save(m, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        _check_signature(onnx.load(str(tmp)), window, n_channels)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ExportError) as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{type(model).__name__}: exported graph is invalid: {e}") from e
    os.replace(tmp, path)
    return opset


def _declare_output_shape(m: onnx.ModelProto, window: int, n_channels: int) -> None:
    """The tracer leaves some output dims symbolic (they pass through Shape ops); every
    model here returns its input's shape, so declare [batch, window, channels] for the
    runtime.  full_check's strict shape inference rejects the file if that contradicts
    the graph, and parity_check confirms it on real outputs."""
    dims = m.graph.output[0].type.tensor_type.shape.dim
    if len(dims) != 3:
        raise ExportError(f"output has rank {len(dims)}, expected 3 [batch, window, channels]")
    dims[0].dim_param = "batch"
    dims[1].dim_value = window
    dims[2].dim_value = n_channels


def _check_signature(m: onnx.ModelProto, window: int, n_channels: int) -> None:
    for kind, values, name in (("input", m.graph.input, INPUT_NAME),
                               ("output", m.graph.output, OUTPUT_NAME)):
        if [v.name for v in values] != [name]:
            raise ExportError(f"graph {kind}s are {[v.name for v in values]}, expected [{name!r}]")
        dims = values[0].type.tensor_type.shape.dim
        shape = [d.dim_param or d.dim_value for d in dims]
        if len(shape) != 3 or not isinstance(shape[0], str) or shape[1:] != [window, n_channels]:
            raise ExportError(f"{kind} {name!r} has shape {shape}, "
                              f"expected [batch, {window}, {n_channels}] with a symbolic batch")


def parity_check(model: torch.nn.Module, onnx_path: str | Path, windows: np.ndarray,
                 tol: float = 1e-4, shown: str | Path | None = None) -> float:
    """Max |ORT - torch| over: the first window alone (batch 1), up to 64 real windows as one
    batch, and 4 random N(0,1) windows.  Raises ExportError above `tol` or on a shape or
    non-finite mismatch, naming `shown` (the file being written, where `onnx_path` is a
    temporary one that is gone by the time the user reads the error)."""
    windows = np.asarray(windows, dtype=np.float32)
    if windows.ndim != 3 or len(windows) == 0:
        raise ExportError(f"parity windows must be [N, window, channels] with N >= 1, "
                          f"got shape {windows.shape}")
    rng = np.random.default_rng(0)
    cases = {
        "batch 1": windows[:1],
        f"batch {min(len(windows), 64)}": windows[:64] if len(windows) > 1 else np.repeat(windows, 2, 0),
        "random batch 4": rng.standard_normal((4,) + windows.shape[1:]).astype(np.float32),
    }
    model.eval()
    sess = ort_session(onnx_path)
    named = shown if shown is not None else onnx_path
    worst = 0.0
    for label, batch in cases.items():
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        try:
            got = sess.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        except Exception as e:
            raise ExportError(f"{named}: ONNX Runtime failed on {label} {batch.shape}: {e}") from e
        worst = max(worst, compare(got, expected, label, tol, "torch", ExportError,
                                   where=f"{named}: "))
    return worst

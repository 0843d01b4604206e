"""Check a shipped model the way the runtime will use it: metadata, checksum, ORT, shapes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.model_meta import ModelMetaError, load_meta
from export.parity import ort_session


class VerifyError(Exception):
    """The model file and its metadata cannot be used together."""


def open_session(path: Path):
    try:
        return ort_session(path)
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types
        raise VerifyError(f"{path}: onnxruntime cannot load the model: {e}") from None


def _dim(d) -> int | None:
    return d if isinstance(d, int) else None


def verify_model(path: Path) -> dict:
    """Raise VerifyError with a precise reason, or return a short report."""
    try:
        meta = load_meta(path)
    except ModelMetaError as e:
        raise VerifyError(str(e)) from None
    sess = open_session(path)
    ins, outs = sess.get_inputs(), sess.get_outputs()
    names_in = [i.name for i in ins]
    names_out = [o.name for o in outs]
    if names_in != [meta.input_name]:
        raise VerifyError(f"{path}: model inputs are {names_in}, metadata says [{meta.input_name!r}]")
    if meta.output_name not in names_out:
        raise VerifyError(f"{path}: model outputs are {names_out}, metadata says {meta.output_name!r}")
    shape = ins[0].shape
    if len(shape) != 3:
        raise VerifyError(f"{path}: input {meta.input_name!r} has shape {shape}, expected "
                          "[batch, window, channels]")
    if _dim(shape[2]) is not None and shape[2] != meta.n_channels:
        raise VerifyError(f"{path}: model expects {shape[2]} channels but metadata lists "
                          f"{meta.n_channels} ({', '.join(meta.channels)})")
    if _dim(shape[1]) is not None and shape[1] != meta.window:
        raise VerifyError(f"{path}: model expects window {shape[1]} but metadata says {meta.window}")
    if meta.dynamic_batch and _dim(shape[0]) is not None:
        raise VerifyError(f"{path}: metadata promises a dynamic batch but the input batch is fixed "
                          f"at {shape[0]}")
    batch = 3 if meta.dynamic_batch else (_dim(shape[0]) or 1)
    x = np.random.default_rng(0).standard_normal((batch, meta.window, meta.n_channels)).astype(np.float32)
    try:
        y = sess.run([meta.output_name], {meta.input_name: x})[0]
    except Exception as e:
        raise VerifyError(f"{path}: inference on a [{batch}, {meta.window}, {meta.n_channels}] "
                          f"window failed: {e}") from None
    if y.shape != x.shape:
        raise VerifyError(f"{path}: output {meta.output_name!r} has shape {list(y.shape)}, "
                          f"expected {list(x.shape)}")
    if not np.all(np.isfinite(y)):
        raise VerifyError(f"{path}: output contains NaN or infinity")
    return {"model": str(path), "ok": True, "name": meta.name, "architecture": meta.architecture,
            "window": meta.window, "channels": meta.channels, "threshold": meta.threshold.value,
            "opset": meta.opset, "parameters": meta.parameters, "onnx_sha256": meta.onnx_sha256,
            "bytes": path.stat().st_size}

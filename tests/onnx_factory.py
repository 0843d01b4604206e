"""Tiny real ONNX reconstruction models with matching `<model>.onnx.json`, for tests.

    from onnx_factory import make_model      # tests/ is on sys.path under pytest
    path, meta = make_model(tmp_path / "m.onnx", window=16, channels=["a", "b"])

kind="affine":   recon = x * scale + bias              (elementwise)
kind="timemix":  recon = M @ x, M [window, window]     (mixes time steps, like a linear AE)
kind="glitch":   as affine, but a window whose last channel goes over `trigger` comes back
                 all NaN, whose second last does all +inf, and whose third last fails
                 ONNX Runtime's run (a Gather out of bounds): a model going wrong at run time
The graph's declared window/channels can differ from the metadata's
(`graph_window`, `graph_channels`) to build deliberately mismatched pairs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.model_meta import ModelMeta, Scaler, Threshold, meta_path_for, sha256_file

OPSET = 17
# IR 9 loads in every onnxruntime >= 1.16, including older GPU/OpenVINO builds.
IR_VERSION = 9


def timemix_matrix(window: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.eye(window) * 0.8 + rng.normal(0, 0.05, (window, window))).astype(np.float32)


def build_graph(window: int, channels: int, kind: str = "affine", batch: int | str = "batch",
                input_name: str = "x", output_name: str = "recon", scale: float = 0.9,
                bias: float = 0.01, seed: int = 0, trigger: float = 50.0) -> onnx.ModelProto:
    shape = [batch, window, channels]
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, shape)
    if kind == "affine":
        inits = [numpy_helper.from_array(np.array(scale, np.float32), "scale"),
                 numpy_helper.from_array(np.array(bias, np.float32), "bias")]
        nodes = [helper.make_node("Mul", [input_name, "scale"], ["scaled"]),
                 helper.make_node("Add", ["scaled", "bias"], [output_name])]
    elif kind == "timemix":
        inits = [numpy_helper.from_array(timemix_matrix(window, seed), "M")]
        nodes = [helper.make_node("MatMul", ["M", input_name], [output_name])]
    elif kind == "glitch":
        inits, nodes = _glitch(input_name, output_name, scale, bias, trigger)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    graph = helper.make_graph(nodes, f"tiny_{kind}", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="tests.onnx_factory")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _glitch(inp: str, out: str, scale: float, bias: float, trigger: float):
    """The glitch graph's initialisers and nodes (see the module docstring)."""
    inits = [numpy_helper.from_array(np.array(v, dt), n) for v, dt, n in (
        (scale, np.float32, "scale"), (bias, np.float32, "bias"), (trigger, np.float32, "trig"),
        (0.0, np.float32, "zero"), (100.0, np.float32, "hundred"), (100, np.int64, "far"),
        ([0.0], np.float32, "one_value"), ([2], np.int64, "axis2"))]
    inits += [numpy_helper.from_array(np.array(-k, np.int64), f"ch{k}") for k in (1, 2, 3)]
    nodes = [helper.make_node("Mul", [inp, "scale"], ["s"]),
             helper.make_node("Add", ["s", "bias"], ["y0"])]
    for k in (1, 2, 3):         # m{k}: each window's largest value of channel -k, [B, 1, 1]
        nodes += [helper.make_node("Gather", [inp, f"ch{k}"], [f"g{k}"], axis=2),
                  helper.make_node("ReduceMax", [f"g{k}"], [f"r{k}"], axes=[1], keepdims=1),
                  helper.make_node("Unsqueeze", [f"r{k}", "axis2"], [f"m{k}"])]
    nodes += [helper.make_node("Sub", ["trig", "m1"], ["d1"]),      # NaN: sqrt of < 0, x 0
              helper.make_node("Sqrt", ["d1"], ["q1"]),
              helper.make_node("Mul", ["q1", "zero"], ["n1"]),
              helper.make_node("Add", ["y0", "n1"], ["y1"]),
              helper.make_node("Sub", ["m2", "trig"], ["d2"]),      # +inf: exp(100 x over)
              helper.make_node("Mul", ["d2", "hundred"], ["e2"]),
              helper.make_node("Exp", ["e2"], ["x2"]),
              helper.make_node("Add", ["y1", "x2"], ["y2"]),
              helper.make_node("Greater", ["m3", "trig"], ["o3"]),  # an index out of bounds
              helper.make_node("Cast", ["o3"], ["i3"], to=TensorProto.INT64),
              helper.make_node("Mul", ["i3", "far"], ["j3"]),
              helper.make_node("Gather", ["one_value", "j3"], ["v3"]),
              helper.make_node("Add", ["y2", "v3"], [out])]
    return inits, nodes


def make_model(path: str | Path, window: int = 8, channels: list[str] | int = 3,
               kind: str = "affine", batch: int | str = "batch",
               graph_window: int | None = None, graph_channels: int | None = None,
               mean: list[float] | None = None, std: list[float] | None = None,
               threshold: float = 0.05, name: str | None = None, **graph_kw) -> tuple[Path, ModelMeta]:
    """Write `path` (ONNX) and `path.json` (metadata, correct sha256); returns both."""
    path = Path(path)
    names = [f"c{i}" for i in range(channels)] if isinstance(channels, int) else list(channels)
    c = len(names)
    model = build_graph(graph_window or window, graph_channels or c, kind, batch, **graph_kw)
    onnx.save(model, str(path))
    meta = ModelMeta(
        name=name or f"tiny_{kind}", architecture=f"test-{kind}", window=window, channels=names,
        scaler=Scaler(mean=list(mean) if mean else [0.0] * c, std=list(std) if std else [1.0] * c),
        threshold=Threshold(value=threshold, method="fixed for tests"),
        onnx_sha256=sha256_file(path), opset=OPSET,
        input_name=graph_kw.get("input_name", "x"), output_name=graph_kw.get("output_name", "recon"),
        dynamic_batch=not isinstance(batch, int),
        tool={"name": "tests.onnx_factory", "version": "1"})
    meta.save(meta_path_for(path))
    return path, meta


def reseal(path: str | Path) -> None:
    """Rewrite the metadata's sha256 to match the file as it is now (to test damage past the checksum)."""
    from agent.model_meta import load_meta
    meta = load_meta(path, verify_checksum=False)
    meta.onnx_sha256 = sha256_file(path)
    meta.save(meta_path_for(path))

"""Import a PaddleX time-series anomaly-detection inference folder as ONNX + our metadata.

A PaddleX folder (``DLinear_ad_infer/``) holds ``inference.json`` (Paddle 3 PIR program)
or ``inference.pdmodel`` (older), ``inference.pdiparams``, ``inference.yml`` and, when
the model was trained with scaling, ``scaler.pkl`` (a scikit-learn scaler saved by
joblib).  This module turns it into a model that satisfies agent/model_meta.py:

* the Paddle program goes through paddle2onnx; the graph is then edited to our
  signature: PaddleTS networks take a dict of tensors (anomaly models: only
  ``observed_cov_numeric``) and return ``(reconstruction, input)``, so the one input
  is renamed ``x``, output 0 becomes ``recon``, the other outputs and the nodes only
  they used are removed;
* ``inference.yml`` gives window (``size.in_chunk_len``), channel order
  (``info_params.feature_cols``) and threshold (``model_threshold``); PaddleTS writes
  input shapes as Python tuples (``!!python/tuple``), the only non-standard tag read;
* ``scaler.pkl`` is unpickled here, once, and stored as plain numbers: the runtime
  never unpickles.  Unpickling runs code: import only folders you trust.

Paddle, paddle2onnx and joblib are imported lazily: they live in a separate virtual
environment (export/recipes/paddle_env.sh) because paddle2onnx pins an older onnx than
the torch export tools use.  Reading the YAML and the folder layout needs neither.
"""
from __future__ import annotations

import datetime as dt
import os
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from agent.model_meta import ModelMeta, Scaler, Threshold, meta_path_for, sha256_file
from export.parity import compare, ort_session
from export.paddlex_folder import (SCALER_FILE, PaddleXFolder, PaddleXImportError, read_folder,
                                   read_scaler)
from export.publish import publish


TOOL_NAME = "tsad-export paddlex"
INPUT_NAME = "x"
OUTPUT_NAME = "recon"
PARITY_TOL = 1e-4


# ------------------------------------------------------------------ graph
def convert_program(model_file: Path, params_file: Path, opset: int):
    """paddle2onnx on the saved program; returns an onnx.ModelProto (opset raised if needed)."""
    try:
        import onnx
        import paddle2onnx
    except ImportError as e:
        raise PaddleXImportError(f"{e.name} is not installed: importing PaddleX models needs "
                                 "paddlepaddle and paddle2onnx (run export/recipes/paddle_env.sh "
                                 "and use .venv-paddle/bin/tsad-export)") from None
    try:
        # save_file=None: return the bytes; saving would run paddle2onnx's optional
        # polygraphy pass, which may try to pip-install its own dependencies.
        blob = paddle2onnx.export(str(model_file), str(params_file), None, opset_version=opset,
                                  auto_upgrade_opset=True, enable_onnx_checker=True,
                                  enable_optimize=True)
    except Exception as e:  # paddle2onnx logs the cause, then fails with whatever follows
        raise PaddleXImportError(f"{model_file}: paddle2onnx failed: {type(e).__name__}: {e}") from None
    if not blob:
        raise PaddleXImportError(f"{model_file}: paddle2onnx produced no model (see its log above)")
    return onnx.load_from_string(blob)


def _subgraph_names(node) -> set[str]:
    """Every tensor name a node's subgraphs (If/Loop/Scan bodies) read."""
    import onnx
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for n in g.node:
                names.update(n.input)
                names |= _subgraph_names(n)
    return names


def _rename(graph, old: str, new: str) -> None:
    import onnx
    for n in graph.node:
        n.input[:] = [new if i == old else i for i in n.input]
        n.output[:] = [new if o == old else o for o in n.output]
        for attr in n.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for g in subs:
                _rename(g, old, new)
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        if v.name == old:
            v.name = new


def _prune(graph) -> list[str]:
    """Drop nodes and initializers no graph output depends on; returns the removed node types."""
    needed = {o.name for o in graph.output}
    keep = []
    for n in reversed(graph.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(n.input)
            needed |= _subgraph_names(n)
    removed = [n.op_type for n in graph.node if n not in keep]
    kept = list(reversed(keep))
    del graph.node[:]
    graph.node.extend(kept)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    vis = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(vis)
    return removed


def _set_shape(value, window: int, n_channels: int) -> None:
    dims = value.type.tensor_type.shape.dim
    while len(dims) < 3:
        dims.add()
    dims[0].Clear()
    dims[0].dim_param = "batch"
    dims[1].dim_value = window
    dims[2].dim_value = n_channels


def to_contract(model, series_input: str, window: int, n_channels: int) -> dict:
    """Edit `model` in place to input "x" / output "recon"; returns what was done."""
    import onnx
    g = model.graph
    init_names = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in init_names]
    names = [i.name for i in inputs]
    if series_input not in names:
        raise PaddleXImportError(f"converted graph inputs are {names}, expected {series_input!r} "
                                 "(from inference.yml input_data)")
    if len(names) != 1:
        raise PaddleXImportError(f"converted graph has inputs {names}; the runtime feeds one")
    x = inputs[0]
    if x.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise PaddleXImportError(f"input {series_input!r} is not float32")
    dims = x.type.tensor_type.shape.dim
    shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in dims]
    if len(dims) != 3 or any(isinstance(s, int) and s > 0 and s != want
                             for s, want in zip(shape[1:], (window, n_channels))):
        raise PaddleXImportError(f"input {series_input!r} has shape {shape}, expected "
                                 f"[batch, {window}, {n_channels}]")
    if isinstance(shape[0], int) and shape[0] > 0:
        raise PaddleXImportError(f"input {series_input!r} has a fixed batch of {shape[0]}; "
                                 "export the PaddleX model with a dynamic batch (None)")
    outputs = [o.name for o in g.output]
    if not outputs:
        raise PaddleXImportError("converted graph has no outputs")
    recon = outputs[0]
    if recon == series_input:
        raise PaddleXImportError("the model's first output is its input unchanged, not a reconstruction")
    if g.output[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise PaddleXImportError(f"output {recon!r} is not float32")
    taken = {t for n in g.node for t in list(n.input) + list(n.output)} | init_names
    for new, old in ((INPUT_NAME, series_input), (OUTPUT_NAME, recon)):
        if new in taken and new != old:
            raise PaddleXImportError(f"converted graph already has a tensor named {new!r}")
    dropped = outputs[1:]
    keep_out = g.output[0]
    del g.output[:]
    g.output.append(keep_out)
    removed = _prune(g)
    _rename(g, series_input, INPUT_NAME)
    _rename(g, recon, OUTPUT_NAME)
    _set_shape(g.input[[i.name for i in g.input].index(INPUT_NAME)], window, n_channels)
    _set_shape(g.output[0], window, n_channels)
    return {"input_renamed": {series_input: INPUT_NAME}, "output_renamed": {recon: OUTPUT_NAME},
            "outputs_dropped": dropped, "nodes_pruned": len(removed)}


def default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def count_parameters(model) -> int:
    """Float weights in the graph (paddle2onnx stores them as initializers or Constants)."""
    import onnx
    from onnx import numpy_helper
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats)
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in floats:
                    total += int(numpy_helper.to_array(a.t).size)
    return total


# ------------------------------------------------------------------ parity
def paddle_predict(folder: PaddleXFolder, windows: np.ndarray) -> np.ndarray:
    """Output 0 of the saved program through Paddle Inference, as PaddleX runs it."""
    import paddle.inference as pi
    cfg = pi.Config(str(folder.model_file), str(folder.params_file))
    cfg.disable_gpu()
    cfg.disable_glog_info()
    cfg.set_cpu_math_library_num_threads(1)
    predictor = pi.create_predictor(cfg)
    name = predictor.get_input_names()
    if name != [folder.series_input]:
        raise PaddleXImportError(f"{folder.model_file}: program inputs are {name}, "
                                 f"expected [{folder.series_input!r}]")
    h = predictor.get_input_handle(name[0])
    h.reshape(list(windows.shape))
    h.copy_from_cpu(np.ascontiguousarray(windows, dtype=np.float32))
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


def parity_check(folder: PaddleXFolder, onnx_path: Path, windows: np.ndarray | None,
                 tol: float = PARITY_TOL) -> dict:
    """Max |ORT - Paddle| on batch 1, up to 64 real windows and 4 random N(0,1) windows."""
    sess = ort_session(onnx_path)
    rng = np.random.default_rng(0)
    shape = (folder.window, len(folder.channels))
    cases = {"random batch 1": rng.standard_normal((1,) + shape),
             "random batch 4": rng.standard_normal((4,) + shape)}
    if windows is not None and len(windows):
        cases[f"data batch {min(len(windows), 64)}"] = windows[:64]
    worst = 0.0
    for label, batch in cases.items():
        batch = np.asarray(batch, dtype=np.float32)
        expected = paddle_predict(folder, batch)
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        if got.shape != batch.shape:
            raise PaddleXImportError(f"{label}: ONNX output {got.shape}, input {batch.shape}")
        worst = max(worst, compare(got, expected, label, tol, "Paddle", PaddleXImportError))
    return {"max_abs_diff": worst, "cases": list(cases)}


def data_windows(paths: list[str], channels: list[str], mean: list[float], std: list[float],
                 window: int, limit: int = 64) -> np.ndarray:
    """Up to `limit` scaled windows spread over the given CSV files."""
    from export.data import load_files
    files, _ = load_files(paths, channels, None)
    out = []
    for f in files:
        x = (f.values - np.asarray(mean)) / np.asarray(std)
        n = len(x) - window + 1
        if n > 0:
            starts = np.linspace(0, n - 1, min(n, max(1, limit // len(files)))).astype(int)
            out.extend(x[s:s + window] for s in starts)
    if not out:
        raise PaddleXImportError(f"no data file holds a full window of {window} rows")
    return np.stack(out)


# ------------------------------------------------------------------ the whole import
def _tool_info() -> dict:
    info = {"name": TOOL_NAME}
    for pkg, key in (("tsad-agent", "version"), ("paddlepaddle", "paddle"), ("paddle2onnx", "paddle2onnx")):
        try:
            info[key] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            info[key] = "unknown"
    return info


SCORE_NOTE = ("PaddleX labels point t of its input window with mean_c (recon[t,c] - x[t,c])^2 "
              "(scaled space, float64) >= model_threshold; the runtime's score "
              "mse_last_step_scaled is that same per-point quantity taken at the newest step of "
              "each sliding window, so threshold.value is model_threshold unchanged")


def import_folder(folder: str | Path, out: str | Path, name: str | None = None, opset: int = 17,
                  data: list[str] | None = None) -> ModelMeta:
    """Convert, edit, parity-check and write ``out`` + ``out.json``: all or nothing."""
    import onnx
    from export.data import check_writable
    out = Path(out)
    check_writable(out)
    px = read_folder(folder)
    n = len(px.channels)
    if px.scaler_file is not None:
        mean, std, kind = read_scaler(px.scaler_file, n)
        scaling = (f"{kind} from {SCALER_FILE} (mean_/scale_ copied; PaddleX applies it to "
                   "feature_cols before the model)")
    else:
        mean, std, kind = [0.0] * n, [1.0] * n, None
        scaling = "none: inference.yml says scale: false, the model sees raw values"

    model = convert_program(px.model_file, px.params_file, opset)
    edits = to_contract(model, px.series_input, px.window, n)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise PaddleXImportError(f"{px.path}: edited graph is invalid: {e}") from None
    windows = data_windows(data, px.channels, mean, std, px.window) if data else None

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.onnx")
    tmp_meta = meta_path_for(tmp)
    try:
        onnx.save(model, str(tmp))
        parity = parity_check(px, tmp, windows)
        hyper = {"paddlex": {
            "series_input": px.series_input, "time_col": px.time_col, "freq": px.freq,
            "feature_cols": px.channels, "model_threshold": px.threshold,
            "graph_edits": edits}}
        training = {
            "source": "PaddleX inference folder",
            "folder": str(px.path),
            "files": [{"path": str(p), "sha256": sha256_file(p)} for p in px.files()],
            "scaling": scaling,
            "scaler_kind": kind,
            "score": SCORE_NOTE,
            "parity_max_abs_diff": parity["max_abs_diff"],
            "parity_cases": parity["cases"],
            "parity_data": [str(p) for p in data] if data else None,
        }
        meta = ModelMeta(
            name=name or px.name, architecture=px.architecture, window=px.window,
            channels=px.channels, scaler=Scaler(mean=mean, std=std),
            threshold=Threshold(value=px.threshold,
                                method="PaddleX model_threshold from inference.yml, unchanged"),
            onnx_sha256=sha256_file(tmp), opset=default_opset(model), hyperparameters=hyper,
            training=training, tool=_tool_info(),
            exported_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            parameters=count_parameters(model))
        publish(meta, tmp, tmp_meta, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
    return meta

"""Dynamic int8 quantization with an honest report: size, latency, score agreement.

Never the default model: the report says how far int8 scores drift from fp32 on
real windows, and the threshold is rescaled so alarms stay at the same quantile.
"""
from __future__ import annotations

import copy
import datetime as dt
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from agent.model_meta import load_meta, meta_path_for, sha256_file
from agent.contract import DEFAULT_STD_FLOOR, StreamScaler, fit_scaler, score_windows
from export.data import DataError, check_writable, load_files, scale, windows
from export.verify import VerifyError, open_session, verify_model

MAX_WINDOWS = 2000
LATENCY_RUNS = 200
WEIGHTED_OPS = ("MatMul", "Gemm", "Conv")


def weighted_nodes(path: Path) -> tuple[list[str], list[str]]:
    """(MatMul/Gemm/Conv nodes whose weight, the second input, is stored in the file;
    the others).  Dynamic int8 only quantizes stored weights: it raises on a Conv whose
    weight the graph computes (TimesNet_ad's Inception block averages its kernels) and
    leaves a MatMul with its constant on the left (DLinear_ad's folded map) as it was."""
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    stored = {i.name for i in m.graph.initializer}
    ok, other = [], []
    for n in m.graph.node:
        if n.op_type in WEIGHTED_OPS:
            (ok if len(n.input) > 1 and n.input[1] in stored else other).append(n.name)
    return ok, other


def _real_windows(data: list[str], meta, calib_rows: int) -> np.ndarray:
    files, _ = load_files(data, meta.channels, None)
    out = []
    for f in files:
        if calib_rows:
            # the scaler a stream calibrated on these rows would get
            sc = fit_scaler(f.values[:calib_rows], np.asarray(meta.scaler.std), DEFAULT_STD_FLOOR,
                            meta.calibration_std_scale)
        else:
            sc = StreamScaler.from_meta(meta)
        out.append(windows(scale(f.values, sc.mean, sc.std), meta.window))
    w = np.concatenate(out).astype(np.float32)
    if len(w) == 0:
        raise DataError(f"no file in --data holds a full window of {meta.window} rows")
    idx = np.linspace(0, len(w) - 1, min(MAX_WINDOWS, len(w))).astype(int)
    return np.ascontiguousarray(w[idx])


def _scores(sess, meta, w: np.ndarray) -> np.ndarray:
    recon = np.concatenate([sess.run([meta.output_name], {meta.input_name: w[i:i + 256]})[0]
                            for i in range(0, len(w), 256)])
    return score_windows(w, recon)[0]


def _latency_ms(sess, meta, w: np.ndarray) -> float:
    one = w[:1]
    sess.run([meta.output_name], {meta.input_name: one})
    times = []
    for _ in range(LATENCY_RUNS):
        t = time.perf_counter()
        sess.run([meta.output_name], {meta.input_name: one})
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def quantize_model(src: Path, out: Path, data: list[str], calib_rows: int = 400) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    meta = load_meta(src)
    check_writable(out)
    ok, other = weighted_nodes(src)
    if not ok:
        raise VerifyError(
            f"{src}: nothing to quantize: none of its {len(other)} MatMul/Gemm/Conv node(s) "
            f"has a stored weight as its second input, which is all dynamic int8 quantizes; "
            f"keep the fp32 model")
    w = _real_windows(data, meta, calib_rows)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.onnx")
    tmp_meta = meta_path_for(tmp)
    try:
        try:
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8,
                             nodes_to_exclude=other)
        except Exception as e:  # the quantizer raises bare Exceptions for unsupported graphs
            raise VerifyError(f"{src}: dynamic int8 quantization failed: {e}") from None
        import onnx
        n_int8 = sum(n.op_type in ("MatMulInteger", "ConvInteger")
                     for n in onnx.load(str(tmp)).graph.node)
        fp, q = open_session(src), open_session(tmp)
        s_fp, s_q = _scores(fp, meta, w), _scores(q, meta, w)
        rho = spearman(s_fp, s_q)
        p = meta.threshold.quantile or 0.99
        ratio = float(np.quantile(s_q, p) / max(np.quantile(s_fp, p), 1e-300))
        report = {
            "model": str(out), "source": str(src), "windows": int(len(w)),
            "bytes_fp32": src.stat().st_size, "bytes_int8": tmp.stat().st_size,
            "latency_ms_median_fp32": round(_latency_ms(fp, meta, w), 4),
            "latency_ms_median_int8": round(_latency_ms(q, meta, w), 4),
            "spearman_scores": round(rho, 5),
            "nodes_int8": n_int8, "nodes_fp32_kept": len(other),
            "threshold_fp32": meta.threshold.value, "threshold_int8": meta.threshold.value * ratio,
        }
        qmeta = copy.deepcopy(meta)
        qmeta.name = f"{meta.name}-int8"
        qmeta.onnx_sha256 = sha256_file(tmp)
        qmeta.threshold.value = report["threshold_int8"]
        qmeta.threshold.method = (
            f"{meta.threshold.method}, rescaled x{ratio:.4f} = quantile({p}) of int8 / fp32 scores "
            f"on {len(w)} windows of {', '.join(data)}")
        qmeta.training["quantization"] = {
            "method": "onnxruntime.quantization.quantize_dynamic, weights QInt8",
            "from_sha256": meta.onnx_sha256, "spearman_scores": report["spearman_scores"],
            "nodes_int8": n_int8, "nodes_fp32_kept": len(other),
            "calib_rows": calib_rows}
        qmeta.exported_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        qmeta.save(tmp_meta)
        verify_model(tmp)
        os.replace(tmp, out)
        os.replace(tmp_meta, meta_path_for(out))
    finally:
        tmp.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
    return report

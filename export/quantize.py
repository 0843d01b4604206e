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
from export.data import DataError, check_writable, fit_scaler, load_files, scale, windows
from export.verify import VerifyError, open_session, verify_model

MAX_WINDOWS = 2000
LATENCY_RUNS = 200


def _real_windows(data: list[str], meta, calib_rows: int) -> np.ndarray:
    files, _ = load_files(data, meta.channels, None)
    out = []
    for f in files:
        if calib_rows:
            mean, std = fit_scaler([f.values[:calib_rows]])
        else:
            mean, std = np.array(meta.scaler.mean), np.array(meta.scaler.std)
        out.append(windows(scale(f.values, mean, std), meta.window))
    w = np.concatenate(out).astype(np.float32)
    if len(w) == 0:
        raise DataError(f"no file in --data holds a full window of {meta.window} rows")
    idx = np.linspace(0, len(w) - 1, min(MAX_WINDOWS, len(w))).astype(int)
    return np.ascontiguousarray(w[idx])


def _scores(sess, meta, w: np.ndarray) -> np.ndarray:
    recon = np.concatenate([sess.run([meta.output_name], {meta.input_name: w[i:i + 256]})[0]
                            for i in range(0, len(w), 256)])
    err = (recon[:, -1, :].astype(np.float64) - w[:, -1, :].astype(np.float64)) ** 2
    return err.mean(axis=1)


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
    w = _real_windows(data, meta, calib_rows)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.onnx")
    tmp_meta = meta_path_for(tmp)
    try:
        try:
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
        except Exception as e:  # the quantizer raises bare Exceptions for unsupported graphs
            raise VerifyError(f"{src}: dynamic int8 quantization failed: {e}") from None
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

"""Execution-provider plug-ins, chosen by config name (like Frigate's detectors).

The config lists providers in order of preference; `resolve` keeps the ones this
onnxruntime build actually has (onnxruntime, onnxruntime-gpu and
onnxruntime-openvino are separate wheels that ship the same module) and always
ends with CPU, so a model loads on any machine.
"""
from __future__ import annotations

import logging

import onnxruntime as ort

log = logging.getLogger(__name__)

PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
CPU = PROVIDERS["cpu"]

# Defaults chosen for a small model on an edge box.  cuDNN's exhaustive algorithm
# search costs seconds at load for no gain on tiny convolutions; TensorRT builds
# engines for minutes, so cache them (relative to the working directory unless
# the caller passes an absolute path via `options`).
DEFAULT_OPTIONS: dict[str, dict] = {
    "cuda": {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC"},
    "tensorrt": {"device_id": 0, "trt_engine_cache_enable": True,
                 "trt_engine_cache_path": "trt_cache"},
    "openvino": {},
    "cpu": {},
}


def resolve(requested: list[str], options: dict[str, dict] | None = None) -> list[tuple[str, dict]]:
    """ORT provider names with their options: the installed ones of `requested`, in order, CPU last.

    `options` (config name -> dict) is merged over DEFAULT_OPTIONS.  Skipped
    providers are logged with the reason; CPU is appended when missing and moved
    to the end when listed earlier, because nothing after it would ever be used.
    """
    available = set(ort.get_available_providers())
    options = options or {}
    out: list[tuple[str, dict]] = []
    seen: set[str] = set()
    for i, name in enumerate(requested):
        key = name.lower()
        if key in seen:
            continue
        seen.add(key)
        if key == "cpu":
            if i != len(requested) - 1:
                log.warning("execution provider 'cpu' is listed before %s; CPU is always tried last",
                            ", ".join(repr(r) for r in requested[i + 1:]))
            continue
        ep = PROVIDERS.get(key)
        if ep is None:
            log.warning("execution provider %r skipped: unknown name (known: %s)",
                        name, ", ".join(PROVIDERS))
            continue
        if ep not in available:
            log.warning("execution provider %r skipped: %s is not in this onnxruntime build "
                        "(available: %s; install %s)", name, ep, ", ".join(sorted(available)),
                        {"cuda": "onnxruntime-gpu", "tensorrt": "onnxruntime-gpu + TensorRT",
                         "openvino": "onnxruntime-openvino"}[key])
            continue
        out.append((ep, {**DEFAULT_OPTIONS[key], **options.get(key, {})}))
    out.append((CPU, {**DEFAULT_OPTIONS["cpu"], **options.get("cpu", {})}))
    return out

"""A trained model as files: its metadata, the ONNX export (parity-checked, written
all or nothing) and the torch checkpoint that `tsad-export convert` reads back."""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import asdict
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import torch

from agent.model_meta import ModelMeta, Scaler, Threshold, meta_path_for, sha256_file
from export.data import check_writable
from export.publish import publish

TOOL_NAME = "tsad-export"
CHECKPOINT_FORMAT = "tsad-checkpoint"


def tool_info() -> dict:
    try:
        version = importlib_metadata.version("tsad-agent")
    except importlib_metadata.PackageNotFoundError:
        version = "unknown"
    return {"name": TOOL_NAME, "version": version, "torch": torch.__version__}


def build_meta(name: str, architecture: str, window: int, channels: list[str], scaler: Scaler,
               threshold: Threshold, hyperparameters: dict, training: dict,
               parameters: int, calibration_std_scale: list[float] | None = None,
               calibration_margin: float | None = None) -> ModelMeta:
    """Metadata minus what only the exported file knows (sha256, opset)."""
    return ModelMeta(
        name=name, architecture=architecture, window=window, channels=list(channels),
        scaler=scaler, threshold=threshold, onnx_sha256="0" * 64, opset=0,
        hyperparameters=hyperparameters, training=training, tool=tool_info(),
        exported_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        parameters=parameters, calibration_std_scale=calibration_std_scale,
        calibration_margin=calibration_margin)


def write_model(model: torch.nn.Module, meta: ModelMeta, out: Path, parity_windows: np.ndarray,
                opset: int = 17) -> ModelMeta:
    """Export, parity-check and write ``out`` + ``out.json`` atomically: all or nothing."""
    from export.onnx_export import export_onnx, parity_check
    check_writable(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.onnx")
    tmp_meta = meta_path_for(tmp)
    leftovers = [tmp, tmp_meta, Path(str(tmp) + ".data")]
    try:
        model.eval()
        meta.opset = int(export_onnx(model, tmp, meta.window, meta.n_channels, opset=opset))
        diff = parity_check(model, tmp, parity_windows, shown=out)
        meta.training["parity_max_abs_diff"] = float(diff)
        meta.onnx_sha256 = sha256_file(tmp)
        publish(meta, tmp, tmp_meta, out)
    finally:
        for p in leftovers:
            p.unlink(missing_ok=True)
    return meta


def make_checkpoint(model: torch.nn.Module, meta: ModelMeta, parity_windows: np.ndarray) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "model": meta.training["model"],
        "name": meta.name,
        "architecture": meta.architecture,
        "window": meta.window,
        "channels": list(meta.channels),
        "hparams": dict(meta.hyperparameters),
        "state_dict": model.state_dict(),
        "scaler": asdict(meta.scaler),
        "threshold": asdict(meta.threshold),
        "training": dict(meta.training),
        "parameters": meta.parameters,
        "calibration_std_scale": meta.calibration_std_scale,
        "calibration_margin": meta.calibration_margin,
        "parity_windows": torch.from_numpy(np.ascontiguousarray(parity_windows)),
    }


def save_checkpoint(ckpt: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

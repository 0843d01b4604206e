"""`tsad-export convert`: a checkpoint saved by `train --save-checkpoint` back to ONNX +
metadata, with the same parity check as a fresh export."""
from __future__ import annotations

from pathlib import Path

from export import package as P
from export.data import check_writable
from export.fit import seed_everything
from export.onnx_export import count_parameters
from export.train import TrainError, build


def convert_checkpoint(checkpoint: str | Path, out: str | Path, opset: int = 17,
                       threads: int = 1) -> dict:
    import torch
    path, out = Path(checkpoint), Path(out)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainError(f"{path}: checkpoint not found") from None
    except Exception as e:  # torch raises many types for a bad pickle/zip
        raise TrainError(f"{path}: not a readable torch checkpoint: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != P.CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a tsad-export checkpoint (save one with train "
                         f"--save-checkpoint)")
    check_writable(out)
    seed_everything(0, threads)
    model = build(ckpt["name"], ckpt["window"], len(ckpt["channels"]), ckpt["hparams"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise TrainError(f"{path}: weights do not fit {ckpt['name']}{ckpt['hparams']}: {e}") from None
    training = dict(ckpt["training"], converted_from=str(path))
    meta = P.build_meta(ckpt["name"], ckpt["architecture"], ckpt["window"], ckpt["channels"],
                        P.Scaler(**ckpt["scaler"]), P.Threshold(**ckpt["threshold"]),
                        ckpt["hparams"], training, int(count_parameters(model)),
                        ckpt.get("calibration_std_scale"), ckpt.get("calibration_margin"))
    meta = P.write_model(model, meta, out, ckpt["parity_windows"].numpy(), opset=opset)
    return {"model": str(out), "onnx_sha256": meta.onnx_sha256, "opset": meta.opset}

"""`tsad-export convert`: a checkpoint saved by `train --save-checkpoint` back to ONNX +
metadata, with the same parity check as a fresh export."""
from __future__ import annotations

from pathlib import Path

from export import package as P
from export.data import check_writable
from export.fit import seed_everything
from export.onnx_export import count_parameters
from export.train import TrainError, build

# What convert reads from a checkpoint, by type (parity_windows, a tensor, is checked
# apart): a hand-edited or foreign dict fails here in one line, not deep in the export.
_FIELDS = {"name": str, "architecture": str, "window": int, "channels": list, "hparams": dict,
           "state_dict": dict, "scaler": dict, "threshold": dict, "training": dict}


def _incomplete(path: Path, why: str) -> TrainError:
    return TrainError(f"{path}: not a complete tsad-export checkpoint ({why})")


def _unreadable(path: Path, e: Exception) -> str:
    if path.stat().st_size == 0:
        return "empty file"
    # torch's legacy pickle reader fails on a foreign file with a bare byte value (KeyError
    # 101 for a text file) or with nothing to say
    if isinstance(e, (KeyError, EOFError)) or not str(e).strip():
        return "cut short, or some other format"
    return str(e)


def _load(path: Path) -> dict:
    import torch
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainError(f"{path}: checkpoint not found") from None
    except Exception as e:  # torch raises many types for a bad pickle/zip
        raise TrainError(f"{path}: not a readable torch checkpoint: {_unreadable(path, e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != P.CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a tsad-export checkpoint (save one with train "
                         f"--save-checkpoint)")
    from export.models import REGISTRY
    for key, kind in _FIELDS.items():
        if not isinstance(ckpt.get(key), kind):
            got = "missing" if key not in ckpt else f"a {type(ckpt[key]).__name__}"
            raise _incomplete(path, f"{key!r} {got}, expected a {kind.__name__}")
    if not isinstance(ckpt.get("parity_windows"), torch.Tensor):
        raise _incomplete(path, "'parity_windows' missing or not a tensor")
    # checkpoints saved before train --name: the model's name was its architecture's
    ckpt.setdefault("model", ckpt["name"])
    if not isinstance(ckpt["model"], str) or ckpt["model"] not in REGISTRY:
        raise _incomplete(path, f"unknown model {ckpt['model']!r}; known: {', '.join(REGISTRY)}")
    return ckpt


def _scaler_threshold(ckpt: dict, path: Path) -> tuple[P.Scaler, P.Threshold]:
    try:
        return P.Scaler(**ckpt["scaler"]), P.Threshold(**ckpt["threshold"])
    except TypeError as e:      # a key missing or one the dataclass does not know
        raise _incomplete(path, f"invalid 'scaler' or 'threshold': {e}") from None


def convert_checkpoint(checkpoint: str | Path, out: str | Path, opset: int = 17,
                       threads: int = 1) -> dict:
    path, out = Path(checkpoint), Path(out)
    ckpt = _load(path)
    scaler, threshold = _scaler_threshold(ckpt, path)
    check_writable(out)
    seed_everything(0, threads)
    model = build(ckpt["model"], ckpt["window"], len(ckpt["channels"]), ckpt["hparams"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise TrainError(f"{path}: weights do not fit {ckpt['model']}{ckpt['hparams']}: {e}") from None
    training = dict(ckpt["training"], converted_from=str(path))
    meta = P.build_meta(ckpt["name"], ckpt["architecture"], ckpt["window"], ckpt["channels"],
                        scaler, threshold, ckpt["hparams"], training, int(count_parameters(model)),
                        ckpt.get("calibration_std_scale"), ckpt.get("calibration_margin"))
    meta = P.write_model(model, meta, out, ckpt["parity_windows"].numpy(), opset=opset)
    return {"model": str(out), "onnx_sha256": meta.onnx_sha256, "opset": meta.opset}

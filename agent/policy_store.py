"""Where a fitted policy goes (agent/policy_fit.py): the model's metadata file, with the
recordings it was fitted on named by path and sha256, so that a policy says what it came
from and a changed recording shows."""
from __future__ import annotations

import json
from pathlib import Path

from .model_meta import meta_path_for, sha256_file


def files_record(files: list[Path], data_root: Path | None) -> list[dict]:
    root = data_root or Path(*Path(files[0]).resolve().parts[:-1])
    return [{"path": _rel(f, root), "sha256": sha256_file(f)} for f in files]


def _rel(f: Path, root: Path) -> str:
    try:
        return Path(f).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return Path(f).name


def write_policy(model: str, policy: dict) -> Path:
    """Store the policy in the model's metadata (the ONNX file and its sha256 unchanged)."""
    p = meta_path_for(model)
    d = json.loads(p.read_text())
    d["policy"] = policy
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(d, indent=2) + "\n")
    tmp.replace(p)
    return p

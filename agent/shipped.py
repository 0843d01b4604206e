"""What the package ships, and where it lies: the models, the example config, the demo recording.

Rules:
- An installed package (a wheel, or `pip install DIR`) finds its models through
  importlib.resources in `agent.shipped_models`, which pyproject.toml maps onto the
  repository's models_onnx/ folder; an editable install maps it the same way.
- A source checkout (pyproject.toml beside the `agent` package) uses its own models_onnx/
  first, never the folder that some other checkout's editable install points to: the code
  that runs and the models it runs are always from the same tree.
- A shipped model is named by its path below that folder without `.onnx`:
  `DLinear_ad`, `tep/DLinear_ad`.  A name never shadows a file: an existing file or any
  path ending in `.onnx` is taken as a path.
- Every path returned is a plain file (pip installs wheels unpacked), so ONNX Runtime opens
  it directly and the metadata `<model>.onnx.json` lies beside it.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

MODELS_PACKAGE = "agent.shipped_models"
_AGENT = Path(resources.files("agent"))
EXAMPLE_CONFIG = _AGENT / "examples" / "agent.yaml"
DEMO_CSV = _AGENT / "demo_data" / "skab_valve1_1.csv"


class ShippedModelError(ValueError):
    """A model name that is neither a file nor a shipped model; the message lists those shipped."""


def models_dir() -> Path | None:
    """The folder of shipped models, or None when this install carries none."""
    checkout = _AGENT.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "models_onnx").is_dir():
        return checkout / "models_onnx"
    try:
        return Path(resources.files(MODELS_PACKAGE))
    except ModuleNotFoundError:
        return None


def shipped_models() -> list[str]:
    """Names of the shipped models, subfolders included (`tep/DLinear_ad`), sorted."""
    root = models_dir()
    if root is None:
        return []
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.onnx"))


def resolve_model(name_or_path: str) -> str:
    """A path to an .onnx file as given, or a shipped model's name as its installed file."""
    p = Path(name_or_path)
    if p.suffix == ".onnx" or p.is_file():
        return str(p)
    names = shipped_models()
    if name_or_path in names:
        return str(models_dir() / f"{name_or_path}.onnx")
    raise ShippedModelError(f"model {name_or_path!r} is neither a file nor a shipped model "
                            f"({', '.join(names) or 'none shipped'})")

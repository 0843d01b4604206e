"""Moving a finished model into place: the ONNX file and its metadata, both or neither."""
from __future__ import annotations

import os
from pathlib import Path

from agent.model_meta import ModelMeta, meta_path_for


def publish(meta: ModelMeta, tmp_onnx: Path, tmp_meta: Path, out: Path) -> None:
    """Validate `meta`, write it, and rename both temporaries over `out` and its .json.

    A model without valid metadata is useless to the runtime, so if the second rename
    fails the first is undone."""
    meta.validate(str(out))
    meta.save(tmp_meta)
    os.replace(tmp_onnx, out)
    try:
        os.replace(tmp_meta, meta_path_for(out))
    except OSError:
        Path(out).unlink(missing_ok=True)
        raise

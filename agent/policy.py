"""A model's default detection policy, and how a stream's settings are resolved from it.

Precedence, per key: the agent's built-in defaults, then the model's policy (its
metadata `policy.settings`: what its trainer measured works for it), then what the
agent's configuration sets explicitly.  So `tsad-agent evaluate FILES -m MODEL` and
`replay` with no flags run the model as its trainer meant, and any key a plant sets
in its config still wins.  Every entry point builds its engine through `effective`.
"""
from __future__ import annotations

import msgspec

from . import __version__
from .config import DetectionConfig
from .config_base import keys_set
from .config_build import Invalid, build, fmt_path
from .model_meta import ModelMeta, ModelMetaError

SECTIONS = ("buffer", "scoring", "calibration", "adaptation", "alerts")


def model_policy(meta: ModelMeta) -> dict:
    """The model's policy settings.  A model without one that was trained on per-block
    scaled data (training.calibration_rows) still needs that learning period: its
    scaler means nothing on raw data without it."""
    if meta.policy is not None:
        return meta.policy.get("settings", {})
    n = meta.training.get("calibration_rows")
    return {"calibration": {"enabled": True, "samples": n}} \
        if isinstance(n, int) and n > 0 else {}


def effective(cfg: DetectionConfig, meta: ModelMeta) -> DetectionConfig:
    """`cfg` with every key it leaves at its default taken from the model's policy;
    ModelMetaError, naming the key, when the policy holds one the agent does not accept."""
    policy = model_policy(meta) if cfg.model_policy else {}
    if not policy:
        return cfg
    d: dict = {"node": cfg.node}
    for sec in SECTIONS:
        mine = getattr(cfg, sec)
        d[sec] = {**policy.get(sec, {}), **{k: getattr(mine, k) for k in keys_set(mine)}}
    try:
        # `running` names a plant's own channel: no model's policy sets it
        return msgspec.structs.replace(build(DetectionConfig, d), running=cfg.running)
    except Invalid as e:
        # a model without a policy gets one from its training.calibration_rows: say so
        where = "policy.settings." if meta.policy is not None else \
            "training.calibration_rows sets the learning period: "
        path, text = e.found[0]
        if meta.policy is not None and text.startswith("unknown key"):
            # the config's own keys were checked when it loaded: this one is the policy's,
            # a setting a later version added, not a typo
            raise ModelMetaError(
                f"model {meta.name}: {where}{fmt_path(path)}: a key this agent (tsad-agent "
                f"{__version__}) does not know: the policy was likely written by a newer "
                f"tsad-export or fit-policy; upgrade the agent, or refit the policy with this "
                f"version (tsad-agent fit-policy MODEL --data ... --write)") from None
        raise ModelMetaError(f"model {meta.name}: {where}{e.problems[0]}") from None


def baseline_basis(cfg: DetectionConfig, meta: ModelMeta) -> dict:
    """What a stream's learned baseline (scaler, error level, threshold) depends on besides
    the model's ONNX bytes, which its sha256 covers: saved with it and compared when it is
    restored (state_store), so a policy refitted with `fit-policy --write`, a config key or
    a release that ships another policy for the same .onnx does not restore a threshold
    fitted on scores of another scale.  Here: what computes the scores the threshold was
    fitted on (scoring.normalize, smoothing, level_band; buffer.stride, which sets the
    span the smoothing covers), how the scaler, level and threshold were fitted (the
    calibration keys, the learning length, whether scoring.threshold fixes the threshold,
    which the saved record then holds), and the metadata numbers those fits read (the
    sha256 covers the .onnx alone, not its .json).  Not here: what only acts from the
    restore on (adaptation, whose state is saved with the baseline and moves it from
    there; alerts; buffer gaps and eviction; calibration.refine, which `Baseline.restore`
    resolves itself; a fixed threshold's value, which replaces the saved one at every
    restore).  Plain JSON values, keyed by the name a log line shows."""
    c, s = cfg.calibration, cfg.scoring
    return {
        "scoring.normalize": s.normalize, "scoring.smoothing": s.smoothing,
        "scoring.level_band": s.level_band, "buffer.stride": cfg.buffer.stride,
        "scoring.threshold": "model" if s.threshold == "model" else "fixed",
        "calibration.fit": c.fit, "calibration.threshold": c.threshold,
        "calibration.quantile": c.quantile, "calibration.margin": c.margin,
        "calibration.std_floor": c.std_floor,
        "calibration.samples": c.samples if c.duration_s is None else None,
        "calibration.duration_s": c.duration_s,
        "model.threshold": meta.threshold.value, "model.scaler.std": meta.scaler.std,
        "model.calibration_margin": meta.calibration_margin,
        "model.calibration_std_scale": meta.calibration_std_scale,
    }


def learning_rows(cfg: DetectionConfig) -> int:
    """The rows a file job's learning period holds back (0: no learning period, or one set
    by duration, whose length depends on the file's timestamps)."""
    c = cfg.calibration
    return c.samples if c.enabled and c.duration_s is None else 0

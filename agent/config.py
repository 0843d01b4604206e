"""Agent configuration: one YAML file, validated at load with precise errors.

Every error names the key path, the offending value, what was expected and
the YAML line.  Unknown keys are errors (a typo must not silently fall back to
a default on a machine nobody watches).
"""
from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from .config_base import STREAM_ID_PATTERN, ConfigError, Strict as _Strict
from .contract import DEFAULT_STD_FLOOR
from .metrics_server import MetricsConfig
from .mqtt_client import MqttConfig
from .shipped import resolve_model
from .sinks import SINKS
from .sources import SOURCES

# One optional section per sink plug-in under `sinks:` (the MQTT sink is configured by
# the top-level `mqtt:` section it shares with the MQTT sources' broker connection).
SinksConfig = create_model(
    "SinksConfig", __base__=_Strict,
    **{key: (cls.config_class | None if cls.default_config is None else cls.config_class,
             cls.default_config) for key, cls in SINKS.items() if cls.config_class is not None})


class StreamConfig(_Strict):
    id: str = Field(min_length=1, pattern=STREAM_ID_PATTERN)
    # the sensor's sampling interval, when known; else it is learned (buffer.gap_reset_s)
    interval_s: float | None = Field(None, gt=0)
    # the source plug-ins' config classes, told apart by their `type` key
    source: Annotated[Union[tuple(cls.config_class for cls in SOURCES.values())],
                      Field(discriminator="type")]


# ---------------------------------------------------------------- pipeline
class ModelConfig(_Strict):
    path: str                       # an .onnx file, or a shipped model's name (DLinear_ad)
    # tried in order; cpu is always the last resort
    providers: list[Literal["openvino", "cuda", "tensorrt", "cpu"]] = ["cpu"]
    threads: int = Field(1, ge=0)   # intra-op threads; 0 = ORT default
    verify_checksum: bool = True
    # 64: ORT's working memory grows with the batch (Nonstationary_ad at 256 windows: +113 MB,
    # at 64: +27 MB) while its cost per window is already flat from 16-64 windows up for the
    # larger models; the tiny ones lose ~1 us per window, small beside the pipeline's share.
    max_batch: int = Field(64, ge=1)
    # How long samples arriving after an engine step wait for the next one, so that a
    # step serves many samples per stream (its per-stream bookkeeping is paid per step,
    # not per message).  "auto": when samples arrived during the step, 9x its non-inference
    # duration, at most 1 s; else none, so a lone sample is stepped at once (agent/pipeline.py).
    batch_wait_s: Union[Literal["auto"], Annotated[float, Field(ge=0, le=5)]] = "auto"
    # take the detection keys this file leaves unset from the model's metadata policy
    policy: bool = True

    # A shipped name stands for the file inside the installed package, so a config written
    # after `pip install` needs no model copied by hand; the error lists the shipped names.
    @field_validator("path")
    @classmethod
    def _shipped_name(cls, v: str) -> str:
        return resolve_model(v)


class BufferConfig(_Strict):
    stride: int = Field(1, ge=1)          # infer every k samples
    ffill_max: int = Field(3, ge=0)       # forward-fill up to N consecutive missing values
    # restart the window after a longer time gap: "auto" = gap_factor x the stream's own
    # sampling interval (streams[].interval_s, else learned from its first samples), so a
    # 1 Hz sensor and a 3-minute historian poll are both judged by their own pace
    gap_reset_s: Union[Literal["auto"], Annotated[float, Field(gt=0)], None] = "auto"
    gap_factor: float = Field(10.0, ge=1)
    # a stream without samples this long is dropped from memory (its baseline stays on disk)
    idle_evict_s: float | None = Field(3600.0, gt=0)


class CalibrationConfig(_Strict):
    enabled: bool = False
    samples: int = Field(400, ge=10)
    # learning period by sample time instead of sample count (e.g. one shift)
    duration_s: float | None = Field(None, gt=0)
    quantile: float = Field(0.99, gt=0, lt=1)
    # x the model's own calibration_margin (metadata): chosen on SKAB valve1/ for models
    # exported with --drift-rows, whose factor already covers normal drift after calibration
    # (below 1 because k-of-n alerting already rejects isolated crossings)
    margin: float = Field(0.5, gt=0)
    # scaler std floor, as a fraction of the model's training std (keeps flat channels sane)
    std_floor: float = Field(DEFAULT_STD_FLOOR, ge=0)
    # what the learning period fits: the scaler (mean and std, for models trained on
    # per-block scaled data) or only the mean (models with one global scaler keep its std)
    fit: Literal["scaler", "mean"] = "scaler"
    # the threshold: fitted on the learning windows, or the model's own
    threshold: Literal["fit", "model"] = "fit"


class AdaptationConfig(_Strict):
    """After learning, the scaler mean follows slow normal change (agent/adaptation.py)."""
    enabled: bool = False
    time_constant_s: float = Field(3600.0, gt=0)
    # values further than this many stds from the current mean are not learned from
    gate: float = Field(4.0, gt=0)
    # the mean stays within learned mean +- max_shift x learned std (null: unbounded)
    max_shift: float | None = Field(None, gt=0)


class ScoringConfig(_Strict):
    # "model" = threshold from the model metadata (or calibration when enabled)
    threshold: Union[Literal["model"], Annotated[float, Field(gt=0)]] = "model"
    smoothing: int = Field(1, ge=1)       # moving average over the last k scores
    # "channel": each channel's error in units of its own typical error on this stream
    # (learned with the baseline, adapted with it), so a channel whose error is always
    # high or slowly rising does not drown the others; "none": the model's score as is
    normalize: Literal["none", "channel"] = "none"
    # k: a channel beyond +-k stds of its baseline adds the excess^2 (agent/scoring.py)
    level_band: float | None = Field(None, gt=0)


class AlertConfig(_Strict):
    open_k: int = Field(4, ge=1)          # k anomalous of the last n windows opens an alert
    open_n: int = Field(5, ge=1)
    close_m: int = Field(10, ge=1)        # m consecutive normal windows close it
    cooldown_s: float = Field(0.0, ge=0)  # no new alert on a stream within this after an end
    update_interval_s: float = Field(10.0, gt=0)
    top_channels: int = Field(3, ge=1)
    # an alert whose score has settled into a steady level for this long is "standing"
    standing_after_s: float = Field(600.0, gt=0)
    # a standing alert this old re-baselines its stream (a new learning period); null: never
    rebaseline_after_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _k_le_n(self):
        if self.open_k > self.open_n:
            raise ValueError(f"open_k ({self.open_k}) must be <= open_n ({self.open_n})")
        return self


# ---------------------------------------------------------------- outputs
class DetectionConfig(_Strict):
    """Everything the engine needs to turn samples into alerts (no sources, no outputs)."""
    node: str = Field("local", min_length=1, pattern=STREAM_ID_PATTERN)
    # keys left unset come from the model's default policy (agent/policy.py); false: the
    # agent's own defaults, the model as a bare scaler + network + threshold
    model_policy: bool = True
    buffer: BufferConfig = BufferConfig()
    scoring: ScoringConfig = ScoringConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    adaptation: AdaptationConfig = AdaptationConfig()
    alerts: AlertConfig = AlertConfig()


class AgentConfig(_Strict):
    node: str = Field(min_length=1, pattern=STREAM_ID_PATTERN)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # calibration and the alert outbox persist here; null = keep nothing (replay, evaluation)
    state_dir: str | None = "/var/lib/tsad-agent"
    model: ModelConfig
    streams: list[StreamConfig] = Field(min_length=1)
    buffer: BufferConfig = BufferConfig()
    scoring: ScoringConfig = ScoringConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    adaptation: AdaptationConfig = AdaptationConfig()
    alerts: AlertConfig = AlertConfig()
    mqtt: MqttConfig = MqttConfig()
    sinks: SinksConfig = SinksConfig()
    metrics: MetricsConfig = MetricsConfig()   # the daemon's Prometheus endpoint

    @field_validator("buffer", "scoring", "calibration", "adaptation", "alerts", "mqtt", "sinks",
                     "metrics", mode="before")
    @classmethod
    def _empty_section(cls, v):
        # a section whose keys are all commented out is YAML null: all its defaults
        return {} if v is None else v

    @field_validator("streams")
    @classmethod
    def _unique_ids(cls, v: list[StreamConfig]):
        ids = [s.id for s in v]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate stream id(s): {', '.join(dup)}")
        return v

    @property
    def detection(self) -> DetectionConfig:
        return DetectionConfig(node=self.node, model_policy=self.model.policy,
                               buffer=self.buffer, scoring=self.scoring,
                               calibration=self.calibration, adaptation=self.adaptation,
                               alerts=self.alerts)

    @property
    def topic_prefix(self) -> str:
        p = self.mqtt.prefix if self.mqtt.prefix is not None else f"tsad/{self.node}/"
        return p if p.endswith("/") else p + "/"


# ---------------------------------------------------------------- loading
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """SafeLoader whose bad scalars are YAML errors with a line, not crashes.

    PyYAML raises ValueError, IndexError, KeyError... when a scalar does not fit its
    explicit or implicit tag (`!!int x`, `!!bool maybe`, the date `2024-13-45`).
    """

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, IndexError, KeyError, AttributeError, TypeError, OverflowError):
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {_show(node.value)} as {node.tag.rsplit(':', 1)[-1]}",
                node.start_mark) from None


def _line_index(root: yaml.Node) -> tuple[dict[tuple, int], list[str]]:
    """Map each key path (as a tuple of keys/indices) to its 1-based YAML line, and
    list duplicate keys (safe_load silently keeps the last one).

    Each node is walked once: paths under the second use of an alias fall back to the
    line of the key that uses it, and a self-referencing or exponentially nested alias
    cannot make the walk loop or explode.
    """
    lines: dict[tuple, int] = {(): root.start_mark.line + 1}
    duplicates: list[str] = []
    # Keys as safe_load builds them ("1:" is the int 1), so paths match pydantic's.
    keys = _Loader("")
    walked: set[int] = set()

    def walk(node, path):
        if id(node) in walked:
            return
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.tag == _MERGE_TAG:       # "<<: *base": its keys live at the anchor
                    continue
                key = keys.construct_object(k, deep=True)
                try:
                    hash(key)
                except TypeError:             # construct_document reports it, with its line
                    continue
                p = path + (key,)
                if p in lines:
                    duplicates.append(f"{k.start_mark.line + 1}: {_fmt_path(p)}: duplicate "
                                      f"key (first on line {lines[p]}); remove one")
                    continue
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = path + (i,)
                lines[p] = v.start_mark.line + 1
                walk(v, p)

    walk(root, ())
    return lines, duplicates


_PLAIN_KEY = re.compile(r"[^\s.\[\]'\"]+")


def _fmt_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        elif isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:   # an empty, blank or odd key ("", "\r", null, 1.5) must stay visible
            out += f"[{part!r}]"
    return out or "(top level)"


# A password typed into the config by mistake ("password: hunter2") must not be echoed
# into logs by the error that rejects it.  The three *reference* keys hold a path, a
# variable name and a credential name, which are safe and useful to show.
_SECRET_KEY = re.compile(r"pass|secret|token|api_?key", re.I)
_REFERENCE_KEYS = {"password_file", "password_env", "password_credential"}


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and key not in _REFERENCE_KEYS and bool(_SECRET_KEY.search(key))


class _ValueRepr(reprlib.Repr):
    """Bounded repr (an alias-bomb value must not produce a gigabyte message) that
    hides the values of secret-looking keys."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist = 3, 8, 8
        self.maxstring, self.maxother = 120, 120

    def repr_dict(self, x, level):
        return super().repr_dict({k: ("<hidden>" if _is_secret_key(k) else v)
                                  for k, v in x.items()}, level)


def _show(value: Any, key: object = None) -> str:
    if _is_secret_key(key):
        return "<hidden>"
    shown = _ValueRepr().repr(value)
    return shown if len(shown) <= 300 else shown[:296] + " ..."


def _describe(err: dict, data: Any) -> tuple[tuple, str]:
    # pydantic adds the union tag ("serial", "mqtt"...) to the location; drop it so the
    # path is the one the user wrote.
    loc = tuple(err["loc"])
    clean: list = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            clean.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            clean.append(part)
            node = node[part]
        elif err["type"] in ("missing", "extra_forbidden") and part == loc[-1]:
            clean.append(part)
        # else: a discriminator tag, skipped
    loc = tuple(clean)
    typ, msg = err["type"], err["msg"]
    shown = _show(err.get("input"), loc[-1] if loc else None)
    if typ == "extra_forbidden":
        if _is_secret_key(loc[-1] if loc else None):
            return loc, (f"unknown key (value {shown}); a secret never goes in the config: "
                         f"use password_file, password_env or password_credential")
        return loc, f"unknown key (value {shown}); check the spelling"
    if typ == "missing":
        return loc, "required key is missing"
    # A bad or missing source type is reported on the `type` key itself, not as the
    # whole source mapping.
    if typ == "union_tag_invalid":
        return loc + ("type",), (f"value {_show(err['ctx']['tag'])} is invalid: expected one "
                                 f"of {err['ctx']['expected_tags']}")
    if typ == "union_tag_not_found":
        return loc + ("type",), "required key is missing (it selects the kind of source)"
    expected = msg[0].lower() + msg[1:] if msg else "a valid value"
    if msg.startswith("Value error, "):
        expected = msg[len("Value error, "):]
    return loc, f"value {shown} is invalid: {expected}"


def parse_config(text: str, source: str = "<config>") -> AgentConfig:
    try:
        return _parse(text, source)
    except RecursionError:
        # PyYAML composes recursively; a pathological file must still get a clear error
        raise ConfigError([f"{source}: nested too deeply to be a configuration"]) from None


def _parse(text: str, source: str) -> AgentConfig:
    # One parse: compose the node tree (it has the line numbers), index it, then build
    # the data from it.  The pure-Python loader on purpose: libyaml's composer
    # overflows the C stack (segfault) on deeply nested flow collections.
    try:
        loader = _Loader(text)
        root = loader.get_single_node()
        lines, duplicates = _line_index(root) if root is not None else ({}, [])
        # after indexing: building the data rewrites "<<" merge nodes in place
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError([f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]) from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise ConfigError([f"{source}: expected a mapping at the top level, got {got}"])
    if duplicates:
        raise ConfigError([f"{source}:{d}" for d in duplicates])
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc, text_ = _describe(err, data)
            line = None
            for n in range(len(loc), -1, -1):
                line = lines.get(loc[:n])
                if line:
                    break
            problems.append(f"{source}:{line}: {_fmt_path(loc)}: {text_}")
        raise ConfigError(problems) from None


def load_config(path: str | Path) -> AgentConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read: {e}"]) from None
    return parse_config(text, str(path))

"""Agent configuration: one YAML file, validated at load with precise errors.

Every error names the key path, the offending value, what was expected and
the YAML line.  Unknown keys are errors (a typo must not silently fall back to
a default on a machine nobody watches).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta

from .config_base import (ConfigError, KeyProblem, NonNegativeFloat, NonNegativeInt,
                          PositiveFloat, PositiveInt, Strict, StreamId)
from .config_build import Invalid, build, fmt_path
from .config_yaml import line_of, read_yaml
from .contract import DEFAULT_STD_FLOOR, MIN_LEARN
from .metrics_server import MetricsConfig
from .mqtt_client import MqttConfig
from .shipped import resolve_model
from .sinks import SINKS
from .sources import SOURCES

# One optional section per sink plug-in under `sinks:` (the MQTT sink is configured by
# the top-level `mqtt:` section it shares with the MQTT sources' broker connection).
SinksConfig = msgspec.defstruct(
    "SinksConfig", [(key, cls.config_class | None if cls.default_config is None
                     else cls.config_class, cls.default_config)
                    for key, cls in SINKS.items() if cls.config_class is not None],
    bases=(Strict,), module=__name__)

# the source plug-ins' config classes, told apart by their `type` key
SourceConfigs = Union[tuple(cls.config_class for cls in SOURCES.values())]


class StreamConfig(Strict, kw_only=True):
    id: StreamId
    # the sensor's sampling interval, when known; else it is learned (buffer.gap_reset_s)
    interval_s: PositiveFloat | None = None
    source: SourceConfigs


# ---------------------------------------------------------------- pipeline
class ModelConfig(Strict):
    path: str                       # an .onnx file, or a shipped model's name (DLinear_ad)
    # tried in order; cpu is always the last resort
    providers: list[Literal["openvino", "cuda", "tensorrt", "cpu"]] = \
        msgspec.field(default_factory=lambda: ["cpu"])
    threads: NonNegativeInt = 1     # intra-op threads; 0 = ORT default
    verify_checksum: bool = True
    # 64: ORT's working memory grows with the batch (Nonstationary_ad at 256 windows: +113 MB,
    # at 64: +27 MB) while its cost per window is already flat from 16-64 windows up for the
    # larger models; the tiny ones lose ~1 us per window, small beside the pipeline's share.
    max_batch: PositiveInt = 64
    # How long samples arriving after an engine step wait for the next one, so that a
    # step serves many samples per stream (its per-stream bookkeeping is paid per step,
    # not per message).  "auto": when samples arrived during the step, the longer of 9x its
    # non-inference duration and the time the streams take to bring 8 samples each, at most
    # 1 s; else none, so a lone sample is stepped at once (agent/pipeline.py).
    batch_wait_s: Union[Literal["auto"], Annotated[float, Meta(ge=0, le=5)]] = "auto"
    # take the detection keys this file leaves unset from the model's metadata policy
    policy: bool = True

    # A shipped name stands for the file inside the installed package, so a config written
    # after `pip install` needs no model copied by hand; the error lists the shipped names.
    def __post_init__(self):
        try:
            msgspec.structs.force_setattr(self, "path", resolve_model(self.path))
        except ValueError as e:
            raise KeyProblem("path", str(e)) from None


class BufferConfig(Strict):
    stride: PositiveInt = 1               # infer every k samples
    ffill_max: NonNegativeInt = 3         # forward-fill up to N consecutive missing values
    # restart the window after a longer time gap: "auto" = gap_factor x the stream's own
    # sampling interval (streams[].interval_s, else learned from its first samples), so a
    # 1 Hz sensor and a 3-minute historian poll are both judged by their own pace
    gap_reset_s: Union[Literal["auto"], PositiveFloat, None] = "auto"
    gap_factor: Annotated[float, Meta(ge=1)] = 10.0
    # a stream without samples this long is dropped from memory (its baseline stays on disk)
    idle_evict_s: PositiveFloat | None = 3600.0
    # a stream the config does not name (topic-named) without samples this long is forgotten:
    # Home Assistant entities, retained topics, baseline file (agent/departures.py).  30 days:
    # longer than the longest shelve (a week) and than a usual plant stop (holidays, a
    # turnaround), so a machine that comes back keeps its baseline; 0 or null: never
    forget_after_s: NonNegativeFloat | None = 30 * 86400.0


class RefineConfig(Strict):
    """Once the stream has run `after_s` past its learning period, the normal windows of the
    next `span_s` set its threshold anew: their `calibration.quantile` x `margin`, never
    above the learned one (agent/refine.py)."""
    after_s: NonNegativeFloat = 1800.0
    span_s: PositiveFloat = 1800.0
    margin: Annotated[float, Meta(ge=1.0)] = 1.5


class CalibrationConfig(Strict):
    enabled: bool = False
    samples: Annotated[int, Meta(ge=MIN_LEARN)] = 400
    # learning period by sample time instead of sample count (e.g. one shift)
    duration_s: PositiveFloat | None = None
    quantile: Annotated[float, Meta(gt=0, lt=1)] = 0.99
    # x the model's own calibration_margin (metadata): chosen on SKAB valve1/ for models
    # exported with --drift-rows, whose factor already covers normal drift after calibration
    # (below 1 because k-of-n alerting already rejects isolated crossings)
    margin: PositiveFloat = 0.5
    # scaler std floor, as a fraction of the model's training std (keeps flat channels sane)
    std_floor: NonNegativeFloat = DEFAULT_STD_FLOOR
    # what the learning period fits: the scaler (mean and std, for models trained on
    # per-block scaled data) or only the mean (models with one global scaler keep its std)
    fit: Literal["scaler", "mean"] = "scaler"
    # the threshold: fitted on the learning windows, or the model's own
    threshold: Literal["fit", "model"] = "fit"
    # the fitted threshold narrowed once on the stream's own steady running (off: null)
    refine: RefineConfig | None = None


class AdaptationConfig(Strict):
    """After learning, the scaler mean follows slow normal change (agent/adaptation.py)."""
    enabled: bool = False
    time_constant_s: PositiveFloat = 3600.0
    # values further than this many stds from the current mean are not learned from
    gate: PositiveFloat = 4.0
    # the mean stays within learned mean +- max_shift x learned std (null: unbounded)
    max_shift: PositiveFloat | None = None
    # Each channel's typical error (learned with the baseline: it divides the channel's
    # error under scoring.normalize: channel, and decides which channels keep adapting
    # during an alert) falls this many times faster than it rises: a floor tracker's rule,
    # so the error of a fault the score does not flag, or of an alert's recovery, does not
    # stay in it.  2: the largest value on a 2x grid at which no shipped SKAB model needs a
    # higher margin on the long normal run (docs/RESULTS.md, fifteenth session); 1:
    # symmetric, as before.
    level_fall: Annotated[float, Meta(ge=1.0)] = 2.0


class ScoringConfig(Strict):
    # "model" = threshold from the model metadata (or calibration when enabled)
    threshold: Union[Literal["model"], PositiveFloat] = "model"
    # moving average over the last k scores, summed exactly (k additions a block): beyond
    # an hour of 1 Hz windows a longer window or a stride is the better tool
    smoothing: Annotated[int, Meta(ge=1, le=3600)] = 1
    # "channel": each channel's error in units of its own typical error on this stream
    # (learned with the baseline, adapted with it), so a channel whose error is always
    # high or slowly rising does not drown the others; "none": the model's score as is
    normalize: Literal["none", "channel"] = "none"
    # k: a channel beyond +-k stds of its baseline adds the excess^2 (agent/scoring.py)
    level_band: PositiveFloat | None = None


class AlertConfig(Strict):
    open_k: PositiveInt = 4               # k anomalous of the last n windows opens an alert
    open_n: PositiveInt = 5
    close_m: PositiveInt = 10             # m consecutive normal windows close it
    cooldown_s: NonNegativeFloat = 0.0    # no new alert on a stream within this after an end
    update_interval_s: PositiveFloat = 10.0
    top_channels: PositiveInt = 3
    # an alert whose score has settled into a steady level for this long is "standing"
    standing_after_s: PositiveFloat = 600.0
    # a standing alert this old re-baselines its stream (a new learning period); null: never
    rebaseline_after_s: PositiveFloat | None = None

    def __post_init__(self):
        if self.open_k > self.open_n:
            raise ValueError(f"open_k ({self.open_k}) must be <= open_n ({self.open_n})")


class RunningConfig(Strict):
    """Judge a stream only while its machine runs (agent/running.py): `channel`'s raw value
    above `above` (or below `below`); judging resumes once that has held `start_s`."""
    channel: str
    above: float | None = None
    below: float | None = None
    # the machine's start-up and warm-up, which its normal running does not hold
    start_s: NonNegativeFloat = 0.0

    def __post_init__(self):
        if (self.above is None) == (self.below is None):
            raise ValueError("set exactly one of above and below")


# ---------------------------------------------------------------- outputs
class DetectionConfig(Strict):
    """Everything the engine needs to turn samples into alerts (no sources, no outputs)."""
    node: StreamId = "local"
    # keys left unset come from the model's default policy (agent/policy.py); false: the
    # agent's own defaults, the model as a bare scaler + network + threshold
    model_policy: bool = True
    buffer: BufferConfig = BufferConfig()
    scoring: ScoringConfig = ScoringConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    adaptation: AdaptationConfig = AdaptationConfig()
    alerts: AlertConfig = AlertConfig()
    running: RunningConfig | None = None


class AgentConfig(Strict, kw_only=True):
    node: StreamId
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # calibration and the alert outbox persist here; null = keep nothing (replay, evaluation)
    state_dir: str | None = "/var/lib/tsad-agent"
    model: ModelConfig
    streams: Annotated[list[StreamConfig], Meta(min_length=1)]
    buffer: BufferConfig = BufferConfig()
    scoring: ScoringConfig = ScoringConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    adaptation: AdaptationConfig = AdaptationConfig()
    alerts: AlertConfig = AlertConfig()
    # null: the machine is judged whatever it does; else only while it runs
    running: RunningConfig | None = None
    mqtt: MqttConfig = MqttConfig()
    sinks: SinksConfig = SinksConfig()
    metrics: MetricsConfig = MetricsConfig()   # the daemon's Prometheus endpoint

    def __post_init__(self):
        ids = [s.id for s in self.streams]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise KeyProblem("streams", f"duplicate stream id(s): {', '.join(dup)}")

    @property
    def detection(self) -> DetectionConfig:
        return DetectionConfig(node=self.node, model_policy=self.model.policy,
                               buffer=self.buffer, scoring=self.scoring,
                               calibration=self.calibration, adaptation=self.adaptation,
                               alerts=self.alerts, running=self.running)

    @property
    def named_streams(self) -> set[str]:
        """The streams the config names itself (a topic-named source's id names none)."""
        return {s.id for s in self.streams
                if getattr(s.source, "stream_from_topic", None) is None}

    @property
    def topic_prefix(self) -> str:
        p = self.mqtt.prefix if self.mqtt.prefix is not None else f"tsad/{self.node}/"
        return p if p.endswith("/") else p + "/"


# ---------------------------------------------------------------- loading
def parse_config(text: str, source: str = "<config>") -> AgentConfig:
    try:
        data, lines = read_yaml(text, source)
        return build(AgentConfig, data)
    except RecursionError:
        # PyYAML composes recursively; a pathological file must still get a clear error
        raise ConfigError([f"{source}: nested too deeply to be a configuration"]) from None
    except Invalid as e:
        # in the file's order (a problem without a line, none so far, first)
        found = sorted(((line_of(lines, path) or 0, path, text_) for path, text_ in e.found),
                       key=lambda f: f[0])
        raise ConfigError([f"{source}:{line}: {fmt_path(path)}: {text_}"
                           for line, path, text_ in found]) from None


def load_config(path: str | Path) -> AgentConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read: {e}"]) from None
    return parse_config(text, str(path))

"""What `run` would refuse, found without starting it.

`tsad-agent run` (at start and at every reload) and `tsad-agent check-config` call the
same `check`, so a config that checks OK starts, and one that `run` refuses is INVALID.
The model itself is loaded by the caller (`Detector.from_config`, checksum included),
as `run` loads it; the checks here compare the config against its metadata.

Rules:
- Nothing is started, connected or created: the broker client is built but does not
  connect, each source is built (a replay file is read and its columns checked) but not
  run, and a folder that does not exist yet is judged by the nearest one that does.  The
  one trace left is a probe file in an existing state_dir, removed at once.
- problems stop a start: `run` exits 2, a reload keeps the running config, check-config
  says INVALID.  They are the password source (file, environment, systemd credential),
  the TLS files, a state_dir or JSON-lines alert file that cannot be written, and a
  source that cannot be built.
- warnings: settings that start but probably do not do what the plant wants (a model
  that needs a learning period run without one; the config overruling the model's policy;
  a learning period shorter than LEARN_S at a stream's known sampling interval; a stream's
  interval_s more than RATE_FACTOR off the model's training interval).
- notes: facts that are fine at start: a serial port that is not there now (a USB
  adapter may be plugged in later; the source waits for it); a learning period set in
  samples for streams whose sampling interval is learned, so its length in time is not
  known yet; a stream's `interval_s` that widens its stale window (agent/staleness.py).
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .config import AgentConfig
from .config_base import ConfigError, keys_set
from .metrics import Metrics
from .model_meta import ModelMeta, ModelMetaError
from .mqtt_client import make_client
from .pace import rate_mismatch
from .policy import SECTIONS, effective, model_policy
from .refine import needed
from .running import channel_of
from .sources import build_source
from .staleness import widening_note

# The shortest learning period to recommend for a deployment, in seconds of sample time.
# On SKAB's 2.6 h normal run, 400 samples (6.7 min) learned at other rows than its first
# raised 0.26-0.79 alerts an hour; with 30 minutes and the same margins 24 of 25 starts of
# the five shipped models stayed quiet (benchmarks/learning_start.py, docs/RESULTS.md).
# The shipped policies keep 400 samples: the SKAB protocol that `evaluate` follows.
LEARN_S = 1800.0


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def _problem(self, text: str) -> None:
        if text not in self.problems:   # a password problem is met by the sink and each source
            self.problems.append(text)


def reason(e: BaseException) -> str:
    """One line for an error that a user's input caused: the file an OSError names, each
    ConfigError problem (a config built from flags or settings included)."""
    if isinstance(e, ConfigError):
        return "; ".join(e.problems)
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror[0].lower()}{e.strerror[1:]}"
    return " ".join(str(e).split()) or type(e).__name__


def config_file_problem(path: str) -> str | None:
    """Why the config file cannot be read as one, before it is opened."""
    p = Path(path)
    return None if p.is_file() else f"{path}: {'not a file' if p.exists() else 'no such file'}"


def check(cfg: AgentConfig, meta: ModelMeta, probe_listen: bool = False) -> Findings:
    """Everything `run` would refuse at start, and what deserves a word although it starts.
    `probe_listen` (check-config only: a running daemon holds its own port) also tries
    to bind `metrics.listen`."""
    f = Findings()
    for p in (_state_dir_problem(cfg), _jsonl_problem(cfg),
              _listen_problem(cfg) if probe_listen else None):
        if p:
            f._problem(p)
    if cfg.mqtt.enabled:
        try:
            make_client(cfg.mqtt, cfg.node, role="check")
        except ConfigError as e:
            for p in e.problems:
                f._problem(p)
    uses_broker = cfg.mqtt.enabled or any(s.source.type == "mqtt" for s in cfg.streams)
    if uses_broker and _login_in_clear(cfg.mqtt):
        f.warnings.append(f"mqtt: the broker password goes to {cfg.mqtt.host} in clear text "
                          "(no mqtt.tls): anyone on the network path can read it and "
                          "command the agent; set mqtt.tls, or run the broker on this host")
    _check_sources(cfg, meta.channels, f)
    try:
        # the engine applies the model's policy only when it is built: after a reload has
        # stopped the running pipeline, so a bad value there must be found here
        det = effective(cfg.detection, meta)
    except ModelMetaError as e:
        f._problem(str(e))
        return f
    if cfg.running is not None:
        try:
            channel_of(cfg.running, meta.channels)
        except ValueError as e:
            f._problem(str(e))
    f.warnings += policy_warnings(cfg, meta)
    f.warnings += [f"streams[{i}] ({s.id}): interval_s: {why}" for i, s in enumerate(cfg.streams)
                   if s.interval_s and (why := rate_mismatch(s.interval_s, meta.interval_s))]
    _learning_advice(cfg, det.calibration, meta.interval_s, f)
    _refine_advice(cfg, det, f)
    return f


def _login_in_clear(m) -> bool:
    if m.tls is not None or not (m.password_file or m.password_env or m.password_credential):
        return False
    if m.host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(m.host).is_loopback
    except ValueError:          # a host name: it may resolve anywhere
        return True


def require(cfg: AgentConfig, meta: ModelMeta) -> Findings:
    """`check` for a start: ConfigError with every problem, else the findings to log."""
    f = check(cfg, meta)
    if f.problems:
        raise ConfigError(f.problems)
    return f


def _listen_problem(cfg: AgentConfig) -> str | None:
    if not cfg.metrics.listen:
        return None
    host, port = cfg.metrics.address
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, port))
    except OSError as e:        # socket.gaierror (an unknown host name) included
        return f"metrics.listen: cannot listen on {cfg.metrics.listen}: {e.strerror or e}"
    return None


# ---------------------------------------------------------------- files
def _unwritable(path: Path, folder: bool) -> str | None:
    """Why `path` (a folder, or a file to append to) cannot be written, or None."""
    if path.exists():
        if folder != path.is_dir():
            return "not a folder" if folder else "a folder, not a file"
        if not folder:
            return None if os.access(path, os.W_OK) else "permission denied"
        probe = path / f".write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            return e.strerror or str(e)
        return None
    above = path.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        return f"{above} is not a folder"
    # a real creation, not os.access: root passes that on /proc, and a full inode table
    # or a read-only mount refuse only the attempt
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tsad-write-test-", dir=above))
    except OSError as e:
        return f"cannot create it in {above}: {(e.strerror or str(e)).lower()}"
    return None


def _state_dir_problem(cfg: AgentConfig) -> str | None:
    if not cfg.state_dir:
        return None
    why = _unwritable(Path(cfg.state_dir), folder=True)
    return why and (f"state_dir: {cfg.state_dir} is not writable ({why}); the alert outbox "
                    f"and learned baselines live there")


def _jsonl_problem(cfg: AgentConfig) -> str | None:
    c = cfg.sinks.jsonl
    why = c and _unwritable(Path(c.path), folder=False)
    return why and f"sinks.jsonl.path: cannot append to {c.path} ({why})"


# ---------------------------------------------------------------- sources
def _check_sources(cfg: AgentConfig, channels: list[str], f: Findings) -> None:
    for i, s in enumerate(cfg.streams):
        where = f"streams[{i}] ({s.id})"
        if s.source.type == "serial" and "://" not in s.source.port \
                and not os.path.exists(s.source.port):
            f.notes.append(f"{where}: serial port {s.source.port} is not there now; the agent "
                           f"starts without it and opens it when it appears")
        slow = cfg.mqtt.enabled and s.interval_s and widening_note(cfg.mqtt.stale_after_s,
                                                                   s.interval_s)
        if slow:
            f.notes.append(f"{where}: {slow}")
        try:
            # a throwaway Metrics: a replay file's bad rows are counted when it really runs
            build_source(s, channels, Metrics(), cfg.mqtt, cfg.node).close()
        except ConfigError as e:
            for p in e.problems:
                f._problem(p)
        except (OSError, ValueError) as e:
            f._problem(f"{where}.source: {reason(e)}")


# ---------------------------------------------------------------- the model's policy
def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.3g} min"


def _learning_advice(cfg: AgentConfig, cal, trained: float | None, f: Findings) -> None:
    """A learning period (`cal`: the calibration the model's policy and the config give)
    shorter than LEARN_S: a warning where its length in time is known (duration_s, or
    samples at a stream's interval_s), else a note, its length told at the model's training
    interval (`trained`, which a stream far off it is warned about when it is learned;
    1 Hz for a model that does not record one)."""
    if not cal.enabled:
        return
    advice = (f"a deployment should learn for {_minutes(LEARN_S)} or more of normal running, "
              f"its warm-up and usual variation included: set calibration.duration_s "
              f"(README: How long to learn)")
    if cal.duration_s is not None:
        if cal.duration_s < LEARN_S:
            f.warnings.append(f"calibration.duration_s: {cal.duration_s:g} s; {advice}")
        return
    known = [s for s in cfg.streams if s.interval_s is not None]
    short = [s.id for s in known if cal.samples * s.interval_s < LEARN_S]
    if short:
        who = (f"stream {short[0]} learns on its" if len(short) == 1 else
               f"streams {', '.join(short)} learn on their")
        f.warnings.append(f"{who} first {cal.samples} samples, under {_minutes(LEARN_S)} at "
                          f"interval_s; {advice}")
    if len(known) < len(cfg.streams):
        at = "1 Hz" if trained is None else f"the model's training interval of {trained:g} s"
        f.notes.append(f"each stream learns its baseline on its first {cal.samples} samples "
                       f"({_minutes(cal.samples * (trained or 1.0))} at {at}); {advice}")


def _refine_advice(cfg: AgentConfig, det, f: Findings) -> None:
    """calibration.refine (`det`: the detection settings the model's policy and the config
    give) where it cannot act: no fitted threshold to refine, or a span too short, at a
    stream's interval_s, for the normal windows its quantile needs."""
    cal, r = det.calibration, det.calibration.refine
    if r is None:
        return
    if not cal.enabled or cal.threshold != "fit" or det.scoring.threshold != "model":
        f.notes.append("calibration.refine refines a threshold the learning period fits: "
                       "with this calibration and scoring.threshold it does nothing")
        return
    stride = det.buffer.stride
    short = [s.id for s in cfg.streams if s.interval_s is not None
             and r.span_s / (s.interval_s * stride) < needed(cal.quantile)]
    if short:
        f.warnings.append(f"calibration.refine.span_s: {r.span_s:g} s holds fewer than the "
                          f"{needed(cal.quantile)} windows its quantile needs at the interval_s "
                          f"of stream(s) {', '.join(short)}: their thresholds stay as learned")


def _show(v) -> str:
    return json.dumps(v)


def policy_warnings(cfg: AgentConfig, meta: ModelMeta) -> list[str]:
    """A model that asks for a learning period run without one, and every detection key the
    config sets to another value than the model's policy (the plant wins; said so)."""
    policy = model_policy(meta)
    det = cfg.detection
    out = []
    wanted = policy.get("calibration", {})
    unlearned = wanted.get("enabled") is True and not effective(det, meta).calibration.enabled
    if unlearned:
        why = ("model.policy is false" if not cfg.model.policy
               else "the config sets calibration.enabled: false")
        out.append(f"model {meta.name} asks for a learning period (its policy: calibration on "
                   f"the first {wanted.get('samples', det.calibration.samples)} samples) but "
                   f"{why}: without one it scores raw data against its training scaler and "
                   f"most windows read as anomalous")
    if not cfg.model.policy:
        return out
    for sec in SECTIONS:
        mine = getattr(det, sec)
        for key in sorted(keys_set(mine) & set(policy.get(sec, {}))):
            said = unlearned and (sec, key) == ("calibration", "enabled")
            if not said and getattr(mine, key) != policy[sec][key]:
                out.append(f"{sec}.{key}: the config's {_show(getattr(mine, key))} overrules "
                           f"model {meta.name}'s policy ({_show(policy[sec][key])})")
    return out

"""The long-running service: signals, systemd notify/watchdog, reload, clean stop.

Reload (SIGHUP) swaps in a new config and model; anything invalid keeps the old ones
running.  When the model (its sha256) and the detection settings are unchanged, the
engine carries over: every stream whose source settings are unchanged keeps its ring,
baseline and alert state, so an open alert stays open.  Otherwise the open alerts
end with reason "reload" and the new engine learns again (or restores its baselines
from the state directory).
"""
from __future__ import annotations

import logging
import signal
import threading
import time

import msgspec

from . import preflight, sdnotify
from .bad_input import named
from .config import AgentConfig, ConfigError, load_config
from .detector import Detector, DetectorError
from .engine import Engine
from .heap import HeapTrimmer, limit_arenas
from .metrics import Metrics
from .metrics_server import MetricsServer
from .model_meta import ModelMetaError, load_meta
from .outbox import OutboxError
from .pipeline import Handover, Pipeline
from .sinks import build_sinks
from .state_store import StateStore
from .timestamps import iso_utc

log = logging.getLogger("tsad.daemon")

RELOAD_LOAD_LIMIT_S = 300.0


def stream_caps(cfg: AgentConfig) -> dict[str, int]:
    """Streams each configured source may create: many only for topic-named MQTT streams."""
    return {s.id: (s.source.max_streams if getattr(s.source, "stream_from_topic", None)
                   is not None else 1) for s in cfg.streams}


def build_engine(cfg: AgentConfig, detector: Detector, metrics: Metrics) -> Engine:
    engine = Engine(cfg.detection, detector, metrics=metrics, max_streams=stream_caps(cfg),
                    intervals={s.id: s.interval_s for s in cfg.streams if s.interval_s},
                    named=cfg.named_streams)
    # the learning period may come from the model's policy rather than the file: ask the
    # engine, which holds the merged settings
    if cfg.state_dir and engine.cfg.calibration.enabled:
        engine.store = StateStore(cfg.state_dir)
    return engine


def _engine_settings(cfg: AgentConfig):
    """The detection settings the engine uses: buffer.forget_after_s is the pipeline's
    (agent/departures.py), and a new retention must not end open alerts with a new engine."""
    det = cfg.detection
    return msgspec.structs.replace(det, buffer=msgspec.structs.replace(det.buffer,
                                                                        forget_after_s=None))


def _report(findings: preflight.Findings) -> None:
    for w in findings.warnings:
        log.warning("%s", w)
    for n in findings.notes:
        log.info("%s", n)


class Daemon:
    def __init__(self, config_path: str, cfg: AgentConfig,
                 reload: threading.Event | None = None):
        """`reload`: set by a SIGHUP before serve() takes the signals over (cli.cmd_run
        catches them from its start); a reload asked for while starting runs once serving."""
        limit_arenas()      # before the sinks, sources and metrics server start threads
        self.config_path = config_path
        self.cfg = cfg
        self.metrics = Metrics()
        self._stop = threading.Event()
        self._reload = reload if reload is not None else threading.Event()
        self.watchdog = sdnotify.Watchdog()
        self.heap = HeapTrimmer()
        # before the model loads: a port in use fails the start at once; kept for life
        self.exporter = self.endpoint = None
        if cfg.metrics.listen:
            # here, not at the top: prometheus_client and its HTTP server (~1 MB) only
            # for a daemon that serves metrics (off by default)
            from .prom import DaemonCollector
            self.exporter = DaemonCollector(self.metrics)
            self.endpoint = MetricsServer(cfg.metrics, self.exporter)
        # The config's problems before the session opens: a refused start is one error
        # line, not the model's banner followed by the error.
        _report(preflight.require(cfg, load_meta(cfg.model.path, verify_checksum=False)))
        detector = Detector.from_config(cfg.model, self.metrics)
        self.sinks = build_sinks(cfg, self.metrics)
        self.pipeline = self._new_pipeline(cfg, build_engine(cfg, detector, self.metrics))

    def _new_pipeline(self, cfg: AgentConfig, engine: Engine,
                      handover: Handover | None = None) -> Pipeline:
        p = Pipeline(cfg, engine, self.sinks, handover=handover)
        p.on_tick = self._tick
        engine.fits.progress = self.watchdog.progress    # a long fit is progress, batch by batch
        return p

    def _tick(self) -> None:
        self.watchdog.alive()
        self.heap.maybe()
        if self.exporter is not None:
            p = self.pipeline
            self.exporter.publish(p.engine, p.runners, p.sinks)

    def _interrupted(self) -> bool:
        return self._stop.is_set() or self._reload.is_set()

    def _on_signal(self, signum, _frame) -> None:
        (self._reload if signum == signal.SIGHUP else self._stop).set()

    def _load_alive(self, load, limit_s: float = RELOAD_LOAD_LIMIT_S):
        """Run a model load in a worker while this loop keeps the watchdog fed.

        A large model (or a slow EP such as TensorRT building its engine) can take longer
        than WatchdogSec; the loop is not stuck while it waits, but a load that never
        finishes is: after `limit_s` the reload is rejected."""
        box: dict = {}

        def work():
            try:
                box["value"] = load()
            except BaseException as e:   # handed to the waiting thread below
                box["error"] = e
        t = threading.Thread(target=work, name="reload-load", daemon=True)
        t.start()
        end = time.monotonic() + limit_s
        while t.is_alive():
            self.watchdog.alive()
            if time.monotonic() > end:
                raise TimeoutError(f"loading the new model took over {limit_s:.0f} s")
            t.join(0.5)
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _engine_carries_over(self, new_cfg: AgentConfig, detector: Detector) -> bool:
        old = self.pipeline.engine
        return (detector.meta.onnx_sha256 == old.meta.onnx_sha256
                and _engine_settings(new_cfg) == _engine_settings(self.cfg)
                and new_cfg.state_dir == self.cfg.state_dir)

    def reload(self) -> None:
        """Swap in a new config and model; anything invalid keeps the old ones running."""
        sdnotify.reloading()
        try:
            new_cfg = load_config(self.config_path)
            detector = self.pipeline.engine.detector
            if detector.serves(new_cfg.model):
                log.info("reload: model file and settings unchanged: not loaded again")
            else:
                detector = self._load_alive(
                    lambda: Detector.from_config(new_cfg.model, self.metrics))
            # what a start would refuse must fail here, before anything stops
            findings = preflight.require(new_cfg, detector.meta)
        except (ConfigError, DetectorError, ModelMetaError, OSError, TimeoutError) as e:
            why = preflight.reason(e)
            log.error("reload rejected, keeping the running config and model: %s", why)
            # seen in `systemctl status` and health, not only in the journal (ORT audit)
            self._reloaded(why)
            return
        _report(findings)
        if new_cfg.metrics != self.cfg.metrics:
            log.warning("reload: metrics: changes take effect at the next start")
            new_cfg = msgspec.structs.replace(new_cfg, metrics=self.cfg.metrics)
        carry = self._engine_carries_over(new_cfg, detector)
        old_engine = self.pipeline.engine
        alerting = [sid for sid, st in old_engine.streams.items()
                    if st.tracker.state == "anomaly"]
        if alerting and not carry:
            log.warning("reload: the alerts of %s end (reason reload) while their machine may "
                        "still be abnormal; a stream that learns its baseline anew learns it on "
                        "the machine as it is now: re-baseline it once it runs normally",
                        named(alerting))
        keep = self.pipeline.reusable_sources(new_cfg, detector.meta.channels)
        handover = self.pipeline.stop(stop_sinks=False, close_alerts=None if carry else "reload",
                                      keep=keep, keep_engine=carry)
        if keep:
            log.info("reload: source(s) of %s keep running", ", ".join(sorted(keep)))
        # Outputs are rebuilt only when their settings changed, so a model swap keeps the
        # broker session (and its outbox) instead of flapping availability.  Before the
        # engine: outputs that cannot start keep the old state_dir, and so must its store.
        rebuild = (new_cfg.mqtt, new_cfg.sinks, new_cfg.node, new_cfg.state_dir) != \
            (self.cfg.mqtt, self.cfg.sinks, self.cfg.node, self.cfg.state_dir)
        if rebuild:
            for s in self.sinks:
                s.stop()
            try:
                self.sinks = build_sinks(new_cfg, self.metrics)
            except (OutboxError, ConfigError) as e:
                log.error("reload: the new outputs cannot start (%s); keeping the old ones", e)
                self.sinks = build_sinks(self.cfg, self.metrics)
                new_cfg = msgspec.structs.replace(new_cfg, mqtt=self.cfg.mqtt, sinks=self.cfg.sinks,
                                                   state_dir=self.cfg.state_dir)
            still = set() if not carry else {st.tracker.alert_id for st in
                                             handover.engine.streams.values()
                                             if st.tracker.state == "anomaly"}
            ended = list(old_engine.ended_unacked().values())   # the reload's own ends too
            for s in self.sinks:
                s.carry(still, ended)
        if carry:
            engine = handover.engine
            gone = engine.retain({s.id: s for s in new_cfg.streams},
                                 {s.id: s for s in self.cfg.streams}, "reload")
            engine.swap_detector(detector)
            engine.admission.caps = stream_caps(new_cfg)
            engine.admission.named = set(new_cfg.named_streams)
            log.info("reload: model and detection settings unchanged: streams carry on")
        else:
            engine, gone = build_engine(new_cfg, detector, self.metrics), []
            engine.held_rtn = old_engine.ended_unacked()
        self.cfg = new_cfg
        self.pipeline = self._new_pipeline(new_cfg, engine, handover)
        self.pipeline.start(start_sinks=rebuild)
        self.pipeline.deliver_events(gone, "warming_up")
        log.info("reloaded %s: model %s (%s)", self.config_path, detector.meta.name, detector.ep)
        self._reloaded(None)

    def _status(self) -> str:
        meta, ep = self.pipeline.engine.meta, self.pipeline.engine.detector.ep
        return f"model {meta.name} on {ep}, {len(self.cfg.streams)} stream(s)"

    def _reloaded(self, error: str | None) -> None:
        """Tell systemd (its STATUS line) and health (`reload`) how the last reload went."""
        self.metrics.reload = {"ok": error is None, "error": error, "at": iso_utc(time.time())}
        sdnotify.ready(self._status() if error is None
                       else f"reload rejected: {error}; still {self._status()}")

    def serve(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.pipeline.start()
        self.watchdog.start()
        sdnotify.ready(self._status())
        meta, ep = self.pipeline.engine.meta, self.pipeline.engine.detector.ep
        log.info("running: node %s, model %s on %s", self.cfg.node, meta.name, ep)
        if self._reload.is_set():
            log.info("a reload (SIGHUP) came while starting: rereading %s", self.config_path)
        while True:
            self.pipeline.run(interrupted=self._interrupted)
            if self._reload.is_set() and not self._stop.is_set():
                self._reload.clear()
                self.reload()
                continue
            break
        sdnotify.stopping()
        log.info("stopping")
        self.watchdog.stop()
        self.pipeline.stop(close_alerts="stopped")
        if self.endpoint is not None:
            self.endpoint.close()
        return 0

"""The long-running service: signals, systemd notify/watchdog, reload, clean stop."""
from __future__ import annotations

import logging
import signal
import threading
import time

from . import sdnotify
from .config import AgentConfig, ConfigError, load_config
from .detector import Detector, DetectorError
from .metrics import Metrics
from .model_meta import ModelMetaError
from .mqtt_client import make_client
from .pipeline import Handover, Pipeline
from .sinks.build import build_sinks

log = logging.getLogger("tsad.daemon")

RELOAD_LOAD_LIMIT_S = 300.0


class Daemon:
    def __init__(self, config_path: str, cfg: AgentConfig):
        self.config_path = config_path
        self.cfg = cfg
        self.metrics = Metrics()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.watchdog = sdnotify.Watchdog()
        self.sinks = build_sinks(cfg, self.metrics)
        self.pipeline = self._new_pipeline(cfg, Detector(
            cfg.model.path, providers=list(cfg.model.providers), threads=cfg.model.threads,
            verify_checksum=cfg.model.verify_checksum, max_batch=cfg.model.max_batch,
            metrics=self.metrics))

    def _new_pipeline(self, cfg: AgentConfig, detector: Detector,
                      handover: Handover | None = None) -> Pipeline:
        p = Pipeline(cfg, self.sinks, metrics=self.metrics, detector=detector, handover=handover)
        p.on_tick = self._tick
        return p

    def _tick(self) -> None:
        self.watchdog.alive()

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

    def reload(self) -> None:
        """Swap in a new config and model; anything invalid keeps the old ones running."""
        sdnotify.reloading()
        try:
            new_cfg = load_config(self.config_path)
            detector = self._load_alive(lambda: Detector(
                new_cfg.model.path, providers=list(new_cfg.model.providers),
                threads=new_cfg.model.threads, verify_checksum=new_cfg.model.verify_checksum,
                max_batch=new_cfg.model.max_batch, metrics=self.metrics))
            if new_cfg.mqtt.enabled:
                # unreadable password or TLS files must fail here, before anything stops
                make_client(new_cfg.mqtt, new_cfg.node, role="reload-check")
        except (ConfigError, DetectorError, ModelMetaError, OSError, TimeoutError) as e:
            log.error("reload rejected, keeping the running config and model: %s", e)
            sdnotify.ready()
            return
        keep = self.pipeline.reusable_sources(new_cfg, detector.meta.channels)
        handover = self.pipeline.stop(stop_sinks=False, close_alerts="reload", keep=keep)
        if keep:
            log.info("reload: source(s) of %s keep running", ", ".join(sorted(keep)))
        # Outputs are rebuilt only when their settings changed, so a model swap keeps the
        # broker session (and its outbox) instead of flapping availability.
        rebuild = (new_cfg.mqtt, new_cfg.sinks, new_cfg.node, new_cfg.state_dir) != \
            (self.cfg.mqtt, self.cfg.sinks, self.cfg.node, self.cfg.state_dir)
        if rebuild:
            for s in self.sinks:
                s.stop()
            self.sinks = build_sinks(new_cfg, self.metrics)
        self.cfg = new_cfg
        self.pipeline = self._new_pipeline(new_cfg, detector, handover)
        self.pipeline.start(start_sinks=rebuild)
        log.info("reloaded %s: model %s (%s)", self.config_path, detector.meta.name, detector.ep)
        sdnotify.ready()

    def serve(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.pipeline.start()
        self.watchdog.start()
        sdnotify.ready()
        sdnotify.status(f"model {self.pipeline.meta.name} on {self.pipeline.detector.ep}, "
                        f"{len(self.cfg.streams)} stream(s)")
        log.info("running: node %s, model %s on %s", self.cfg.node, self.pipeline.meta.name,
                 self.pipeline.detector.ep)
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
        self.pipeline.stop(close_alerts="agent stopped")
        return 0

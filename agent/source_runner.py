"""A source in its own thread (`SourceRunner`), feeding the pipeline's queue.

A source's thread never takes the daemon down: a source that fails with an error is
logged (`malformed.source_crash`) and, if it is a live feed (`Source.restarts`), started
again after a wait that doubles while it keeps failing soon after each start.  A file
source ends instead, since starting it again would repeat its rows.
"""
from __future__ import annotations

import logging
import threading
import time

from .config import StreamConfig
from .inbox import Inbox
from .metrics import Metrics
from .sources.base import Source

log = logging.getLogger("tsad.pipeline")

RESTART_MIN_S = 1.0      # a crashed live source starts again after this, doubling ...
RESTART_MAX_S = 60.0     # ... up to this while it keeps crashing within it of each start


class SourceRunner:
    """One source in its own thread, with its own stop, feeding a queue.

    It holds no reference to a pipeline, so it can outlive one: when its source has
    finished it puts itself on the queue as the end marker."""

    def __init__(self, stream: StreamConfig, source: Source, out: Inbox,
                 metrics: Metrics) -> None:
        self.stream, self.source, self.out, self.metrics = stream, source, out, metrics
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"source-{self.stream.id}")
            self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _put(self, item) -> None:
        # blocks when the pipeline is behind: back-pressure instead of dropping data
        while not self.out.put(item, timeout=0.5):
            if self.stop_event.is_set():
                self.metrics.dropped["queue_full_at_stop"] += 1
                return

    def _run(self) -> None:
        try:
            delay = RESTART_MIN_S
            while True:
                began = time.monotonic()
                if self._run_once():
                    break
                # a live source that failed is started again, so one unforeseen error does
                # not leave its streams offline (and the daemon looking healthy) for months;
                # the wait doubles while it keeps failing soon after each start
                if time.monotonic() - began > RESTART_MAX_S:
                    delay = RESTART_MIN_S
                log.warning("%s: source restarts in %.3g s", self.stream.id, delay)
                if self.stop_event.wait(delay):
                    break
                delay = min(delay * 2, RESTART_MAX_S)
        finally:
            self._put(self)

    def _run_once(self) -> bool:
        """Run the source until it returns; False if it failed and should start again."""
        try:
            self.source.run(self._put, self.stop_event)
            return True
        except Exception:
            log.exception("%s: source %s crashed", self.stream.id, type(self.source).__name__)
            self.metrics.bad("source_crash")
            # a file source would start over from its first row: it ends instead
            return not self.source.restarts or self.stop_event.is_set()
        finally:
            try:
                self.source.close()
            except Exception:
                log.exception("%s: source %s failed to close", self.stream.id,
                              type(self.source).__name__)

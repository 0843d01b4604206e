"""Serial-line source: one sample per text line from a serial port (or any pyserial URL).

The port may be absent at start or unplugged at any time (USB adapters are);
the source then reports `connected = False`, logs the change once, and keeps
trying to reopen it with exponential backoff, resuming on its own.  While the
device node is missing (USB adapter unplugged) the backoff sleep ends as soon as
the node reappears, so a replug resumes within APPEAR_POLL_S however long the
device was away.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Literal

from ..config_base import PositiveFloat, PositiveInt, SourceConfig
from ..decoders import MAX_LINE, LineDecoder
from ..metrics import Metrics
from .base import Batch, Emit, Source

log = logging.getLogger("tsad.source.serial")

READ_TIMEOUT_S = 0.2   # bounds how long `stop` may wait for a blocked read
APPEAR_POLL_S = 0.1    # how often a missing device node is looked for (one stat call)


def _pyserial():
    """pyserial, imported when a serial source runs: the daemon imports every source to
    build its config, and an agent without a serial stream need not load it (0.3 MB)."""
    import serial
    return serial


class LineSplitter:
    """Reassembles lines across reads; CR, LF and CRLF all end a line.

    A run of bytes longer than MAX_LINE without a line end is reported once and
    dropped up to the next line end, so a device stuck sending garbage cannot
    grow memory."""

    def __init__(self, decoder: LineDecoder):
        self._decoder = decoder
        self._pending = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes]:
        self._pending += data
        cut = max(self._pending.rfind(b"\n"), self._pending.rfind(b"\r"))
        if cut < 0:
            if len(self._pending) > MAX_LINE:
                self._overlong()
            return []
        complete = bytes(self._pending[:cut])
        del self._pending[:cut + 1]
        segments = complete.replace(b"\r", b"\n").split(b"\n")
        if self._discarding:
            segments = segments[1:]   # the tail of the overlong run
            self._discarding = False
        return [ln for ln in segments if ln.strip()]

    def reset(self) -> None:
        self._pending.clear()
        self._discarding = False

    def _overlong(self) -> None:
        if not self._discarding:
            self._decoder.bad("too_long", bytes(self._pending[:80]))
            self._discarding = True
        self._pending.clear()


class SerialSourceConfig(SourceConfig, tag="serial"):
    port: str
    baud: PositiveInt = 115200
    protocol: Literal["csv", "json"] = "csv"
    # csv: does each line start with a timestamp field? ("auto" detects per line)
    timestamp: Literal["auto", "first", "none"] = "auto"
    reconnect_min_s: PositiveFloat = 0.2
    reconnect_max_s: PositiveFloat = 10.0


class SerialLineSource(Source):
    type = "serial"
    config_class = SerialSourceConfig

    def __init__(self, stream_id: str, cfg: SerialSourceConfig, channels: list[str],
                 metrics: Metrics):
        super().__init__()
        self.stream_id = stream_id
        self.cfg = cfg
        self.decoder = LineDecoder(channels, cfg.protocol, cfg.timestamp, metrics,
                                   f"serial:{stream_id}")
        self._splitter = LineSplitter(self.decoder)
        self._port = None       # a pyserial port while open
        self._lock = threading.Lock()

    def run(self, emit: Emit, stop: threading.Event) -> None:
        serial = _pyserial()
        delay = self.cfg.reconnect_min_s
        announced_down = False
        while not stop.is_set():
            try:
                port = serial.serial_for_url(self.cfg.port, baudrate=self.cfg.baud,
                                             timeout=READ_TIMEOUT_S)
            except (serial.SerialException, OSError, ValueError) as e:
                if not announced_down:
                    log.warning("%s: cannot open %s: %s; retrying in the background",
                                self.stream_id, self.cfg.port, e)
                    announced_down = True
                self._retry_wait(stop, delay)
                delay = min(delay * 2, self.cfg.reconnect_max_s)
                continue
            with self._lock:
                self._port = port
            self._splitter.reset()
            self.connected = True
            announced_down = False
            delay = self.cfg.reconnect_min_s
            log.info("%s: %s open at %d baud", self.stream_id, self.cfg.port, self.cfg.baud)
            try:
                self._read_until_stop(port, emit, stop)
            except (serial.SerialException, OSError) as e:
                log.warning("%s: %s lost: %s; reconnecting", self.stream_id, self.cfg.port, e)
                announced_down = True
                self.disconnects += 1
            finally:
                self.connected = False
                self.close()
            if not stop.is_set() and announced_down:
                self._retry_wait(stop, delay)

    def _retry_wait(self, stop: threading.Event, delay: float) -> None:
        """Wait `delay` before the next open, or less once a missing device node is back."""
        path = self.cfg.port
        if "://" in path or os.path.exists(path):
            # present but unusable (busy, permissions) or a pyserial URL: plain backoff
            stop.wait(delay)
            return
        end = time.monotonic() + delay
        while not stop.is_set():
            left = end - time.monotonic()
            if left <= 0 or os.path.exists(path):
                return
            stop.wait(min(APPEAR_POLL_S, left))

    def _read_until_stop(self, port, emit: Emit, stop: threading.Event) -> None:
        while not stop.is_set():
            data = port.read(port.in_waiting or 1)
            if not data:
                continue
            got = self.decoder.decode_lines(self._splitter.feed(data), time.time())
            if got is not None:
                emit(Batch(self.stream_id, *got, arrived=time.monotonic()))

    def close(self) -> None:
        with self._lock:
            port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except (_pyserial().SerialException, OSError):
                pass

"""systemd notification protocol (sd_notify) and a progress-gated watchdog, in pure Python.

The protocol is one datagram of `KEY=value` lines sent to the AF_UNIX socket named by
$NOTIFY_SOCKET (a path, or an abstract-namespace name written with a leading '@').
Outside systemd the variable is unset and every call is a cheap no-op, so the agent
runs unchanged from a shell, in a container or under tests.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


def notify(**fields: object) -> bool:
    """Send `KEY=value` fields (e.g. READY=1, STATUS="...") to systemd.

    Returns True when the datagram was sent, False when not under systemd or when the
    send failed: a notification problem must never take the agent down.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or not fields:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    elif addr[0] != "/":
        # vsock:... and other forms are for VMs; the agent never runs as a VM's init
        log.debug("unsupported NOTIFY_SOCKET %r", addr)
        return False
    # One field per line is the protocol, so a newline inside a value (a STATUS built
    # from an exception message) would forge another field.
    msg = "\n".join(f"{k.upper()}={str(v).replace(chr(10), ' ')}" for k, v in fields.items())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(msg.encode(), addr)
        return True
    except OSError as e:
        log.warning("sd_notify to %r failed: %s", os.environ["NOTIFY_SOCKET"], e)
        return False


def ready(status: str | None = None) -> bool:
    """Startup (or a reload) is complete: model warm, sources open."""
    return notify(READY=1, **({"STATUS": status} if status else {}))


def stopping(status: str | None = None) -> bool:
    return notify(STOPPING=1, **({"STATUS": status} if status else {}))


def reloading(status: str | None = None) -> bool:
    """Announce a reload (SIGHUP); send ready() when it is done.

    systemd >= 253 requires MONOTONIC_USEC (CLOCK_MONOTONIC in microseconds) with
    RELOADING=1 to tell this reload from a stale one; older versions ignore it.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(RELOADING=1, MONOTONIC_USEC=usec, **({"STATUS": status} if status else {}))


def watchdog() -> bool:
    return notify(WATCHDOG=1)


def status(text: str) -> bool:
    return notify(STATUS=text)


def watchdog_interval() -> float | None:
    """The WatchdogSec= of our unit in seconds, or None when no watchdog applies to us.

    $WATCHDOG_PID names the process the watchdog is meant for; a child that inherited
    the environment (a helper process we spawned) must not ping on the parent's behalf.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None
    return value / 1e6 if value > 0 else None


class Watchdog:
    """Pings systemd's watchdog only while the pipeline's main loop keeps turning.

    Why liveness and not a plain timer: a timer thread alone keeps pinging while the
    inference loop is deadlocked, which defeats WatchdogSec=.  So pings are gated on
    heartbeats from the loop itself:

    - `progress()`: the loop processed something (a batch inferred, a line rejected).
    - `alive()`: the loop went round without work, e.g. its queue get timed out.
      Idle is not stuck: a quiet sensor line must not get a healthy agent restarted,
      so the loop calls this on every idle iteration (its queue timeout must be well
      below half the watchdog interval).

    `tick()` pings only if a heartbeat arrived since the previous ping AND the latest
    one is no older than the interval.  A loop blocked anywhere (a hung inference
    call, a lock, a stuck write) stops both heartbeats, pings stop, and systemd
    restarts the service after WatchdogSec=.  `start()` runs `tick()` from a daemon
    thread every interval/2, the rate systemd recommends.
    """

    def __init__(self, interval: float | None = None,
                 send: Callable[[], bool] = watchdog,
                 clock: Callable[[], float] = time.monotonic):
        self.interval = watchdog_interval() if interval is None else interval
        self._send = send
        self._clock = clock
        # A counter, not a flag: the loop increments, tick() compares, so no heartbeat
        # is lost to a race between the two threads and no lock sits on the hot path.
        self._beats = 0
        self._beats_at_ping = 0
        self._last_beat = clock()
        self._withholding = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.interval)

    def alive(self) -> None:
        self._last_beat = self._clock()
        self._beats += 1

    def progress(self) -> None:
        self.alive()

    def tick(self) -> bool:
        """Ping if the loop reported since the last ping; True when a ping was sent."""
        if not self.enabled:
            return False
        beats = self._beats
        age = self._clock() - self._last_beat
        if beats == self._beats_at_ping or age > self.interval:
            if not self._withholding:
                log.warning("main loop silent for %.1f s: withholding the watchdog ping "
                            "so systemd restarts the agent if it stays stuck", age)
                self._withholding = True
            return False
        self._beats_at_ping = beats
        if self._withholding:
            log.info("main loop reporting again; watchdog pings resumed")
            self._withholding = False
        return self._send()

    def start(self) -> None:
        """Ping from a daemon thread; does nothing when no watchdog is configured."""
        if not self.enabled or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        period = self.interval / 2
        while not self._stop.wait(period):
            self.tick()

"""A throw-away Mosquitto on a free 127.0.0.1 port for the benchmarks.

(The tests have their own fixture in tests/conftest.py; benchmarks do not import tests.)
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(work: Path, extra_conf: str = "", timeout: float = 10.0) -> tuple[subprocess.Popen, int]:
    """(broker process, port) once it accepts connections; the caller terminates it."""
    port = free_port()
    conf = Path(work) / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n{extra_conf}")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.terminate()
    raise SystemExit(f"mosquitto ({MOSQUITTO}) did not start on 127.0.0.1:{port}")

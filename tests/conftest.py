"""Shared fixtures: a real Mosquitto broker on a free loopback port, data paths."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKAB = REPO.parent / "shared" / "data" / "skab"
MODELS = REPO / "models_onnx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


class Broker:
    """A mosquitto process; `stop()`/`start()` keep the port so clients can reconnect."""

    def __init__(self, workdir: Path, extra_conf: str = "", port: int | None = None):
        self.port = port or free_port()
        self.dir = workdir
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + ("allow_anonymous true\n" if "allow_anonymous" not in self.extra_conf else "")
            + "persistence false\n" + self.extra_conf + "\n")
        self.log = open(self.dir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def started_broker(workdir: Path, extra_conf: str = "") -> Broker:
    """A running broker, or the test skipped when mosquitto is not installed."""
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto not installed (apt-get install mosquitto; .ci/run does this)")
    return Broker(workdir, extra_conf).start()


@pytest.fixture
def broker(tmp_path):
    b = started_broker(tmp_path)
    yield b
    b.stop()


@pytest.fixture
def skab_dir():
    if not SKAB.is_dir():
        pytest.skip(f"SKAB data not found at {SKAB} (expected ../shared/data/skab beside the repo)")
    return SKAB


def pytest_terminal_summary(terminalreporter):
    """One line for every test the missing broker skipped: they skip from several files with
    several reasons, so `-ra` spreads them out, and lost MQTT coverage must not pass unseen."""
    n = sum(1 for r in terminalreporter.stats.get("skipped", [])
            if isinstance(r.longrepr, tuple) and "mosquitto" in r.longrepr[2])
    if n:
        terminalreporter.write_line(f"{n} test(s) skipped for lack of mosquitto: the MQTT, TLS, "
                                    f"fault and signal tests did not run (apt-get install "
                                    f"mosquitto)", yellow=True, bold=True)

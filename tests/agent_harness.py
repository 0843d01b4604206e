"""Drive the real agent process for robustness tests: a tiny deterministic model,
a serial line over a real pseudo-terminal, a persistent-session MQTT subscriber.

Determinism: the model is recon = 0.9 x + 0.01 on channels a,b,c (window 8), the
scaler is the identity, calibration is off and the threshold fixed, and alerts
open on one anomalous window and close after two normal ones.  A line at the
scaler mean scores 1e-4; a line of huge values scores ~1e4.  So every anomalous
line the agent reads opens exactly one alert whose id is
`<node>:<stream>:<that line's timestamp in ms>`, known before it is written.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tty
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml

from conftest import MOSQUITTO, REPO, Broker  # noqa: F401  (MOSQUITTO: for the tests' skip)
from onnx_factory import make_model

NODE = "rb"
STREAM = "pump"
BASE_TS = 1_700_000_000.0       # sample i carries BASE_TS + i * STEP
STEP = 0.01
THRESHOLD = 1.0
SPACING = 10                    # lines between anomalies: each alert opens and closes alone


def sample_ts(i: int) -> float:
    return BASE_TS + i * STEP


def alert_id(i: int, node: str = NODE, stream: str = STREAM) -> str:
    return f"{node}:{stream}:{int(round(sample_ts(i) * 1000))}"


def index_of(alert_id_: str) -> int:
    ms = int(alert_id_.rsplit(":", 1)[1])
    return int(round((ms / 1000 - BASE_TS) / STEP))


def tiny_model(d: Path, name: str = "tiny_v1", scale: float = 0.9) -> Path:
    path, _ = make_model(Path(d) / f"{name}.onnx", window=8, channels=["a", "b", "c"],
                         threshold=THRESHOLD, name=name, scale=scale)
    return path


def write_config(path: Path, *, model: Path, port: int, serial_port: str, state_dir: Path,
                 **overrides) -> Path:
    """The agent YAML; `overrides` replace top-level sections (merged one level deep)."""
    cfg = {
        "node": NODE,
        "log_level": "info",
        "state_dir": str(state_dir),
        "model": {"path": str(model)},
        "streams": [{"id": STREAM, "source": {
            "type": "serial", "port": serial_port, "baud": 115200, "protocol": "csv",
            "timestamp": "first", "reconnect_min_s": 0.1, "reconnect_max_s": 2.0}}],
        "calibration": {"enabled": False},
        "scoring": {"threshold": THRESHOLD},
        "alerts": {"open_k": 1, "open_n": 1, "close_m": 2, "cooldown_s": 0},
        "mqtt": {"host": "127.0.0.1", "port": port, "keepalive": 5,
                 "health_interval_s": 0.2},
        "sinks": {"console": {"enabled": False}},
    }
    for k, v in overrides.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def persistent_broker(d: Path, extra_conf: str = "") -> Broker:
    """A broker that keeps sessions and queued messages across stop()/start()."""
    d.mkdir(parents=True, exist_ok=True)
    # as root mosquitto drops to user "mosquitto", which cannot write in tmp_path
    root = "user root\n" if os.geteuid() == 0 else ""
    return Broker(d, extra_conf=f"persistence true\npersistence_location {d}/\n{root}{extra_conf}")


def wait_until(pred, what: str, timeout: float = 20.0, step: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---------------------------------------------------------------- the agent process
class AgentProcess:
    def __init__(self, config: Path, log_path: Path, python: list[str] | None = None):
        """`python`: what the interpreter runs instead of `-m agent.cli` (the config
        path is appended), for a test that wraps the real agent."""
        self.config, self.log_path = config, log_path
        self.python = python or ["-m", "agent.cli", "run", "--config"]
        self.proc: subprocess.Popen | None = None
        self._from = 0

    def start(self) -> "AgentProcess":
        logf = open(self.log_path, "ab")
        self._from = logf.tell()      # a restarted agent appends to the same file
        self.proc = subprocess.Popen([sys.executable, *self.python, str(self.config)], cwd=REPO,
                                     stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        return self

    def log(self) -> str:
        """What this process wrote."""
        with open(self.log_path, "rb") as f:
            f.seek(self._from)
            return f.read().decode(errors="replace")

    def count(self, text: str) -> int:
        return self.log().count(text)

    def wait_log(self, text: str, n: int = 1, timeout: float = 30.0) -> None:
        wait_until(lambda: self.count(text) >= n or self._died(),
                   f"{n}x {text!r} in the agent log", timeout)
        assert self.count(text) >= n, f"agent exited ({self.proc.returncode}):\n{self.log()}"

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.running():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()


# ---------------------------------------------------------------- serial line
class Pty:
    """One end of a pseudo-terminal standing in for a USB serial adapter."""

    def __init__(self):
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


class LineWriter:
    """Writes CSV lines `ts,a,b,c` with ts = sample_ts(i); remembers what it wrote."""

    NORMAL = "0,0,0"
    ANOMALY = "1000,1000,1000"

    def __init__(self, pty: Pty):
        self.pty = pty
        self.i = 0
        self.written_at: dict[int, float] = {}

    def line(self, anomalous: bool) -> int:
        i = self.i
        os.write(self.pty.master, f"{sample_ts(i):.3f},"
                 f"{self.ANOMALY if anomalous else self.NORMAL}\n".encode())
        self.written_at[i] = time.monotonic()
        self.i += 1
        return i

    def normal(self, n: int) -> None:
        for _ in range(n):
            self.line(False)

    def spikes(self, n: int, pause: float = 0.0) -> list[str]:
        """n anomalies, each followed by SPACING-1 normal lines; returns their alert ids."""
        ids = []
        for _ in range(n):
            ids.append(alert_id(self.line(True)))
            self.normal(SPACING - 1)
            if pause:
                time.sleep(pause)
        return ids


# ---------------------------------------------------------------- MQTT observer
class Observer:
    """A persistent-session QoS 1 subscriber to everything the agent publishes.

    Its session lives in the broker, so alerts published while it is away (broker
    restarted, not reconnected yet) are queued for it, not lost."""

    def __init__(self, port: int, client_id: str = "rb-observer", node: str = NODE,
                 tls: dict | None = None, auth: tuple[str, str] | None = None):
        self.node = node
        self.msgs: list[tuple[float, str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=False)
        self.c.reconnect_delay_set(0.2, 1)
        if tls:
            self.c.tls_set(**tls)
        if auth:
            self.c.username_pw_set(*auth)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(f"tsad/{node}/#", qos=1)
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = self._on_message
        self.c.connect_async("127.0.0.1", port, keepalive=5)
        self.c.loop_start()

    def _on_message(self, c, u, m) -> None:
        with self.lock:
            self.msgs.append((time.monotonic(), m.topic, m.payload, m.retain))

    def wait_subscribed(self, timeout: float = 10.0) -> "Observer":
        assert self.subscribed.wait(timeout), "observer never subscribed"
        return self

    def topic(self, suffix: str) -> list[tuple[float, bytes, bool]]:
        t = f"tsad/{self.node}/{suffix}"
        with self.lock:
            return [(at, p, r) for at, tp, p, r in self.msgs if tp == t]

    def alerts(self) -> list[dict]:
        return [json.loads(p) for _, p, _ in self.topic("alerts")]

    def ids(self, typ: str) -> Counter:
        return Counter(a["id"] for a in self.alerts() if a["type"] == typ)

    def healths(self) -> list[tuple[float, dict]]:
        return [(at, json.loads(p)) for at, p, _ in self.topic("health")]

    def wait_ids(self, expected: set[str], timeout: float = 30.0) -> None:
        """Until every expected id has both its "new" and its "end" event."""
        wait_until(lambda: expected <= set(self.ids("new")) and expected <= set(self.ids("end")),
                   f"{len(expected)} alerts (missing new: "
                   f"{sorted(expected - set(self.ids('new')))[:5]}...)", timeout)

    def availability(self) -> list[bytes]:
        return [p for _, p, _ in self.topic("availability")]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


class Rig:
    """A persistent broker, an observer, a pty and the agent's config (the tiny model, the
    pty as its serial port unless `serial_port` is given, `state` as its state_dir) for one
    test; `close()` tears everything down.  With `wait_online`, `agent()` returns once the
    agent has opened the port (it flushes its input when opened) and announced itself."""

    def __init__(self, tmp: Path, state: Path | None = None, serial_port: str | None = None,
                 wait_online: bool = True, **config):
        self.tmp, self.state, self.wait_online = tmp, state or tmp / "state", wait_online
        self.broker = persistent_broker(tmp / "mq").start()
        self.obs = Observer(self.broker.port).wait_subscribed()
        self.pty = Pty()
        self.writer = LineWriter(self.pty)
        self.model = tiny_model(tmp)
        self.config = write_config(tmp / "agent.yaml", model=self.model, port=self.broker.port,
                                   serial_port=serial_port or self.pty.path,
                                   state_dir=self.state, **config)
        self.agents: list[AgentProcess] = []

    def agent(self) -> AgentProcess:
        a = AgentProcess(self.config, self.tmp / "agent.log").start()
        self.agents.append(a)
        if self.wait_online:
            a.wait_log("open at")
            wait_until(lambda: self.obs.availability()[-1:] == [b"online"], "agent online")
        return a

    def close(self) -> None:
        for a in self.agents:
            a.close()
        self.obs.close()
        self.broker.stop()
        self.pty.close()


def assert_exact(obs: Observer, expected: set[str]) -> dict:
    """The received ids are exactly the expected ones (duplicates allowed, counted)."""
    new, end = obs.ids("new"), obs.ids("end")
    assert set(new) == expected, (f"missing {sorted(expected - set(new))}, "
                                  f"unexpected {sorted(set(new) - expected)}")
    assert set(end) == expected, (f"missing end {sorted(expected - set(end))}, "
                                  f"unexpected {sorted(set(end) - expected)}")
    dups = sorted(f"{t}:{i}" for t, c in (("new", new), ("end", end)) for i, n in c.items()
                  if n > 1)
    return {"alerts": len(expected), "duplicates": sum(new.values()) + sum(end.values())
            - 2 * len(expected), "duplicated": dups}


def outbox_ids(state_dir: Path) -> set[str]:
    """Alert ids of the "new" rows waiting in the agent's outbox (read by a second
    connection, as an operator would)."""
    p = state_dir / "outbox.sqlite"
    if not p.exists():
        return set()
    db = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute("SELECT payload FROM outbox WHERE kind = 'new'").fetchall()
    except sqlite3.OperationalError:     # table not created yet
        return set()
    finally:
        db.close()
    return {json.loads(r[0])["id"] for r in rows}


def no_traceback(agent: AgentProcess) -> None:
    assert "Traceback" not in agent.log(), agent.log()



# ---------------------------------------------------------------- devices on MQTT, memory
class Publisher:
    """A device publishing QoS 1 payloads; `send` returns once the broker has each one."""

    def __init__(self, port: int, client_id: str = "rb-device"):
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()

    def send(self, items, timeout: float = 60.0) -> int:
        """Publish (topic, bytes) pairs in order; how many were published."""
        infos = [self.c.publish(t, p, qos=1) for t, p in items]
        end = time.monotonic() + timeout
        for i in infos:
            i.wait_for_publish(max(0.1, end - time.monotonic()))
            assert i.is_published(), "the broker did not acknowledge a publish in time"
        return len(infos)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


class JsonDevice:
    """Flat JSON samples on `topic`, one a message (as ESPHome or Node-RED sends them),
    stamped sample_ts(i) in order; several devices may share one Publisher."""

    def __init__(self, pub: Publisher, topic: str):
        self.pub, self.topic, self.i = pub, topic, 0

    def send(self, n: int, values: dict) -> None:
        docs = [(self.topic, json.dumps({"ts": round(sample_ts(self.i + k), 2),
                                         **values}).encode()) for k in range(n)]
        self.i += n
        self.pub.send(docs)


def json_stream(sid: str, topic: str) -> dict:
    """A config stream reading a JsonDevice's topic."""
    return {"id": sid, "source": {"type": "mqtt", "topic": topic, "protocol": "json", "qos": 1}}


def retained(port: int, topic: str, timeout: float = 10.0) -> bytes:
    """The payload a subscriber arriving now reads first on `topic` (its retained copy)."""
    got, box = threading.Event(), []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"late-{time.monotonic_ns()}")
    c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    c.on_message = lambda c, u, m: (box.append((m.retain, m.payload)), got.set())
    c.connect("127.0.0.1", port, keepalive=5)
    c.loop_start()
    try:
        assert got.wait(timeout), f"nothing retained on {topic}"
    finally:
        c.loop_stop()
        c.disconnect()
    assert box[0][0], f"the first message on {topic} was not the retained one"
    return box[0][1]


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (resident at its peak) of a process, in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, v = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(v.split()[0])
    return out

"""An adapted baseline survives a restart of the real agent process: the stream resumes
from the mean it had followed, instead of learning again or falling back to the mean it
learned first (which the drifted signal would now be far from)."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import termios
import time
from pathlib import Path

import numpy as np
import pytest

from agent_harness import (MOSQUITTO, AgentProcess, Pty, sample_ts, tiny_model, wait_until,
                           write_config)

LEARN = 40
RISE = 6.0


def write_lines(pty: Pty, start: int, values: np.ndarray) -> int:
    lines = [f"{sample_ts(start + i):.3f}," + ",".join(f"{v:.4f}" for v in row)
             for i, row in enumerate(values)]
    data = ("\n".join(lines) + "\n").encode()
    for a in range(0, len(data), 4096):
        os.write(pty.master, data[a:a + 4096])
    return start + len(values)


def noisy(level: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return level[:, None] + rng.normal(0, 1.0, (len(level), 3))


def drained(pty: Pty) -> bool:
    """Nothing written to the port is waiting to be read any more."""
    return struct.unpack("i", fcntl.ioctl(pty.slave, termios.FIONREAD, b"\0" * 4))[0] == 0


def events(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed")
def test_an_adapted_baseline_resumes_after_a_restart(tmp_path):
    pty = Pty()
    state, alerts = tmp_path / "state", tmp_path / "alerts.jsonl"
    # samples are 0.01 s apart: a 5 s time constant is 500 samples; the drift below takes
    # 3,000 samples (30 s), slow enough for the baseline to follow it
    cfg = write_config(
        tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=1, serial_port=pty.path,
        state_dir=state, mqtt={"enabled": False},
        scoring={"threshold": "model"},
        calibration={"enabled": True, "samples": LEARN, "margin": 4.0},
        adaptation={"enabled": True, "time_constant_s": 5.0},
        alerts={"open_k": 3, "open_n": 5, "close_m": 5},
        sinks={"console": {"enabled": False}, "jsonl": {"path": str(alerts)}})
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        agent.wait_log("open at")
        level = np.concatenate([np.zeros(LEARN), np.linspace(0, RISE, 3000), np.full(300, RISE)])
        i = write_lines(pty, 0, noisy(level, 1))
        agent.wait_log("learned its baseline")
        wait_until(lambda: drained(pty), "the agent to read every line")
        time.sleep(0.5)
        saved = state / "calibration" / "pump.json"
        agent.signal(signal.SIGTERM)           # a clean stop saves the adapted baseline
        agent.proc.wait(20)
        assert agent.proc.returncode == 0, agent.log()
        assert "Traceback" not in agent.log()
        rec = json.loads(saved.read_text())
        learned, adapted = np.array(rec["mean"]), np.array(rec["adapted_mean"])
        assert np.all(np.abs(learned) < 1.0), learned
        assert np.all(np.abs(adapted - RISE) < 1.0), adapted
        assert [e["type"] for e in events(alerts)] == [], "the slow drift raised an alert"

        again = AgentProcess(cfg, tmp_path / "agent.log").start()
        agent = again
        again.wait_log("open at")
        write_lines(pty, i, noisy(np.full(600, RISE), 2))
        again.wait_log("baseline restored")
        wait_until(lambda: drained(pty), "the agent to read every line")
        time.sleep(0.5)
        again.signal(signal.SIGTERM)
        again.proc.wait(20)
        assert "learning its baseline" not in again.log(), "it learned again"
        # at the drifted level, against the mean it first learned, every sample is 6 stds
        # off: only the resumed adapted mean keeps this silent
        assert [e["type"] for e in events(alerts)] == []
    finally:
        agent.close()
        pty.close()

"""The real agent process against a broken calibration store and an unusable state_dir
(issue 11, findings 2-4).  Real Mosquitto, a real pty as the serial port, a
persistent-session subscriber; the deterministic model of agent_harness makes every
alert id known in advance, so each test asserts the exact set of alerts received.

- `<state_dir>/calibration` read-only or full while the outbox stays writable: the
  agent keeps detecting with the baseline in memory, says so once in its log and in
  health (`state_dir`), and saves the baseline when the folder can be written again.
- A baseline file whose vectors do not have one value per model channel is refused
  with a warning and the stream learns again: no false alert, no failing stream.
- A state_dir that cannot be written is a configuration error: exit code 2, one line
  on stderr, and nothing in it touched (no outbox "moved aside").
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import agent_harness
from agent_harness import (MOSQUITTO, REPO, STREAM, THRESHOLD, assert_exact, no_traceback,
                           tiny_model, wait_until, write_config)
from test_outbox import fill, tiny_fs

from agent.model_meta import load_meta
from agent.outbox import Outbox

needs_broker = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto not installed")

LEARN = 50          # calibration.samples: the learning period, in lines
CALIBRATION = {"enabled": True, "samples": LEARN}


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} failed ({(r.stderr or r.stdout).strip()}); "
                    f"needs root with mount rights")


class Rig(agent_harness.Rig):
    """An agent that learns its baseline in `state`."""

    def __init__(self, tmp: Path, state: Path):
        super().__init__(tmp, state, calibration=CALIBRATION)

    def state_health(self) -> dict | None:
        h = self.obs.healths()
        return h[-1][1].get("state_dir") if h else None

    def stream_health(self) -> dict:
        h = self.obs.healths()
        return h[-1][1]["streams"].get(STREAM, {}) if h else {}


def _saved(path: Path) -> dict:
    return json.loads(path.read_text())


# ---------------------------------------------------------------- finding 2
@needs_broker
@pytest.mark.parametrize("broken", ["read-only", "full"])
def test_unwritable_calibration_folder_keeps_detecting_and_saves_later(tmp_path, broken):
    state = tmp_path / "state"
    with tiny_fs(state / "calibration", "64k") as cal:
        if broken == "read-only":
            _mount("-o", "remount,ro", str(cal))
            want = "Read-only file system"
        else:
            filler = fill(cal)
            want = "No space left on device"
        r = Rig(tmp_path, state)
        try:
            agent = r.agent()
            w = r.writer
            w.normal(LEARN)                  # the learning period ends: its save fails
            agent.wait_log("learned its baseline on 50 samples")
            wait_until(lambda: (r.state_health() or {}).get("ok") is False,
                       "health: state_dir failing")
            bad = r.state_health()
            assert want in bad["error"] and bad["unsaved"] == 1, bad
            expected = set(w.spikes(5))      # detection goes on with the in-memory baseline
            r.obs.wait_ids(expected)
            assert r.stream_health()["calibrated"] is True
            assert agent.count("cannot save baselines") == 1, agent.log()
            assert list(cal.glob("*.json")) == []

            if broken == "read-only":        # the folder is writable again
                _mount("-o", "remount,rw", str(cal))
            else:
                filler.unlink()
            wait_until(lambda: r.state_health() == {"ok": True, "error": None, "unsaved": 0},
                       "health: state_dir ok again")
            agent.wait_log("baselines saved again")
            rec = _saved(cal / f"{STREAM}.json")
            assert rec["model_sha256"] == load_meta(r.model).onnx_sha256
            assert rec["mean"] == [0.0, 0.0, 0.0] and rec["samples"] == LEARN
            expected |= set(w.spikes(3))
            r.obs.wait_ids(expected)
            stats = assert_exact(r.obs, expected)
            print(f"calibration folder {broken}: {stats}; logged once, saved after recovery")
            assert agent.count("cannot save baselines") == 1
            assert agent.count("baselines saved again") == 1
            agent.signal(signal.SIGTERM)
            assert agent.proc.wait(30) == 0, agent.log()
            no_traceback(agent)
        finally:
            r.close()


# ---------------------------------------------------------------- finding 3
# Broadcast to three channels, a mean of 50 puts normal lines (0,0,0) 50 stds away: had
# such a file been used, every normal window would be an alert.  A wrong type in an
# optional key used to pass the check and crash the daemon when the first sample restored it.
BAD_FILES = {
    "mean of 1": ({"mean": [50.0], "std": [1.0]}, "'mean' has 1 value(s), the model has 3 channel(s)"),
    "mean of 4": ({"mean": [50.0] * 4, "std": [1.0] * 4},
                  "'mean' has 4 value(s), the model has 3 channel(s)"),
    "samples as text": ({"samples": "abc"}, "'samples' is 'abc', expected a whole number >= 0"),
    "level as text": ({"level": ["a", "b", "c"]}, "'level' must be a list of numbers"),
    "adapted level of 0": ({"adapted_level": [0.0, 1.0, 1.0]}, "'adapted_level' must be > 0"),
}


@needs_broker
@pytest.mark.parametrize("bad", list(BAD_FILES))
def test_invalid_calibration_file_is_refused_and_learned_again(tmp_path, bad):
    state = tmp_path / "state"
    r = Rig(tmp_path, state)
    try:
        sha = load_meta(r.model).onnx_sha256
        path = state / "calibration" / f"{STREAM}.json"
        path.parent.mkdir(parents=True)
        fields, reason = BAD_FILES[bad]
        path.write_text(json.dumps({"schema": 1, "stream": STREAM, "model_sha256": sha,
                                    "mean": [50.0] * 3, "std": [1.0] * 3,
                                    "threshold": THRESHOLD, "samples": 400, **fields}))
        agent = r.agent()
        w = r.writer
        w.normal(LEARN)                      # the stream is created (and its file read) now
        agent.wait_log("learned its baseline on 50 samples")
        msg = f"is invalid ({reason}); learning again"
        assert agent.count(msg) == 1, agent.log()
        assert agent.count("baseline restored") == 0
        assert agent.count("learning its baseline") == 1
        w.normal(100)                        # normal data after learning: no alert
        expected = set(w.spikes(3))
        r.obs.wait_ids(expected)
        stats = assert_exact(r.obs, expected)
        print(f"calibration file with {bad}: refused, learned again; {stats}")
        wait_until(lambda: r.stream_health().get("samples") == w.i, "health after all lines")
        h = r.obs.healths()[-1][1]
        assert h["errors"] == {} and h["streams"][STREAM]["calibrated"] is True, h
        rec = _saved(path)                   # the learned baseline replaced the bad file
        assert rec["mean"] == [0.0, 0.0, 0.0] and len(rec["std"]) == 3
        assert agent.running()
        no_traceback(agent)
    finally:
        r.close()


# ---------------------------------------------------------------- finding 4
@pytest.mark.parametrize("how", ["below-a-file", "read-only-mount"])
def test_unwritable_state_dir_is_a_config_error_with_exit_2(tmp_path, how):
    mounted = None
    if how == "below-a-file":
        (tmp_path / "afile").write_text("not a folder")
        state = tmp_path / "afile" / "state"
        want = f"{tmp_path / 'afile'} is not a folder"
    else:
        mounted = state = tmp_path / "state"
        state.mkdir()
        _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(state))
        # the case: an outbox with an undelivered event is already there
        ob = Outbox(state / "outbox.sqlite")
        ob.put("tsad/rb/alerts", json.dumps({"type": "new", "id": "rb:pump:1"}).encode(), "new")
        ob.close()
        _mount("-o", "remount,ro", str(state))
        want = "Read-only file system"
    try:
        before = {p.name: p.read_bytes() for p in state.iterdir()} if mounted else {}
        cfg = write_config(tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=1,
                           serial_port="/dev/null", state_dir=state)
        p = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        lines = p.stderr.strip().splitlines()
        print(f"state_dir {how}: rc {p.returncode}, stderr {lines}")
        assert p.returncode == 2, p.stderr
        assert len(lines) == 1 and p.stdout == "", p.stderr
        assert lines[0].startswith(f"error: state_dir: {state} is not writable ({want})")
        assert "Traceback" not in p.stderr and "moved" not in p.stderr
        if mounted:
            assert {q.name: q.read_bytes() for q in state.iterdir()} == before
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mounted)], check=False)

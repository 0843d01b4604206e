"""The daemon's threads around the engine (agent.pipeline): sources in, sinks out,
handover on reload; and the CLI commands built on them, with a real ONNX model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agent.config import AgentConfig
from agent.config_build import build
from agent.daemon import build_engine
from agent.detector import Detector
from agent.jobs import Recording, file_config
from agent.metrics import Metrics
from agent.pipeline import STEP_SAMPLES, WAIT_MAX_S, Pipeline, auto_wait
from agent.sinks.base import Sink
from agent.sources.base import Batch
from conftest import REPO
from onnx_factory import make_model

CH = ["a", "b", "c"]
W = 16


@pytest.fixture
def model(tmp_path):
    path, _ = make_model(tmp_path / "m.onnx", window=W, channels=CH, kind="timemix")
    return str(path)


def cfg_for(model: str, state_dir, **over) -> AgentConfig:
    d = {"node": "t", "state_dir": str(state_dir) if state_dir else None,
         "model": {"path": model},
         "streams": [{"id": "s1", "source": {"type": "serial", "port": "/dev/null"}}],
         "mqtt": {"enabled": False}, "sinks": {"console": {"enabled": False}}}
    d.update(over)
    return build(AgentConfig, d)


def normal(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    return (np.sin(t / 5.0 + np.arange(3)) + rng.normal(0, 0.05, (n, 3))).astype(np.float32)


def feed(p: Pipeline, stream: str, values: np.ndarray, t0: float = 1e9, block: int = 64):
    for i in range(0, len(values), block):
        v = values[i:i + block]
        p.process([Batch(stream, t0 + np.arange(i, i + len(v), dtype=np.float64), v)])


class RecordSink(Sink):
    """What the pipeline hands to its sinks, kept as results."""

    def __init__(self):
        self.rec = Recording()
        self.alerts: list[dict] = []
        self.states: list[tuple[str, str]] = []

    def scores(self, stream, ts, scores, threshold, labels, alert_open):
        self.rec.blocks.setdefault(stream, []).append(
            type("R", (), {"ts": ts, "scores": scores, "labels": labels,
                           "alert_open": alert_open, "threshold": threshold})())

    def alert(self, alert):
        self.alerts.append(alert)

    def state(self, stream, state):
        self.states.append((stream, state))

    def table(self, stream):
        return self.rec.table(stream)


def pipeline(cfg: AgentConfig, sinks, metrics=None, handover=None) -> Pipeline:
    metrics = metrics or Metrics()
    return Pipeline(cfg, build_engine(cfg, Detector.from_config(cfg.model, metrics), metrics),
                    sinks, handover=handover)


class Broken(Sink):
    def scores(self, *a):
        raise RuntimeError("disk full")


def test_a_failing_sink_does_not_stop_the_others(model):
    rec = RecordSink()
    p = pipeline(cfg_for(model, None), [Broken(), rec])
    feed(p, "s1", normal(100))
    assert len(rec.table("s1")["ts"]) == 100 - W + 1
    assert p.metrics.errors["sink"] == 2


@pytest.mark.parametrize("ends_by", ["idle", "stop"])
def test_fits_held_back_are_done_without_new_samples(model, monkeypatch, ends_by):
    """Learning periods that end together are fitted one a step here (agent/fit_budget.py);
    the daemon does the rest while no sample comes, and at the latest when it stops, and
    the samples held back meanwhile are scored."""
    import agent.fit_budget as fit_budget
    monkeypatch.setattr(fit_budget, "FIT_SECONDS", 0.0)
    rec = RecordSink()
    p = pipeline(cfg_for(model, None, calibration={"enabled": True, "samples": 100}), [rec])
    ts = 1e9 + np.arange(120, dtype=np.float64)
    p.process([Batch(f"s{i}", ts, normal(120, seed=i)) for i in range(3)])
    assert len(p.engine.held_back) == 2
    if ends_by == "idle":
        p.run(interrupted=lambda: not p.engine.held_back)
    else:
        p.stop()
    assert not p.engine.held_back
    for i in range(3):
        assert len(rec.table(f"s{i}")["ts"]) == 20
        assert (f"s{i}", "normal") in rec.states


class SlowSink(Sink):
    """A sink that takes `delay` s per step (fixed per-step cost, no inference) and can
    queue a batch while it runs, as a source would under load."""

    def __init__(self, delay: float):
        self.delay, self.arrives = delay, None

    def scores(self, *a):
        time.sleep(self.delay)
        if self.arrives is not None:
            self.arrives[0].queue.put(self.arrives[1])
            self.arrives = None


def test_auto_batch_wait_holds_the_next_step_only_while_work_queues_up(model):
    slow = SlowSink(0.02)
    p = pipeline(cfg_for(model, None), [slow])
    assert p.cfg.model.batch_wait_s == "auto"
    feed(p, "s1", normal(2 * W))
    # quiet: nothing arrived during the step, so the next sample is stepped at once
    assert p._next_step <= time.monotonic()
    more = normal(W, seed=1)
    slow.arrives = (p, Batch("s1", 2e9 + np.arange(W, dtype=np.float64), more))
    feed(p, "s1", normal(W, seed=2), t0=1.5e9)
    # under load: the next step waits ~9x the step's 20 ms of non-inference cost
    assert p._next_step - time.monotonic() > 0.1
    assert p.queue.qsize() == 1


def test_auto_batch_wait_lets_streams_bring_enough_samples_per_step():
    # a cheap step of 50 streams at 100 Hz (2 samples each over 20 ms): waiting 9x its
    # 1 ms would keep steps this small; it waits until each stream brings STEP_SAMPLES
    w = auto_wait(overhead=0.001, held=2, span=0.02, took=0.002)
    assert w == pytest.approx(STEP_SAMPLES * 0.01 - 0.002)
    # ... and 9x the overhead where that is longer (a slow machine)
    assert auto_wait(overhead=0.05, held=2, span=0.02, took=0.06) == pytest.approx(0.45)
    # slow streams: never longer than WAIT_MAX_S, the bound on the latency it adds
    assert auto_wait(overhead=0.001, held=1, span=0.5, took=0.001) == WAIT_MAX_S
    # the first step (no span yet) or a step that held nothing: the overhead rule alone
    assert auto_wait(overhead=0.002, held=3, span=0.0, took=0.003) == pytest.approx(0.018)
    assert auto_wait(overhead=0.002, held=0, span=0.1, took=0.003) == pytest.approx(0.018)


def test_replay_source_through_pipeline_matches_file(model, tmp_path):
    import pandas as pd
    v = normal(300)
    f = tmp_path / "data.csv"
    pd.DataFrame(v, columns=CH).assign(
        timestamp=pd.date_range("2024-01-01", periods=300, freq="s")).to_csv(f, index=False)
    cfg = file_config(str(f), model, None)
    rec = RecordSink()
    p = pipeline(cfg, [rec])
    p.start()
    p.run(until_exhausted=True)
    p.stop()
    assert p.metrics.samples_in == 300
    assert len(rec.table("replay")["ts"]) == 300 - W + 1


def _replay_file(tmp_path, n: int):
    import pandas as pd
    f = tmp_path / "data.csv"
    pd.DataFrame(normal(n), columns=CH).assign(
        timestamp=1e9 + np.arange(n) * 0.001).to_csv(f, index=False)
    return f


def test_stop_hands_a_running_source_to_the_next_pipeline_without_loss(model, tmp_path):
    # a replay at real time (2 s) stopped in the middle, as a reload does
    f = _replay_file(tmp_path, 2000)
    over = {"streams": [{"id": "replay", "source": {"type": "replay", "path": str(f),
                                                    "speed": 1.0, "chunk": 16}}]}
    cfg = file_config(str(f), model, None, over)
    metrics = Metrics()
    rec1, rec2 = RecordSink(), RecordSink()
    p1 = pipeline(cfg, [rec1], metrics=metrics)
    p1.start()
    p1.run(interrupted=lambda: metrics.samples_in >= 300)
    keep = p1.reusable_sources(cfg, CH)
    assert keep == {"replay"}
    handover = p1.stop(keep=keep)
    src = p1.runners[0].source
    p2 = pipeline(cfg, [rec2], metrics=metrics, handover=handover)
    assert p2.runners[0].source is src, "the running source was rebuilt, not handed over"
    p2.start()
    p2.run(until_exhausted=True)
    p2.stop()
    n1 = p1.engine.streams["replay"].samples
    n2 = p2.engine.streams["replay"].samples
    assert 0 < n1 < 2000 and n1 + n2 == 2000 == metrics.samples_in
    # every sample once and in order: the second pipeline's windows start where the
    # first one's samples ended (after its own warm-up of W - 1 samples)
    t1, t2 = rec1.table("replay")["ts"], rec2.table("replay")["ts"]
    assert np.all(np.diff(t1) > 0) and np.all(np.diff(t2) > 0)
    assert t2[0] == pytest.approx(1e9 + (n1 + W - 1) * 0.001)
    assert t2[-1] == pytest.approx(1e9 + 1999 * 0.001)
    # an ended source is not handed over again: the next pipeline would sit without one
    assert p2.reusable_sources(cfg, CH) == set()


def test_a_changed_source_channel_order_or_broker_is_not_reused(model, broker, tmp_path):
    master, slave = os.openpty()
    serial = {"type": "serial", "port": os.ttyname(slave)}
    mq = {"type": "mqtt", "topic": "plant/pump/sensors"}
    streams = [{"id": "s", "source": serial}, {"id": "m", "source": mq}]
    mqtt = {"enabled": True, "host": "127.0.0.1", "port": broker.port}
    cfg = cfg_for(model, None, streams=streams, mqtt=mqtt)
    p = pipeline(cfg, [])
    assert p.reusable_sources(cfg, CH) == set(), "sources that never started are not running"
    p.start()
    try:
        assert p.reusable_sources(cfg, CH) == {"s", "m"}
        assert p.reusable_sources(cfg, ["b", "a", "c"]) == set()
        moved = cfg_for(model, None, mqtt=mqtt, streams=[
            {"id": "s", "source": {**serial, "baud": 9600}}, {"id": "m", "source": mq}])
        assert p.reusable_sources(moved, CH) == {"m"}
        other_broker = cfg_for(model, None, streams=streams, mqtt={**mqtt, "port": 1})
        assert p.reusable_sources(other_broker, CH) == {"s"}
        gone = cfg_for(model, None, streams=streams[:1], mqtt=mqtt)
        assert p.reusable_sources(gone, CH) == {"s"}
    finally:
        p.stop()
        os.close(master)
        os.close(slave)
    assert p.reusable_sources(cfg, CH) == set(), "stopped sources are not running"


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120, **kw)


def test_cli_check_config_reports_errors_with_lines(tmp_path, model):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"node: n\nmodel:\n  path: {model}\n  threds: 2\nstreams: []\n")
    r = run_cli("check-config", str(bad))
    assert r.returncode == 1
    assert f"{bad}:4: model.threds: unknown key" in r.stderr
    good = tmp_path / "good.yaml"
    good.write_text(f"node: n\nmodel:\n  path: {model}\nstreams:\n"
                    f"  - id: s\n    source: {{type: serial, port: /dev/null}}\n")
    r = run_cli("check-config", str(good))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_cli_check_config_refuses_tampered_model(tmp_path, model):
    data = bytearray(open(model, "rb").read())
    data[-5] ^= 0xFF
    open(model, "wb").write(bytes(data))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"node: n\nmodel:\n  path: {model}\nstreams:\n"
                   f"  - id: s\n    source: {{type: serial, port: /dev/null}}\n")
    r = run_cli("check-config", str(cfg))
    assert r.returncode == 1 and "sha256" in r.stderr


@pytest.mark.parametrize("how", ["tampered", "newer-format", "missing"])
def test_cli_run_refuses_a_model_it_cannot_load_with_exit_2(tmp_path, model, how):
    """Upgrade audit F4: exit 2, which the unit's RestartPreventExitStatus=2 fails once,
    not 1, which it restarted every 5 s up to StartLimitBurst: no restart mends the model."""
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "m.onnx"
    shutil.copy(model, path)
    shutil.copy(model + ".json", str(path) + ".json")
    if how == "tampered":             # an older .onnx beside newer metadata, say
        path.write_bytes(path.read_bytes()[:-5] + b"xxxxx")
    elif how == "newer-format":
        meta = json.loads(Path(str(path) + ".json").read_text())
        Path(str(path) + ".json").write_text(json.dumps({**meta, "format_version": 2}))
    else:
        path.unlink()
    want = {"tampered": "does not match metadata", "newer-format": "'format_version' is 2",
            "missing": "model file not found"}[how]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"node: n\nstate_dir: null\nmodel:\n  path: {path}\nmqtt: {{enabled: false}}\n"
                   f"streams:\n  - id: s\n    source: {{type: serial, port: /dev/null}}\n")
    r = run_cli("run", "-c", str(cfg))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], r.stderr


def test_cli_replay_writes_per_window_csv(tmp_path, model):
    import pandas as pd
    f = tmp_path / "data.csv"
    pd.DataFrame(normal(500), columns=CH).to_csv(f, index=False)
    out = tmp_path / "scores.csv"
    r = run_cli("replay", str(f), "--model", model, "--calibrate", "200", "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out)
    assert list(df.columns) == ["timestamp", "score", "label", "alert"]
    assert len(df) == 300 and df["score"].notna().all()


def test_cli_replay_learns_as_the_model_policy_says_unless_told(tmp_path, model):
    """No flag: the model's policy, as evaluate; --calibrate N: N rows; 0: the bare model."""
    import pandas as pd

    from agent.model_meta import load_meta, meta_path_for
    meta = load_meta(model)
    meta.policy = {"settings": {"calibration": {"enabled": True, "samples": 50}}}
    meta.save(meta_path_for(model))
    f = tmp_path / "data.csv"
    pd.DataFrame(normal(500), columns=CH).to_csv(f, index=False)

    def windows(*flags) -> int:
        out = tmp_path / "scores.csv"
        r = run_cli("replay", str(f), "--model", model, "--out", str(out), "-q", *flags)
        assert r.returncode == 0, r.stderr
        return len(pd.read_csv(out))

    assert windows() == 500 - 50
    assert windows("--calibrate", "200") == 500 - 200
    assert windows("--calibrate", "0") == 500 - W + 1


def test_cli_demo_opens_and_closes_an_alert_inside_the_labeled_anomaly():
    """README's first command, as a user runs it: no broker, no extra files."""
    from conftest import MODELS
    if not (MODELS / "DLinear_ad.onnx").exists():
        pytest.skip("shipped models missing")
    r = run_cli("demo")
    assert r.returncode == 0, r.stderr
    assert "ALERT new" in r.stdout and "ALERT end" in r.stdout, r.stdout
    assert "1 opened, 1 closed" in r.stderr, r.stderr

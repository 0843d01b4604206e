"""agent.preflight: what `run` would refuse, found without starting, and the warnings about
a config that starts but overrules its model; shared by check-config, run and reload."""
from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agent.config import AgentConfig, ConfigError
from agent.config_build import build
from agent.daemon import Daemon
from agent.model_meta import load_meta, meta_path_for
from agent.preflight import check
from conftest import REPO
from onnx_factory import make_model

CH = ["a", "b", "c"]
POLICY = {"settings": {"calibration": {"enabled": True, "samples": 50, "margin": 2.0},
                       "scoring": {"smoothing": 10}}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, meta = make_model(tmp_path_factory.mktemp("m") / "pol.onnx", window=8, channels=CH,
                            kind="timemix", name="pol")
    meta.policy = POLICY
    meta.save(meta_path_for(path))
    return path


def cfg_for(path, **over) -> AgentConfig:
    d = {"node": "t", "state_dir": None, "model": {"path": str(path)},
         "streams": [{"id": "s", "source": {"type": "serial", "port": "/dev/null"}}],
         "mqtt": {"enabled": False}}
    d.update(over)
    return build(AgentConfig, d)


def findings(path, **over):
    return check(cfg_for(path, **over), load_meta(path))


def test_a_config_that_leaves_detection_to_the_model_is_only_told_how_long_to_learn(model):
    f = findings(model)
    assert (f.problems, f.warnings) == ([], [])
    assert f.notes == ["each stream learns its baseline on its first 50 samples (0.833 min at "
                       "1 Hz); a deployment should learn for 30 min or more of normal running, "
                       "its warm-up and usual variation included: set calibration.duration_s "
                       "(README: How long to learn)"]
    f = findings(model, calibration={"duration_s": 1800})
    assert (f.problems, f.warnings, f.notes) == ([], [], [])


def test_a_learning_period_known_to_be_short_is_warned(model):
    (w,) = findings(model, calibration={"duration_s": 600}).warnings
    assert w.startswith("calibration.duration_s: 600 s; a deployment should learn for 30 min")
    # 50 samples: 25 minutes at 30 s, 50 minutes at 60 s; a stream with no interval_s is
    # told in a note, since its length in time is learned
    streams = [{"id": i, "interval_s": dt, "source": {"type": "serial", "port": "/dev/null"}}
               for i, dt in (("fast", 30), ("slow", 60), ("unknown", None))]
    f = findings(model, streams=streams)
    (w,) = f.warnings
    assert w.startswith("stream fast learns on its first 50 samples, under 30 min at "
                        "interval_s;")
    (w,) = findings(model, streams=[{**streams[0], "id": "f2"}] + streams).warnings
    assert w.startswith("streams f2, fast learn on their first 50 samples")
    (n,) = f.notes
    assert n.startswith("each stream learns its baseline on its first 50 samples")
    f = findings(model, streams=streams[1:2])
    assert (f.warnings, f.notes) == ([], [])
    # no learning period: nothing to say about its length
    f = findings(model, calibration={"enabled": False})
    assert not any("deployment should learn" in x for x in f.warnings + f.notes)


def test_a_refinement_that_cannot_act_is_told(model):
    refine = {"refine": {"after_s": 600, "span_s": 900}}
    # at 1 s a sample, 900 s hold 900 windows: fewer than the 1,000 the 0.99 quantile needs
    streams = [{"id": i, "interval_s": dt, "source": {"type": "serial", "port": "/dev/null"}}
               for i, dt in (("fast", 0.5), ("slow", 1.0))]
    f = findings(model, calibration={"duration_s": 1800, **refine}, streams=streams)
    (w,) = f.warnings
    assert w == ("calibration.refine.span_s: 900 s holds fewer than the 1000 windows its "
                 "quantile needs at the interval_s of stream(s) slow: their thresholds stay "
                 "as learned")
    f = findings(model, calibration={"duration_s": 1800, **refine},
                 scoring={"threshold": 0.5})
    assert f.notes == ["calibration.refine refines a threshold the learning period fits: "
                       "with this calibration and scoring.threshold it does nothing"]
    # no stream's interval is known: nothing to say about the span
    f = findings(model, calibration={"duration_s": 1800, **refine})
    assert (f.warnings, f.notes) == ([], [])


def test_turning_off_the_learning_period_a_model_asks_for_is_warned(model):
    (w,) = findings(model, calibration={"enabled": False}).warnings
    assert w.startswith("model pol asks for a learning period (its policy: calibration on the "
                        "first 50 samples) but the config sets calibration.enabled: false")
    (w,) = findings(model, model={"path": str(model), "policy": False}).warnings
    assert "but model.policy is false" in w
    assert findings(model, calibration={"enabled": True}).warnings == []


def test_a_key_the_config_sets_against_the_policy_is_named(model):
    f = findings(model, scoring={"smoothing": 3, "normalize": "channel"},
                 calibration={"margin": 2.0})
    assert f.warnings == ["scoring.smoothing: the config's 3 overrules model pol's policy (10)"]
    assert f.problems == []


def test_a_missing_serial_port_is_a_note_not_a_problem(model, tmp_path):
    port = tmp_path / "ttyUSB9"
    f = findings(model, streams=[{"id": "s", "source": {"type": "serial", "port": str(port)}},
                                 {"id": "u", "source": {"type": "serial", "port": "loop://"}}],
                 calibration={"duration_s": 1800})      # no learning note
    assert f.problems == [] and f.warnings == []
    assert f.notes == [f"streams[0] (s): serial port {port} is not there now; the agent starts "
                       f"without it and opens it when it appears"]


def test_nothing_is_created_or_connected(model, tmp_path):
    state, alerts = tmp_path / "a" / "state", tmp_path / "b" / "alerts.jsonl"
    f = findings(model, state_dir=str(state), sinks={"jsonl": {"path": str(alerts)}},
                 mqtt={"host": "127.0.0.1", "port": 1})   # nothing listens on port 1
    assert f.problems == []
    assert list(tmp_path.iterdir()) == []


def test_every_problem_is_listed_once(model, tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    (tmp_path / "f").write_text("")
    mqtt = {"host": "127.0.0.1", "username": "u", "password_credential": "pw"}
    f = findings(model, state_dir=str(tmp_path / "f"), mqtt=mqtt, streams=[
        {"id": "m1", "source": {"type": "mqtt", "topic": "a/+"}},
        {"id": "m2", "source": {"type": "mqtt", "topic": "b/+"}},
        {"id": "r", "source": {"type": "replay", "path": str(tmp_path / "no.csv")}}])
    assert f.problems == [
        f"state_dir: {tmp_path / 'f'} is not writable (not a folder); the alert outbox and "
        f"learned baselines live there",
        "mqtt.password_credential: $CREDENTIALS_DIRECTORY is not set (use LoadCredential= in "
        "the systemd unit)",
        f"streams[2] (r).source: {tmp_path / 'no.csv'}: no such file or directory"]


def test_the_daemon_refuses_what_check_finds(model, tmp_path):
    cfg = cfg_for(model, streams=[{"id": "r", "source": {"type": "replay",
                                                         "path": str(tmp_path / "no.csv")}}])
    with pytest.raises(ConfigError) as e:
        Daemon("unused.yaml", cfg)
    assert e.value.problems == check(cfg, load_meta(model)).problems != []


def test_a_reload_to_a_config_run_would_refuse_keeps_the_running_one(model, tmp_path, caplog):
    data = tmp_path / "d.csv"
    pd.DataFrame(np.zeros((20, 3)), columns=CH).to_csv(data, index=False)
    path = tmp_path / "c.yaml"
    text = (f"node: t\nstate_dir: null\nmodel: {{path: {model}}}\nmqtt: {{enabled: false}}\n"
            f"sinks: {{console: {{enabled: false}}}}\n"
            f"streams:\n  - id: r\n    source: {{type: replay, path: {data}}}\n")
    path.write_text(text)
    from agent.config import load_config
    d = Daemon(str(path), load_config(path))
    running = d.pipeline
    path.write_text(text.replace(str(data), str(tmp_path / "gone.csv")))
    with caplog.at_level(logging.ERROR, logger="tsad.daemon"):
        d.reload()
    assert d.pipeline is running and d.cfg.streams[0].source.path == str(data)
    assert "reload rejected, keeping the running config and model: streams[0] (r).source: " \
           f"{tmp_path / 'gone.csv'}: no such file or directory" in caplog.text


def test_check_config_prints_warnings_and_notes_and_still_says_ok(model, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"node: t\nstate_dir: null\nmodel: {{path: {model}}}\nmqtt: {{enabled: false}}\n"
                    f"calibration: {{enabled: false}}\nscoring: {{smoothing: 3}}\n"
                    f"streams:\n  - id: s\n    source: {{type: serial, port: {tmp_path}/tty}}\n")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(path)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{path}: OK")
    lines = r.stderr.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["warning", "warning", "note"], lines
    assert "asks for a learning period" in lines[0] and "scoring.smoothing" in lines[1]


def test_check_config_finds_a_metrics_port_in_use_but_run_does_not_probe_its_own(model):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = cfg_for(model, metrics={"listen": port})
        probed = check(cfg, load_meta(model), probe_listen=True)
        assert probed.problems == [f"metrics.listen: cannot listen on 127.0.0.1:{port}: "
                                   f"Address already in use"]
        # the daemon binds its endpoint before this check: a probe would find its own port
        assert check(cfg, load_meta(model)).problems == []
    assert check(cfg, load_meta(model), probe_listen=True).problems == []


@pytest.mark.parametrize("settings", [{"calibration": {"samples": "many"}},    # no enabled: true
                                      {"calibration": {"enabled": True},
                                       "scoring": {"smoothing": "ten"}}])
def test_a_model_policy_the_agent_does_not_accept_is_a_problem_for_check_and_run(tmp_path, settings):
    path, meta = make_model(tmp_path / "bad.onnx", window=8, channels=CH, kind="timemix",
                            name="bad")
    meta.policy = {"settings": settings}
    meta.save(meta_path_for(path))
    f = findings(path)
    key, value = ("calibration.samples", "'many'") if "scoring" not in settings else \
        ("scoring.smoothing", "'ten'")
    assert len(f.problems) == 1 and f.problems[0].startswith(
        f"model bad: policy.settings.{key}: value {value} is invalid"), f.problems
    with pytest.raises(ConfigError) as e:       # run refuses at start, as check-config says
        Daemon("unused.yaml", cfg_for(path))
    assert e.value.problems == f.problems
    conf = tmp_path / "c.yaml"
    conf.write_text(f"node: t\nstate_dir: null\nmodel: {{path: {path}}}\nmqtt: {{enabled: false}}\n"
                    f"streams:\n  - id: s\n    source: {{type: serial, port: /dev/null}}\n")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(conf)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{conf}: INVALID" in r.stdout + r.stderr


def test_a_policy_key_from_a_newer_tool_says_to_upgrade_not_to_check_the_spelling(tmp_path):
    """Upgrade audit F3: a key only the metadata's policy holds (the config's own keys are
    checked when it loads) is a setting from a newer tsad-export / fit-policy, not a typo."""
    from agent import __version__
    path, meta = make_model(tmp_path / "new.onnx", window=8, channels=CH, kind="timemix",
                            name="new")
    meta.policy = {"settings": {"calibration": {"enabled": True, "warm_start": True}}}
    meta.save(meta_path_for(path))
    want = (f"model new: policy.settings.calibration.warm_start: a key this agent (tsad-agent "
            f"{__version__}) does not know: the policy was likely written by a newer "
            f"tsad-export or fit-policy; upgrade the agent, or refit the policy with this "
            f"version (tsad-agent fit-policy MODEL --data ... --write)")
    assert findings(path).problems == [want]
    conf = tmp_path / "c.yaml"
    conf.write_text(f"node: t\nstate_dir: null\nmodel: {{path: {path}}}\nmqtt: {{enabled: false}}\n"
                    f"streams:\n  - id: s\n    source: {{type: serial, port: /dev/null}}\n")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "run", "-c", str(conf)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {want}"], r.stderr
    # the same key in the config is the user's: a typo, as before
    conf.write_text(conf.read_text() + "calibration: {warm_start: true}\n")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(conf)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 1 and "calibration.warm_start: unknown key" in r.stderr
    assert "check the spelling" in r.stderr and "newer tsad-export" not in r.stderr


def test_a_state_dir_that_cannot_be_created_is_found_by_trying(model):
    # /proc passes os.access for root but refuses every mkdir: `run` would fail on it
    f = findings(model, state_dir="/proc/tsad-test")
    assert f.problems == ["state_dir: /proc/tsad-test is not writable (cannot create it in "
                          "/proc: no such file or directory); the alert outbox and learned "
                          "baselines live there"]
    assert not any(p.name.startswith(".tsad-write-test-") for p in Path("/tmp").iterdir())
    assert findings(model, state_dir="/tmp/tsad-preflight-test/a/b").problems == []
    assert not Path("/tmp/tsad-preflight-test").exists()      # the check leaves nothing


@pytest.mark.parametrize("training, error", [
    (None, "'training' must be an object, got null"),
    ([1], "'training' must be an object, got [1]"),
    ({"calibration_rows": "400"}, "'training.calibration_rows' is '400', expected null or"),
    ({"calibration_rows": 0}, "'training.calibration_rows' is 0, expected null or"),
])
def test_training_metadata_of_the_wrong_kind_is_refused_by_name(tmp_path, training, error):
    """Not a traceback in the policy's lookup, in every command that reads the model."""
    from agent.model_meta import ModelMetaError
    path, meta = make_model(tmp_path / "t.onnx", window=8, channels=CH, kind="timemix")
    meta.training = training
    meta.save(meta_path_for(path))
    with pytest.raises(ModelMetaError, match=re.escape(error)):
        load_meta(path)


def test_a_learning_period_from_training_rows_the_agent_refuses_names_where_it_came_from(tmp_path):
    path, meta = make_model(tmp_path / "t.onnx", window=8, channels=CH, kind="timemix", name="t")
    meta.training = {"calibration_rows": 5}
    meta.save(meta_path_for(path))
    f = findings(path)
    assert f.problems == ["model t: training.calibration_rows sets the learning period: "
                          "calibration.samples: value 5 is invalid: expected an integer >= 10"]


def test_a_model_that_reads_a_label_column_is_refused(tmp_path):
    from agent.model_meta import ModelMetaError
    path, meta = make_model(tmp_path / "t.onnx", window=8, channels=["a", "b", "Anomaly"],
                            kind="timemix")
    with pytest.raises(ModelMetaError, match=r"'channels' holds the label column\(s\) "
                                             r"\['Anomaly'\], which no sensor sends"):
        load_meta(path)


@pytest.mark.parametrize("host, tls, warned", [
    ("192.0.2.10", None, True), ("broker.plant", None, True), ("127.0.0.1", None, False),
    ("localhost", None, False), ("::1", None, False), ("192.0.2.10", "ca", False)])
def test_a_password_sent_in_clear_to_another_host_is_warned(model, tmp_path, monkeypatch,
                                                            host, tls, warned):
    monkeypatch.setenv("PW", "x")
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    mqtt = {"host": host, "username": "u", "password_env": "PW"}
    if tls:
        mqtt["tls"] = {"ca_file": str(ca)}
    f = findings(model, mqtt=mqtt)
    clear = [w for w in f.warnings if "in clear text" in w]
    assert clear == ([f"mqtt: the broker password goes to {host} in clear text (no mqtt.tls): "
                      "anyone on the network path can read it and command the agent; set "
                      "mqtt.tls, or run the broker on this host"] if warned else [])
    # without a password there is nothing to read
    assert not any("in clear text" in w for w in findings(model, mqtt={"host": host}).warnings)
    # the sink off, an MQTT source still logs in to the broker
    f = findings(model, mqtt={**mqtt, "enabled": False},
                 streams=[{"id": "s", "source": {"type": "mqtt", "topic": "p/s"}}])
    assert [w for w in f.warnings if "in clear text" in w] == clear

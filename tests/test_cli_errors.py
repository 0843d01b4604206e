"""Both CLIs as a user runs them (subprocesses): every usage or config error is one line on
stderr and exit 2, never a traceback; and `run` refuses exactly what check-config finds."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from onnx_factory import make_model

CH = ["a", "b", "c"]


def cli(module: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=120, env={**clean, **(env or {})})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model, _ = make_model(d / "m.onnx", window=8, channels=CH, kind="timemix")
    rng = np.random.default_rng(0)
    pd.DataFrame(rng.normal(size=(60, 3)), columns=CH).to_csv(d / "good.csv", index=False)
    pd.DataFrame(rng.normal(size=(60, 2)), columns=["x", "y"]).to_csv(d / "other.csv", index=False)
    newest_first = pd.DataFrame(rng.normal(size=(60, 3)), columns=CH)
    newest_first.insert(0, "time", 1583750073.0 - 0.1 * np.arange(60))
    newest_first.to_csv(d / "newest_first.csv", index=False)
    (d / "blocker").write_text("a file where a folder should be\n")
    (d / "bad.yaml").write_text(f"node: n\nmodel:\n  path: {model}\n  threds: 2\nstreams: []\n")
    return {"dir": d, "model": model, "good": d / "good.csv", "other": d / "other.csv",
            "missing": d / "missing.csv", "newest_first": d / "newest_first.csv", "blocker": d / "blocker", "bad_yaml": d / "bad.yaml",
            "replay_missing": config(d, "replay_missing",
                                     f"{{type: replay, path: {d / 'missing.csv'}}}")}


def config(d: Path, name: str, source: dict, *, mqtt: str = "{enabled: false}",
           state_dir: str = "null", extra: str = "", model: Path | None = None) -> Path:
    path = d / f"{name}.yaml"
    path.write_text(f"node: n\nstate_dir: {state_dir}\nmodel: {{path: {model or d / 'm.onnx'}}}\n"
                    f"mqtt: {mqtt}\nstreams:\n  - id: s\n    source: {source}\n{extra}")
    return path


def one_error_line(r: subprocess.CompletedProcess, prefix: str) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and errors[0].startswith(prefix), r.stderr
    return errors[0]


# ------------------------------------------------------------------ tsad-agent
AGENT_CASES = [
    # (case id, arguments, expected text of the one error line)
    ("replay-missing-file", ["replay", "{missing}", "-m", "{model}", "-q"],
     "error: {missing}: no such file or directory"),
    ("replay-without-the-model-columns", ["replay", "{other}", "-m", "{model}", "-q"],
     "missing column(s) ['a', 'b', 'c']"),
    ("replay-unknown-model", ["replay", "{good}", "-m", "NoSuchModel"],
     "error: model 'NoSuchModel' is neither a file nor a shipped model ("),
    ("replay-bad-flag-value", ["replay", "{good}", "--speed", "fast"],
     "error: argument --speed: invalid float value: 'fast' (see tsad-agent replay --help)"),
    ("replay-bad-stream-id", ["replay", "{good}", "-m", "{model}", "--stream", "a b", "-q"],
     "error: streams[0].id: value 'a b' is invalid: expected a name of 1-128 letters, digits, "
     "'_', '.' and '-'"),
    ("replay-no-file", ["replay"], "the following arguments are required: file"),
    ("unknown-command", ["bogus"], "error: argument cmd: invalid choice: 'bogus'"),
    ("run-missing-config", ["run", "-c", "{missing}"], "error: {missing}: no such file"),
    ("run-invalid-config", ["run", "-c", "{bad_yaml}"], "model.threds: unknown key"),
    ("run-missing-replay-path", ["run", "-c", "{replay_missing}"],
     "error: streams[0] (s).source: {missing}: no such file or directory"),
    ("check-config-missing-file", ["check-config", "{missing}"], "error: {missing}: no such file"),
    ("check-config-a-folder", ["check-config", "{dir}"], "error: {dir}: not a file"),
    ("evaluate-missing-path", ["evaluate", "{missing}", "-m", "{model}"],
     "error: {missing}: no such file or directory"),
    ("evaluate-rows-out-of-time-order", ["evaluate", "{newest_first}", "-m", "{model}"],
     "error: {newest_first}: column 'time': row 12 (1583750071.9) is 1.1 s before row 1 "
     "(1583750073.0), more than the 1 s of jitter allowed; 49 such row(s). Rows must be in "
     "time order: sort the file"),
    ("evaluate-unknown-model", ["evaluate", "{good}", "-m", "nope"],
     "error: model 'nope' is neither"),
    ("predict-missing-input", ["predict", "-i", "{missing}", "-m", "{model}"],
     "error: {missing}: no such file or folder"),
    ("predict-bad-calibrate", ["predict", "-i", "{good}", "-m", "{model}", "--calibrate", "-1"],
     "error: --calibrate -1: 0 (the model's scaler and threshold) or at least 10 rows"),
    ("predict-unwritable-save-path", ["predict", "-i", "{good}", "-m", "{model}",
                                      "--save_path", "{blocker}/out", "--calibrate", "0"],
     "error: {blocker}/out: "),
    ("predict-negative-max-gap", ["predict", "-i", "{good}", "-m", "{model}", "--max-gap", "-1"],
     "error: argument --max-gap: -1: 0 (no check) or a factor >= 1 on the median step"),
    ("evaluate-zero-smoothing", ["evaluate", "{good}", "-m", "{model}", "--smoothing", "0"],
     "error: scoring.smoothing: value 0 is invalid: expected an integer >= 1"),
    ("fit-policy-set-without-key", ["fit-policy", "{model}", "--data", "{good}", "--set", "foo"],
     "error: --set 'foo': expected SECTION.KEY=VALUE"),
    ("fit-policy-set-bad-value", ["fit-policy", "{model}", "--data", "{good}",
                                  "--set", "scoring.smoothing=abc"],
     "error: --set scoring.smoothing: value 'abc' is invalid: expected an integer >= 1"),
    ("fit-policy-set-unknown-section", ["fit-policy", "{model}", "--data", "{good}",
                                        "--set", "nosuch.key=1"],
     "error: --set nosuch: unknown key (value {{'key': 1}}); check the spelling"),
    ("fit-policy-nan-alerts-per-day", ["fit-policy", "{model}", "--data", "{good}",
                                       "--alerts-per-day", "nan"],
     "error: --alerts-per-day nan: expected a number >= 0"),
    ("fit-policy-open-share-over-1", ["fit-policy", "{model}", "--data", "{good}",
                                      "--open-share", "2"],
     "error: --open-share 2: expected a share of rows from 0 to 1"),
    ("fit-policy-safety-under-1", ["fit-policy", "{model}", "--data", "{good}", "--safety", "-1"],
     "error: --safety -1: expected a factor >= 1"),
    ("fit-policy-start-quantile-over-1", ["fit-policy", "{model}", "--data", "{good}",
                                          "--start-quantile", "2"],
     "error: --start-quantile 2: expected a share of the starts, over 0 and at most 1"),
    ("fit-policy-negative-learn", ["fit-policy", "{model}", "--data", "{good}", "--learn", "-5"],
     "error: --learn -5: 0 (the model's scaler and threshold) or at least 10 rows"),
    ("fit-policy-missing-data", ["fit-policy", "{model}", "--data", "{missing}"],
     "error: {missing}: no such file or directory"),
    ("demo-bad-broker-port", ["demo", "--mqtt", "localhost:abc"],
     "error: --mqtt localhost:abc: expected HOST or HOST:PORT"),
    ("demo-negative-speed", ["demo", "--speed", "-1"],
     "error: streams[0].source.speed: value -1.0 is invalid: expected a number >= 0"),
    ("serve-unset-api-key", ["serve", "-m", "{model}", "--api-key-env", "TSAD_SURELY_UNSET"],
     "error: API key variable TSAD_SURELY_UNSET is not set or empty"),
    ("command-without-agent", ["shelve", "s", "--for", "1h"], "error: give --config FILE, or --node"),
    ("command-bad-broker-port", ["ack", "x", "--node", "n", "--port", "99999"],
     "error: broker flags: port: value 99999 is invalid: expected an integer >= 1 and "
     "<= 65535"),
]


@pytest.mark.parametrize("args, expect", [c[1:] for c in AGENT_CASES],
                         ids=[c[0] for c in AGENT_CASES])
def test_agent_usage_errors_are_one_line_exit_2(files, args, expect):
    names = {k: str(v) for k, v in files.items()}
    r = cli("agent.cli", *[a.format(**names) for a in args])
    assert r.returncode == 2, r.stderr
    assert expect.format(**names) in one_error_line(r, "error: ")


def test_evaluate_a_folder_with_an_unlabeled_file_reports_its_long_run_figures(files, tmp_path):
    (tmp_path / "u.csv").write_text(files["good"].read_text())
    r = cli("agent.cli", "evaluate", tmp_path, "-m", files["model"], "--calibration", "0")
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path / 'u.csv'}: 0.0 h, alert open on" in r.stdout
    assert "error" not in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------ tsad-export
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="train needs torch (the export extra)")
EXPORT_CASES = [
    ("no-command", [], [], "the following arguments are required: command"),
    ("train-missing-flags", [], ["train"],
     "error: the following arguments are required: --model, --data, --out (see tsad-export "
     "train --help)"),
    ("unknown-flag", [], ["verify", "{good}", "--bogus"], "unrecognized arguments: --bogus"),
    ("train-missing-data", [needs_torch],
     ["train", "--model", "DLinear_ad", "--data", "{missing}", "--out", "{dir}/o.onnx"],
     "tsad-export: error: {missing}: data file not found"),
    ("train-unknown-architecture", [needs_torch],
     ["train", "--model", "Nope", "--data", "{good}", "--out", "{dir}/o.onnx"],
     "tsad-export: error: --model 'Nope': unknown architecture; known: AutoEncoder_ad"),
    ("train-bad-option-value", [needs_torch],
     ["train", "--model", "DLinear_ad", "--data", "{good}", "--out", "{dir}/o.onnx",
      "--drift-quantile", "1.5", "--scale-rows", "10", "--drift-rows", "10"],
     "tsad-export: error: --drift-quantile 1.5: expected a fraction between 0 and 1"),
    ("verify-missing-model", [], ["verify", "{missing}"],
     "tsad-export: error: {missing}: no such model file"),
]


@pytest.mark.parametrize("args, expect",
                         [pytest.param(*c[2:], marks=c[1]) for c in EXPORT_CASES],
                         ids=[c[0] for c in EXPORT_CASES])
def test_export_usage_errors_are_one_line_exit_2(files, args, expect):
    names = {k: str(v) for k, v in files.items()}
    r = cli("export.cli", *[a.format(**names) for a in args])
    assert r.returncode == 2, r.stderr
    assert expect.format(**names) in one_error_line(r, "tsad-export: error: ")
    assert not list(files["dir"].glob("o.onnx*")), "a refused command wrote a model"


def test_export_version():
    from agent import __version__
    r = cli("export.cli", "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"tsad-export {__version__}"


# ------------------------------------------------------------------ run == check-config
REFUSED = [
    # (case id, config kwargs, the one problem both name)
    ("replay-file-missing", dict(source="{{type: replay, path: {missing}}}"),
     "streams[0] (s).source: {missing}: no such file or directory"),
    ("replay-file-without-columns", dict(source="{{type: replay, path: {other}}}"),
     "streams[0] (s).source: {other}: missing column(s) ['a', 'b', 'c']"),
    ("systemd-credential-missing",
     dict(mqtt="{{host: 127.0.0.1, username: u, password_credential: pw}}"),
     "mqtt.password_credential: $CREDENTIALS_DIRECTORY is not set"),
    ("password-file-missing", dict(mqtt="{{host: 127.0.0.1, username: u, "
                                        "password_file: {missing}}}"),
     "mqtt.password_file: cannot read '{missing}': No such file or directory"),
    ("tls-ca-missing", dict(mqtt="{{host: 127.0.0.1, tls: {{ca_file: {missing}}}}}"),
     "mqtt.tls.ca_file: cannot read '{missing}': No such file or directory"),
    ("state-dir-unwritable", dict(state_dir="{blocker}/state"),
     "state_dir: {blocker}/state is not writable ({blocker} is not a folder)"),
    ("jsonl-unwritable", dict(extra="sinks: {{jsonl: {{path: {blocker}/a.jsonl}}}}\n"),
     "sinks.jsonl.path: cannot append to {blocker}/a.jsonl ({blocker} is not a folder)"),
]


@pytest.mark.parametrize("kw, problem", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_run_refuses_exactly_what_check_config_finds(files, kw, problem):
    names = {k: str(v) for k, v in files.items()}
    kw = {k: v.format(**names) for k, v in kw.items()}
    kw.setdefault("source", "{type: serial, port: /dev/null}")
    path = config(files["dir"], "refused", **kw)
    problem = problem.format(**names)
    checked = cli("agent.cli", "check-config", path)
    assert checked.returncode == 1, checked.stderr
    listed = [ln.strip() for ln in checked.stderr.splitlines() if ln.startswith("  ")]
    assert len(listed) == 1 and listed[0].startswith(problem), checked.stderr
    run = cli("agent.cli", "run", "-c", path)
    assert run.returncode == 2, run.stderr
    assert one_error_line(run, "error: ") == f"error: {listed[0]}"

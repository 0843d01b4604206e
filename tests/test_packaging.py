"""Packaging promises: a torch-free runtime, pinned torch for export, README == CI, shipped
models found by name, metadata free of the build machine's paths, an example that runs."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from agent import __version__
from agent.config import ConfigError, load_config, parse_config
from agent.model_meta import PADDLEX_MODELS, load_meta, sha256_file
from agent.shipped import (DEMO_CSV, EXAMPLE_CONFIG, ShippedModelError, models_dir, resolve_model,
                           shipped_models)
from conftest import MODELS, REPO


def test_runtime_import_graph_has_no_torch():
    code = ("import sys, agent.cli, agent.daemon, agent.pipeline, agent.engine, agent.jobs, "
            "agent.evaluate, agent.predict, agent.http.server, agent.sinks, agent.sources; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'paddle', 'export')); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, f"runtime imports {r.stdout.strip()}"


def test_the_daemon_imports_and_loads_its_config_without_pydantic():
    """The config classes are msgspec Structs: pydantic (~10 MB of the daemon's RSS) must
    not come back into its import graph, nor into the runtime's dependencies."""
    code = ("import sys, agent.daemon; from agent.config import load_config; "
            f"load_config({str(EXAMPLE_CONFIG)!r}); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0].startswith('pydantic')); "
            "print(bad, 'msgspec' in sys.modules); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, f"the daemon imports {r.stdout.strip()} {r.stderr[-2000:]}"
    assert r.stdout.strip() == "[] True"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in deps if d.lower().startswith("pydantic")], deps


def test_dependencies_torch_only_pinned_in_export_extra():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in meta["dependencies"] if d.lower().startswith("torch")]
    torch = [d for d in meta["optional-dependencies"]["export"] if d.startswith("torch")]
    assert torch == ["torch==2.13.0"], torch
    assert set(meta["scripts"]) >= {"tsad-agent", "tsad-export"}


def _readme_block(after_heading_text: str) -> str:
    text = (REPO / "README.md").read_text()
    i = text.index(after_heading_text)
    return re.search(r"```sh\n(.*?)\n```", text[i:], re.S).group(1).strip()


def test_ci_runs_the_readme_test_command():
    """One line that a fresh venv can paste: it installs the extras the tests use, then runs
    them; .ci/run runs exactly that line, so README and CI cannot drift apart."""
    cmd = _readme_block("Run the tests")
    assert "\n" not in cmd, f"README test command is not one line: {cmd!r}"
    ci = (REPO / ".ci" / "run").read_text()
    assert cmd in ci.splitlines(), f"README test command {cmd!r} not run by .ci/run"
    install, _, run = cmd.partition(" && ")
    extras = set(re.search(r"\.\[([\w,]+)\]", install).group(1).split(","))
    assert install.startswith("python3 -m pip install") and {"test", "export", "plot"} <= extras
    assert run.startswith("python3 -m pytest"), cmd


def test_cli_entry_points_answer():
    for prog, mod in (("tsad-agent", "agent.cli"), ("tsad-export", "export.cli")):
        r = subprocess.run([sys.executable, "-m", mod, "--version"], capture_output=True,
                           text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{prog} {__version__}"
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "agent.__version__"}


def test_the_version_moved_on_and_the_readme_installs_it():
    """Upgrade audit F2: 0.1.0 was every build's version up to the upgrade fixes, so pip took
    a newer wheel for the installed one and did nothing (exit 0). Each release bumps it."""
    assert tuple(int(x) for x in __version__.split(".")) > (0, 1, 0)
    readme = (REPO / "README.md").read_text()
    wheels = set(re.findall(r"tsad_agent-[^ ]*?-py3-none-any\.whl", readme))
    assert wheels == {f"tsad_agent-{__version__}-py3-none-any.whl"}, wheels
    assert "### Upgrading" in readme and "--force-reinstall" in readme


def _check_config(path: Path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run([sys.executable, "-m", "agent.cli", "check-config", str(path)],
                          capture_output=True, text=True, cwd=REPO, env={**clean, **env})


def test_example_config_checks_with_the_shipped_models(tmp_path):
    """The example runs the shipped model by name, with the calibration it was trained for.
    As shipped it names a systemd credential and a recording that this machine lacks, which
    `run` would refuse: check-config says so; given both, it is OK."""
    r = _check_config(EXAMPLE_CONFIG)
    assert r.returncode == 1, r.stderr
    problems = [ln.strip() for ln in r.stderr.splitlines() if ln.startswith("  ")]
    assert problems[0].startswith("mqtt.password_credential: $CREDENTIALS_DIRECTORY is not set")
    assert problems[1] == ("streams[2] (bench).source: /etc/tsad-agent/recordings/valve1.csv: "
                           "no such file or directory")
    assert all(p.startswith("state_dir: ") for p in problems[2:]), problems   # not root
    (tmp_path / "mqtt-password").write_text("secret\n")
    text = EXAMPLE_CONFIG.read_text()
    mine = tmp_path / "agent.yaml"
    mine.write_text(text.replace("/etc/tsad-agent/recordings/valve1.csv", str(DEMO_CSV))
                    .replace("state_dir: /var/lib/tsad-agent", f"state_dir: {tmp_path / 'st'}"))
    r = _check_config(mine, CREDENTIALS_DIRECTORY=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and not (tmp_path / "st").exists(), "check-config created state_dir"
    # the example leaves detection to the model: nothing overruled, so no warning
    assert "warning:" not in r.stderr and "serial port /dev/serial/by-id/" in r.stderr
    from agent.policy import effective
    cfg = load_config(EXAMPLE_CONFIG)
    assert Path(cfg.model.path) == models_dir() / "DLinear_ad.onnx"
    meta = load_meta(cfg.model.path)
    # the example leaves detection to the model's policy: what the model was trained for
    cal = effective(cfg.detection, meta).calibration
    assert cal.enabled and cal.samples == meta.training["calibration_rows"]
    assert cal.std_floor == meta.training["calibration_std_floor"]
    assert cal.margin == meta.policy["settings"]["calibration"]["margin"]


def test_shipped_models_are_found_by_name_and_unknown_names_listed(tmp_path):
    names = shipped_models()
    on_disk = sorted(p.relative_to(MODELS).with_suffix("").as_posix()
                     for p in MODELS.rglob("*.onnx"))
    assert names == on_disk and "DLinear_ad" in names
    # the five the benchmarks and recipes name, shipped at the top level
    assert [n for n in names if "/" not in n] == sorted(PADDLEX_MODELS)
    assert resolve_model("DLinear_ad") == str(MODELS / "DLinear_ad.onnx")
    own = tmp_path / "DLinear_ad.onnx"          # a path always wins over a name
    assert resolve_model(str(own)) == str(own)
    with pytest.raises(ShippedModelError, match=r"'DLinear' is neither a file nor a shipped "
                                                r"model \(AutoEncoder_ad, DLinear_ad"):
        resolve_model("DLinear")
    with pytest.raises(ConfigError, match=r":3: model.path: value 'DLinear' is invalid: model "
                                          r"'DLinear' is neither a file nor a shipped model \("):
        parse_config("node: n\nmodel:\n  path: DLinear\nstreams:\n  - id: a\n"
                     "    source: {type: serial, port: /dev/ttyUSB0}\n")
    r = subprocess.run([sys.executable, "-m", "agent.cli", "demo", "--model", "nope"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "'nope' is neither a file nor a shipped model" in r.stderr


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def test_shipped_metadata_holds_no_absolute_path():
    for name in shipped_models():
        meta = json.loads((MODELS / f"{name}.onnx.json").read_text())
        absolute = [s for s in _strings(meta)
                    if PurePosixPath(s).is_absolute() or PureWindowsPath(s).is_absolute()]
        assert absolute == [], f"{name}: {absolute[:3]}"


def _training(name: str) -> dict:
    return json.loads((MODELS / f"{name}.onnx.json").read_text())["training"]


def test_shipped_training_paths_name_the_files_below_the_data_root(skab_dir):
    for name in shipped_models():
        training = _training(name)
        assert set(training["validation"]["files"]) <= {f["path"] for f in training["files"]}
        if name.startswith("tep/"):
            continue      # generated data: checked by regenerating it (below)
        root = skab_dir.parent / training["data_root"]
        for f in training["files"]:
            assert sha256_file(root / f["path"]) == f["sha256"], (name, f["path"])


def test_shipped_tep_models_name_runs_the_recipe_regenerates(tmp_path):
    """The TEP models' training data is generated, not stored: the recipe must still give
    the very bytes their metadata records, and every model was trained on the whole TRAIN
    set as it stands (a model left from an older set would be a silent inconsistency)."""
    pytest.importorskip("tep_studio", reason="tep-studio (the [bench] extra) not installed")
    from export.recipes import tep_data
    # the first long run and the last one-day start run
    rows = [tep_data.write_run(spec, tmp_path) for spec in (tep_data.TRAIN[0], tep_data.TRAIN[-1])]
    for name in [n for n in shipped_models() if n.startswith("tep/")]:
        recorded = {f["path"]: f["sha256"] for f in _training(name)["files"]}
        assert set(recorded) == {Path(s.name).name for s in tep_data.TRAIN}, name
        for row in rows:
            assert recorded[Path(row["file"]).name] == row["sha256"], name


def _csv(path: Path, seed: int) -> str:
    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(seed)
    t = np.arange(120)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"a": np.sin(t / 5) + 0.05 * rng.standard_normal(120),
                  "b": 10 + np.cos(t / 7) + 0.05 * rng.standard_normal(120)}
                 ).to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("root_arg, root_name, prefix", [(None, "plant", ""),
                                                         ("tmp", None, "plant/")])
def test_train_records_paths_relative_to_the_data_root(tmp_path, root_arg, root_name, prefix):
    pytest.importorskip("torch")
    from export.cli import main
    data = [_csv(tmp_path / "plant" / "line1" / "a.csv", 0),
            _csv(tmp_path / "plant" / "line2" / "b.csv", 1) + ":100"]
    out = tmp_path / "out" / "m.onnx"
    extra = ["--data-root", str(tmp_path)] if root_arg else []
    assert main(["train", "--model", "DLinear_ad", "--data", *data, "--window", "8",
                 "--epochs", "1", "--hparam", "moving_avg=3", *extra, "--out", str(out)]) == 0
    text = (tmp_path / "out" / "m.onnx.json").read_text()
    assert str(tmp_path) not in text
    training = json.loads(text)["training"]
    assert training["data_root"] == (root_name or tmp_path.name)
    want = [f"{prefix}line1/a.csv", f"{prefix}line2/b.csv"]
    assert [f["path"] for f in training["files"]] == want
    assert [f["rows"] for f in training["files"]] == [120, 100]
    assert training["validation"]["files"] == want


def test_train_refuses_a_data_root_that_does_not_hold_the_data(tmp_path, capsys):
    pytest.importorskip("torch")
    from export.cli import main
    data = _csv(tmp_path / "plant" / "a.csv", 0)
    other = tmp_path / "elsewhere"
    assert main(["train", "--model", "DLinear_ad", "--data", data, "--data-root", str(other),
                 "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"--data-root {other}: not a folder above {data}" in err
    assert not (tmp_path / "m.onnx").exists()


def test_missing_mosquitto_is_summed_up_in_one_line(tmp_path):
    """The summary line counts broker skips from every file (fixture or module marker)."""
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_a.py").write_text(
        "import pytest\n"
        "def test_one(): pytest.skip('mosquitto not installed (apt-get install mosquitto)')\n"
        "@pytest.mark.skipif(True, reason='mosquitto and mosquitto_passwd are needed')\n"
        "def test_two(): pass\n"
        "def test_three(): pytest.skip('no GPU')\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "."],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if "for lack of mosquitto" in ln]
    assert len(lines) == 1 and lines[0].startswith("2 test(s) skipped"), r.stdout


def test_export_uses_the_runtime_contract_itself():
    """Score, threshold, scaler and table reading exist once: export imports the
    runtime's own functions (identity, not a copy that could drift)."""
    from agent import contract
    from export import data, drift, fit, quantize, train
    assert train.score_windows is contract.score_windows
    assert drift.score_windows is contract.score_windows
    assert quantize.score_windows is contract.score_windows
    assert fit.fit_threshold is contract.fit_threshold
    assert drift.fit_scaler is contract.fit_scaler
    assert quantize.fit_scaler is contract.fit_scaler
    assert data.load_csv is contract.load_csv
    assert data.TIME_COLUMNS is contract.TIME_COLUMNS
    assert data.LABEL_COLUMNS is contract.LABEL_COLUMNS

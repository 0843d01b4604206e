"""Packaging promises: a torch-free runtime, pinned torch for export, README == CI."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from conftest import REPO


def test_runtime_import_graph_has_no_torch():
    code = ("import sys, agent.cli, agent.daemon, agent.pipeline, agent.engine, agent.jobs, "
            "agent.evaluate, agent.predict, agent.http.server, agent.sinks, agent.sources; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'paddle', 'export')); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, f"runtime imports {r.stdout.strip()}"


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
    cmd = _readme_block("Run the tests")
    ci = (REPO / ".ci" / "run").read_text()
    assert cmd in ci.splitlines(), f"README test command {cmd!r} not run by .ci/run"


def test_cli_entry_points_answer():
    for args in (["-m", "agent.cli", "--version"], ["-m", "export.cli", "--help"]):
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr


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

"""The wheel a plant installs: built from this tree, installed WITHOUT -e into a fresh venv
(dependencies from the package registry), and run from a folder outside the repository, so
nothing can come from the checkout.  Runtime packages only: no torch, no test extras."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import MODELS, REPO

pytestmark = pytest.mark.slow


def _run(cmd: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    # PYTHONPATH would reach into the checkout; the installed package must stand alone.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def _ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"{' '.join(r.args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _copy_tree(dst: Path) -> Path:
    """The working tree as git sees it (tracked and new files, nothing ignored).  Built in
    place, setuptools would reuse a stale build/ folder and pack files deleted since."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       cwd=REPO, capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"not a git checkout, cannot tell source files from build output: "
                    f"{r.stderr.decode().strip()}")
    for rel in filter(None, r.stdout.decode().split("\0")):
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    return dst


SUBFOLDER = "subfolder-check"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The tree, plus a model set in a subfolder of models_onnx/ (as tep/ will be), so the
    wheel is shown to carry and name those too."""
    src = _copy_tree(tmp_path_factory.mktemp("wheel") / "src")
    (src / "models_onnx" / SUBFOLDER).mkdir()
    for f in ("DLinear_ad.onnx", "DLinear_ad.onnx.json"):
        shutil.copy2(MODELS / f, src / "models_onnx" / SUBFOLDER / f)
    return src


@pytest.fixture(scope="module")
def wheel(source) -> Path:
    dist = source.parent / "dist"
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, source],
             cwd=source.parent))
    (whl,) = dist.glob("tsad_agent-*.whl")
    return whl


class Installed:
    def __init__(self, venv: Path, cwd: Path):
        self.bin = venv / "bin"
        self.cwd = cwd

    def run(self, tool: str, *args) -> subprocess.CompletedProcess:
        return _run([self.bin / tool, *args], cwd=self.cwd)

    def py(self, expr: str):
        """`expr` evaluated by the installed package's Python, `shipped` imported."""
        code = ("import importlib.util, json, agent; from agent import shipped; "
                f"print(json.dumps({expr}))")
        return json.loads(_ok(self.run("python", "-c", code)))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Installed:
    tmp = tmp_path_factory.mktemp("venv")
    _ok(_run([sys.executable, "-m", "venv", tmp / "venv"], cwd=tmp))
    _ok(_run([tmp / "venv" / "bin" / "python", "-m", "pip", "install", "-q", wheel], cwd=tmp))
    (tmp / "plant").mkdir()
    return Installed(tmp / "venv", tmp / "plant")


def _files(root: Path, pattern: str) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob(pattern)}


def test_wheel_carries_every_module_models_example_and_demo(source, wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f"{pkg}/{p}" for pkg in ("agent", "export") for p in _files(source / pkg, "*.py")}
    assert modules - names == set(), "modules missing: list the package in pyproject.toml"
    models = {f"agent/shipped_models/{p}" for p in _files(source / "models_onnx", "*.onnx*")}
    assert models and models - names == set()
    assert {"agent/examples/agent.yaml", "agent/demo_data/skab_valve1_1.csv"} <= names
    assert not [n for n in names if n.startswith(("tests/", "models_onnx/", "benchmarks/"))]


def test_installed_package_runs_from_its_own_files(installed):
    where = installed.py("[agent.__file__, str(shipped.models_dir()), "
                         "importlib.util.find_spec('torch') is None]")
    site = str(installed.bin.parent / "lib")
    assert where[0].startswith(site) and where[1].startswith(site), where
    assert where[1].endswith("agent/shipped_models")
    assert where[2], "torch must not come with the runtime"
    for tool in ("tsad-agent", "tsad-export"):
        assert _ok(installed.run(tool, "--version")).startswith(f"{tool} ")


def test_installed_demo_runs(installed):
    r = installed.run("tsad-agent", "demo")
    _ok(r)
    assert "through DLinear_ad" in r.stderr and "alert events:" in r.stderr
    assert "precision" in r.stderr


def test_installed_example_config_checks(installed, tmp_path):
    """As shipped, the example names a credential and a recording this machine lacks (what
    `run` would refuse); with them given it checks OK against the installed model."""
    example = Path(installed.py("str(shipped.EXAMPLE_CONFIG)"))
    r = installed.run("tsad-agent", "check-config", str(example))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "mqtt.password_credential" in r.stderr and "valve1.csv: no such file" in r.stderr
    (tmp_path / "pw").write_text("secret\n")
    mine = tmp_path / "agent.yaml"
    mine.write_text(example.read_text()
                    .replace("/etc/tsad-agent/recordings/valve1.csv",
                             installed.py("str(shipped.DEMO_CSV)"))
                    .replace("password_credential: mqtt-password",
                             f"password_file: {tmp_path / 'pw'}")
                    .replace("state_dir: /var/lib/tsad-agent", f"state_dir: {tmp_path / 'st'}"))
    out = _ok(installed.run("tsad-agent", "check-config", str(mine)))
    assert "OK" in out and "model DLinear_ad (window 64, 8 channels)" in out


def test_installed_export_verifies_every_shipped_model(source, installed):
    names = installed.py("shipped.shipped_models()")
    built = source / "models_onnx"
    assert names == sorted(p.relative_to(built).with_suffix("").as_posix()
                           for p in built.rglob("*.onnx"))
    assert f"{SUBFOLDER}/DLinear_ad" in names
    for name in names:
        path = installed.py(f"shipped.resolve_model({name!r})")
        report = json.loads(_ok(installed.run("tsad-export", "verify", path)))
        assert report["ok"] is True and report["model"] == path, report


def test_installed_runtime_names_the_export_extra_for_training(installed):
    r = installed.run("tsad-export", "train", "--model", "DLinear_ad", "--data", "x.csv",
                      "--out", "m.onnx")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "train needs torch (the export extra: python3 -m pip install 'tsad-agent[export]')" \
        in r.stderr

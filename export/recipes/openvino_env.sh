#!/usr/bin/env bash
# Create (or complete) .venv-openvino/: the agent runtime on ONNX Runtime's OpenVINO provider.
#
# onnxruntime-openvino ships the same `onnxruntime` module as the plain onnxruntime
# wheel; with both in one environment, whichever pip installed last wins and the other's
# files are half overwritten.  So this environment gets onnxruntime-openvino and the
# runtime's other dependencies by name, and the repository with --no-deps, so that
# nothing pulls plain onnxruntime in beside it.  The check at the end fails unless the
# `onnxruntime` that imports is the OpenVINO build and lists OpenVINOExecutionProvider.
# Wheels exist for x86-64 Linux and Windows only (no aarch64 build on PyPI).
# Idempotent: a complete environment whose stamp matches the pins is left as it is.
# Usage: export/recipes/openvino_env.sh [VENV_DIR]   (default: <repo>/.venv-openvino)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-$repo/.venv-openvino}"
python="${PYTHON:-python3}"
stamp="$venv/.tsad-openvino-env"
# The stamp records the pins: changing them re-runs pip on an existing environment.
# The others are pyproject.toml's runtime dependencies, read from it so that a new one
# (prometheus_client was one) cannot be missed here; plain onnxruntime is left out.
mapfile -t runtime < <("$python" - "$repo/pyproject.toml" <<'PY'
import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.replace(" ", "").startswith("onnxruntime")))
PY
)
pins=(onnxruntime-openvino==1.24.1 "${runtime[@]}")
want="${pins[*]}"
check='
import importlib.metadata as md, onnxruntime as ort, sys
dists = {d.metadata["Name"].lower() for d in md.distributions()}
assert "onnxruntime" not in dists, "plain onnxruntime is installed beside onnxruntime-openvino"
assert "OpenVINOExecutionProvider" in ort.get_available_providers(), ort.get_available_providers()
import agent.cli, agent.daemon, numpy, pandas, paho.mqtt.client, yaml, serial, msgspec, prometheus_client
print(f"onnxruntime {ort.__version__} from {ort.__file__}: {ort.get_available_providers()}")
'

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
   && (cd "$repo" && "$venv/bin/python" -c "$check") >/dev/null 2>&1; then
    echo "openvino_env: $venv is ready"
    exit 0
fi

start=$SECONDS
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$repo"
# from / so that the installed package, not the working directory, is what imports
(cd / && "$venv/bin/python" -c "$check")
echo "$want" > "$stamp"
echo "openvino_env: $venv ready in $((SECONDS - start)) s ($(du -sh "$venv" | cut -f1))"

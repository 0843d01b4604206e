#!/usr/bin/env bash
# Create (or complete) .venv-paddle/: the environment for `tsad-export paddlex`.
#
# It is separate from the runtime and from the torch export tools because paddle2onnx
# 2.1.0 requires onnx<=1.17.0 while the torch exporter (onnxscript) runs on a newer onnx.
# The repository is installed into it without dependencies, so
# .venv-paddle/bin/tsad-export paddlex DIR --out model.onnx works; the runtime never
# needs anything from here.  Idempotent: a complete environment is left as it is.
# --with-paddlex also installs PaddleX itself (paddlex[ts]; pins numpy<2.4, PyYAML 6.0.2),
# which only tests/test_paddlex_import.py uses, to compare against PaddleX's own predictor.
# Usage: export/recipes/paddle_env.sh [--with-paddlex] [VENV_DIR]   (default: <repo>/.venv-paddle)
set -euo pipefail

with_paddlex=0
if [[ "${1:-}" == "--with-paddlex" ]]; then with_paddlex=1; shift; fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-$repo/.venv-paddle}"
python="${PYTHON:-python3}"
stamp="$venv/.tsad-paddle-env"
# The stamp records the pins: changing them re-runs pip on an existing environment.
pins=(paddlepaddle==3.3.1 paddle2onnx==2.1.0 onnx==1.17.0 onnxruntime scikit-learn joblib
      numpy pandas pyyaml)
imports="paddle, paddle2onnx, sklearn, joblib, onnxruntime, pandas, yaml"
if (( with_paddlex )); then pins+=("paddlex[ts]==3.7.2"); imports+=", paddlex"; fi
want="${pins[*]}"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
   && "$venv/bin/python" -c "import $imports" 2>/dev/null; then
    echo "paddle_env: $venv is ready"
    exit 0
fi

start=$SECONDS
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$repo"
"$venv/bin/python" -c "import $imports"
echo "$want" > "$stamp"
echo "paddle_env: $venv ready in $((SECONDS - start)) s ($(du -sh "$venv" | cut -f1))"

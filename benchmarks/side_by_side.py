"""Old and new code timed side by side: a benchmark's child pass run once per checkout,
alternating, so both meet the same machine load (this machine's speed varies 2-3x
between runs, and a ratio is only worth quoting from one run)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def alternate(script: str, repos: list[Path], rounds: int,
              args: list[str]) -> list[tuple[str, str]]:
    """(checkout name, stdout) of `script args` run in each checkout in turn, `rounds`
    times: the checkout as the working directory and the only import path, so its own
    `agent` package is the one timed."""
    out = []
    for _ in range(rounds):
        for repo in repos:
            r = subprocess.run([sys.executable, script, *args], cwd=repo,
                               env={"PYTHONPATH": str(repo), "PATH": ""},
                               capture_output=True, text=True, check=True)
            out.append((repo.name, r.stdout))
    return out

"""Old and new code timed side by side: a benchmark's child pass run once per checkout,
alternating, so both meet the same machine load (this machine's speed varies 2-3x
between runs, and a ratio is only worth quoting from one run).

A benchmark using it takes `add_arguments`' options; run with `--child`, it times its
shapes and prints one `shape value` line each, which `alternate` reads back."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def add_arguments(ap: argparse.ArgumentParser, repo: Path) -> None:
    ap.add_argument("--repo", default=str(repo), help="checkouts to time, comma separated")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds over --repo")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def checkouts(a: argparse.Namespace) -> list[Path]:
    return [Path(r).resolve() for r in a.repo.split(",")]


def alternate(script: str, repos: list[Path], rounds: int,
              args: list[str]) -> list[tuple[str, list[tuple[str, float]]]]:
    """(checkout name, [(shape, value)...]) of `script --child args` run in each checkout in
    turn, `rounds` times: the checkout as the working directory and the only import path,
    so its own `agent` package is the one timed."""
    out = []
    for _ in range(rounds):
        for repo in repos:
            r = subprocess.run([sys.executable, script, "--child", *args], cwd=repo,
                               env={"PYTHONPATH": str(repo), "PATH": ""},
                               capture_output=True, text=True, check=True)
            rows = [line.split() for line in r.stdout.splitlines()]
            out.append((repo.name, [(shape, float(v)) for shape, v in rows]))
    return out

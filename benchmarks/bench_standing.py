"""The alert tracker's cost per step while an alert stays open (the standing check).

One stream at `--rate` samples/s whose alert opens at once and stays open for
`--minutes` of sample time, stepped `--per` samples at a time (1: the daemon's usual
step at one sample per message).  Reported: CPU µs per step over the last 5 minutes of
sample time, when the standing check holds a full `standing_after_s` span of scores.

`--repo A,B` runs each checkout in its own process, alternating `--rounds` times, so two
versions are compared side by side on the same machine:

    python benchmarks/bench_standing.py --repo /path/old,/path/new --per 1,10
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(repo: str, per: int, rate: float, minutes: float, span: float) -> float:
    sys.path.insert(0, repo)
    import numpy as np
    from agent.alerts import AlertTracker
    from agent.config import AlertConfig

    tr = AlertTracker("n", "s", AlertConfig(standing_after_s=span), ["a", "b"], {})
    n = int(minutes * 60 * rate)
    t = np.arange(n) / rate
    scores = 5.0 + 0.1 * np.sin(t)          # over the threshold, steady: it stands
    err = np.ones((n, 2))
    last5 = n - int(300 * rate)
    t0 = None
    for i in range(0, n, per):
        if t0 is None and i >= last5:
            t0, i0 = time.process_time(), i
        tr.update(t[i:i + per], scores[i:i + per], 1.0, err[i:i + per])
    assert tr.state == "anomaly" and tr.standing_since is not None
    return (time.process_time() - t0) / ((n - i0) / per) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repo", default=str(REPO), help="checkouts to compare, comma-separated")
    ap.add_argument("--per", default="1,10,64", help="samples per step, comma-separated")
    ap.add_argument("--rate", type=float, default=100.0, help="samples/s")
    ap.add_argument("--minutes", type=float, default=20.0, help="sample time the alert is open")
    ap.add_argument("--span", type=float, default=600.0, help="alerts.standing_after_s")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        repo, per = a.one.rsplit(",", 1)
        print(json.dumps(one(repo, int(per), a.rate, a.minutes, a.span)))
        return 0
    repos = a.repo.split(",")
    print(f"µs per step, alert open, {a.rate:g} Hz, span {a.span:g} s (rounds: {a.rounds})")
    for per in map(int, a.per.split(",")):
        got: dict[str, list[float]] = {r: [] for r in repos}
        for _ in range(a.rounds):
            for r in repos:
                out = subprocess.run([sys.executable, __file__, "--one", f"{r},{per}",
                                      "--rate", str(a.rate), "--minutes", str(a.minutes),
                                      "--span", str(a.span)],
                                     capture_output=True, text=True, check=True).stdout
                got[r].append(json.loads(out))
        for r in repos:
            print(f"  per={per:<3} {r}: " + ", ".join(f"{v:.0f}" for v in got[r]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

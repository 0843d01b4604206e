"""Memory: the engine's cost per stream, and the daemon's imports at rest.

Per stream (in process, the engine alone): for each stream count, in a fresh process,
the engine with a shipped model (DLinear_ad) steps every stream `--per` samples at a
time (the daemon's pattern) through the SKAB anomaly-free recording: past its learning
period and `--rows` samples more (several adaptation epochs).  Reported: RSS grown since
the engine was built, then again after malloc_trim (glibc's free pages given back, as
the daemon does every 15 s: agent/heap.py), in KB per stream, and the difference
between two counts (what one stream more costs, fixed costs cancelled).
`--sites` adds the Python heap (tracemalloc) and the allocation sites that hold the
most bytes per stream.

At rest: the modules `agent.daemon` imports (count) and the RSS of a process that
imported it and loaded the model.

    python benchmarks/bench_memory.py                    # 50 and 500 streams
    python benchmarks/bench_memory.py --streams 50 --sites
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKAB_FREE = REPO.parent / "shared" / "data" / "skab" / "anomaly-free" / "anomaly-free.csv"


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def one_count(model: str, streams: int, per: int, rows: int, sites: bool) -> dict:
    """Runs in its own process: the growth of RSS and heap for `streams` streams."""
    import gc
    import tracemalloc

    sys.path.insert(0, str(REPO))
    from agent.contract import read_table
    from agent.detector import Detector
    from agent.engine import Engine
    from agent.jobs import detection_config
    from agent.metrics import Metrics
    from agent.shipped import DEMO_CSV, resolve_model
    from agent.sources.base import Batch
    from agent.heap import HeapTrimmer

    det = Detector(resolve_model(model), threads=1)
    csv = SKAB_FREE if SKAB_FREE.exists() else DEMO_CSV
    t = read_table(csv, det.meta.channels)
    learn = 400
    n = min(learn + rows, len(t.ts))
    metrics = Metrics()
    det.metrics = metrics
    engine = Engine(detection_config(det.meta, learn, node="bench"), det, metrics=metrics,
                    default_max_streams=streams)
    sids = [f"s{i}" for i in range(streams)]
    # one stream through a learning period first: imports, caches and ORT's arena warm
    for a in range(0, n, 64):
        engine.step([Batch("warm", t.ts[a:a + 64], t.values[a:a + 64], source="bench")])
    engine.drop("warm")
    if sites:
        tracemalloc.start(1)
    gc.collect()
    rss0, heap0 = rss_kb(), tracemalloc.get_traced_memory()[0]
    snap0 = tracemalloc.take_snapshot() if sites else None
    t0 = time.process_time()
    for a in range(0, n, per):
        engine.step([Batch(s, t.ts[a:a + per], t.values[a:a + per], source="bench")
                     for s in sids])
    cpu = time.process_time() - t0
    gc.collect()
    out = {"streams": streams, "samples": n, "rss_kb": rss_kb() - rss0,
           "cpu_us_per_sample": cpu * 1e6 / (n * streams)}
    if HeapTrimmer().trim():   # what the daemon's trimmer gives back (agent/heap.py)
        out["trimmed_rss_kb"] = rss_kb() - rss0
    if sites:
        out["heap_kb"] = (tracemalloc.get_traced_memory()[0] - heap0) / 1024
        diff = tracemalloc.take_snapshot().compare_to(snap0, "lineno")
        out["sites"] = [(s.size_diff / streams, str(s.traceback)) for s in diff[:15]]
    return out


def at_rest(model: str) -> dict:
    """Runs in its own process: modules and RSS once the daemon's imports and the model
    are loaded (no stream)."""
    sys.path.insert(0, str(REPO))
    import agent.daemon  # noqa: F401
    from agent.detector import Detector
    from agent.shipped import resolve_model
    mods = len(sys.modules)
    Detector(resolve_model(model), threads=1)
    return {"modules": mods, "rss_kb": rss_kb()}


def run_child(args: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True,
                       text=True, cwd=REPO)
    if p.returncode:
        raise SystemExit(p.stderr)
    return json.loads(p.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="DLinear_ad")
    ap.add_argument("--streams", default="50,500")
    ap.add_argument("--per", type=int, default=2, help="samples per stream and step")
    ap.add_argument("--rows", type=int, default=1000, help="samples per stream after learning")
    ap.add_argument("--sites", action="store_true", help="trace the heap: allocation sites")
    ap.add_argument("--child", choices=["count", "rest"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child == "count":
        print(json.dumps(one_count(a.model, int(a.streams), a.per, a.rows, a.sites)))
        return
    if a.child == "rest":
        print(json.dumps(at_rest(a.model)))
        return
    rest = run_child(["--child", "rest", "--model", a.model])
    print(f"at rest ({a.model} loaded, agent.daemon imported): {rest['modules']} modules, "
          f"RSS {rest['rss_kb'] / 1024:.1f} MB")
    runs = []
    for n in [int(s) for s in a.streams.split(",")]:
        r = run_child(["--child", "count", "--model", a.model, "--streams", str(n),
                       "--per", str(a.per), "--rows", str(a.rows)] + (["--sites"] if a.sites else []))
        runs.append(r)
        heap = f", heap {r['heap_kb'] / n:.1f} KB/stream" if "heap_kb" in r else ""
        if "trimmed_rss_kb" in r:
            heap += f", after malloc_trim +{r['trimmed_rss_kb'] / 1024:.1f} MB"
        print(f"{n} streams x {r['samples']} samples, {a.per} per step: RSS +{r['rss_kb'] / 1024:.1f} MB "
              f"({r['rss_kb'] / n:.1f} KB/stream){heap}, {r['cpu_us_per_sample']:.1f} µs/sample")
        for size, where in r.get("sites", []):
            print(f"    {size:8.0f} B/stream  {where}")
    for lo, hi in zip(runs, runs[1:]):
        kb = (hi["rss_kb"] - lo["rss_kb"]) / (hi["streams"] - lo["streams"])
        line = f"{lo['streams']} -> {hi['streams']} streams: {kb:.1f} KB of RSS per stream"
        if "trimmed_rss_kb" in hi:
            kb = (hi["trimmed_rss_kb"] - lo["trimmed_rss_kb"]) / (hi["streams"] - lo["streams"])
            line += f", {kb:.1f} KB after malloc_trim"
        print(line)


if __name__ == "__main__":
    main()

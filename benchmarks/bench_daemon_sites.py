"""What the daemon keeps per stream, by module and allocation site (Python heap).

The real agent (`tsad-agent run`: MQTT source on `plant/+/sensors`, MQTT sink, DLinear_ad
with its policy) runs under tracemalloc against a local Mosquitto.  Each of `--streams`
counts gets its own agent; every stream is fed `--rows` samples (past its learning period,
several adaptation epochs), `--per` samples per message, each round taken before the next
is sent; once the agent has taken every sample, it writes a heap snapshot (SIGUSR1,
installed by this benchmark's wrapper, not by the agent).  Reported: heap bytes per stream
between the two counts (fixed costs cancelled), by source file and by allocation line.
RSS per stream is `benchmarks/soak.py`'s; this says where the heap part of it lives.

    python benchmarks/bench_daemon_sites.py --streams 50,500
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from soak import SAMPLE_INTERVAL_S, AgentRun, normal_rows, row_at  # noqa: E402

# Runs the agent's CLI in a process that writes a tracemalloc snapshot on SIGUSR1.
WRAPPER = """
import signal, sys, tracemalloc
OUT = sys.argv[1]
tracemalloc.start(int(sys.argv[2]))
def dump(*_):
    import gc; gc.collect()
    tracemalloc.take_snapshot().dump(OUT)
    open(OUT + ".done", "w").close()
signal.signal(signal.SIGUSR1, dump)
sys.argv = ["tsad-agent", *sys.argv[3:]]
from agent.cli import main
sys.exit(main())
"""


def snapshot(a, streams: int, work: Path) -> Path:
    meta = json.loads((REPO / "models_onnx" / f"{a.model}.onnx.json").read_text())
    out = work / "heap.snap"
    wrapped = [sys.executable, "-c", WRAPPER, str(out), str(a.depth)]
    with AgentRun(work, "sites", a.model, streams, {"mqtt": {"health_interval_s": 0.2}},
                  argv=wrapped) as run:
        rows = normal_rows(meta["channels"], meta["scaler"]["mean"], meta["scaler"]["std"],
                           a.rows, 0)
        text = [",".join(f"{v:.6g}" for v in r) for r in rows]
        t0, sent = time.time() - a.rows * SAMPLE_INTERVAL_S, 0
        for k in range(0, a.rows, a.per):
            # every stream the same rows from the first, as soak.py sends them (row_at)
            payload = "\n".join(f"{t0 + j * SAMPLE_INTERVAL_S:.3f},{text[row_at(j, len(text))]}"
                                 for j in range(k, min(k + a.per, a.rows)))
            for i in range(streams):
                run.pub.publish(f"plant/s{i:03d}/sensors", payload, qos=1)
            sent += streams * min(a.per, a.rows - k)
            # lock-step: the agent under tracemalloc is slow, and a step holding several
            # messages of a stream would size its ring for larger blocks than the daemon's
            while run.samples_in() < sent:
                time.sleep(0.05)
        time.sleep(2.5)            # a health period and a presence round for every stream
        run.agent.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 120
        while not Path(str(out) + ".done").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="DLinear_ad")
    ap.add_argument("--streams", default="50,500", help="two stream counts")
    ap.add_argument("--rows", type=int, default=800, help="samples per stream")
    ap.add_argument("--per", type=int, default=10, help="samples per MQTT message")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--depth", type=int, default=4, help="frames per allocation site")
    a = ap.parse_args()
    lo, hi = (int(s) for s in a.streams.split(","))
    snaps = []
    for n in (lo, hi):
        work = Path(tempfile.mkdtemp(prefix=f"tsad-sites-{n}-"))
        snaps.append(tracemalloc.Snapshot.load(str(snapshot(a, n, work))))
    per = hi - lo
    total = sum(s.size_diff for s in snaps[1].compare_to(snaps[0], "filename"))
    print(f"{a.model}, {lo} -> {hi} streams, {a.rows} samples each, {a.per} per message: "
          f"heap {total / per / 1024:.1f} KB per stream")
    for key in ("filename", "traceback"):
        print(f"  by {key}:")
        for s in snaps[1].compare_to(snaps[0], key)[:a.top]:
            where = " < ".join(f"{f.filename.replace(str(REPO) + '/', '')}:{f.lineno}"
                               for f in (s.traceback if key == "traceback" else s.traceback[:1]))
            print(f"    {s.size_diff / per:8.0f} B/stream  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

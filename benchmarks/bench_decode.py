"""Decoding cost: CPU µs per MQTT message of `LineDecoder.decode_streams`, in process.

The pipeline thread decodes each drain's messages per stream (agent/sources/mqtt.py).
This times that call alone on CSV payloads like a gateway's (`ts,v1,...,vC`, epoch
seconds with milliseconds, values to 6 significant digits), for drains of S streams x M
messages, the shapes a busy agent's steps take: 50 x 80 (50 streams at 100 Hz, a step
of about 0.8 s), 50 x 10, 500 x 1, 1 x 500, and 50 x 10 again with one stream in ten
sending an empty field now and then (those streams are read line by line).  Best of
`--reps` passes over fresh decoders.  With `--repo A,B` each checkout runs in its own
process, alternating, so old and new code are timed side by side in one run.

    python benchmarks/bench_decode.py
    python benchmarks/bench_decode.py --repo /path/to/old,. --rounds 3
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from side_by_side import add_arguments, alternate, checkouts  # beside this script

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(50, 80, 0), (50, 10, 0), (500, 1, 0), (1, 500, 0), (50, 10, 10)]
CHANNELS = 8


def drains(streams: int, per: int, odd_every: int, n: int) -> list[dict]:
    """n drains: stream -> (payloads, arrivals); with odd_every, every odd_every-th
    stream sends an empty field in one message of each drain."""
    import numpy as np
    rng = np.random.default_rng(0)
    t0 = 1_733_000_000.0
    out = []
    for d in range(n):
        g = {}
        for s in range(streams):
            payloads, arrivals = [], []
            for j in range(per):
                t = t0 + (d * per + j) * 0.01
                vals = [f"{v:.6g}" for v in rng.normal(0, 10, CHANNELS)]
                if odd_every and s % odd_every == 0 and j == 0:
                    vals[3] = ""
                payloads.append(f"{t:.3f},{','.join(vals)}".encode())
                arrivals.append(t + 0.002)
            g[f"s{s:03d}"] = (payloads, arrivals)
        out.append(g)
    return out


def time_shape(streams: int, per: int, odd_every: int, reps: int) -> float:
    from agent.decoders import LineDecoder
    from agent.metrics import Metrics
    n = max(2, 4000 // (streams * per))
    ds = drains(streams, per, odd_every, n)
    best = float("inf")
    for _ in range(reps):
        d = LineDecoder([f"c{i}" for i in range(CHANNELS)], "csv", "auto", Metrics(), "bench")
        c = time.process_time()
        for g in ds:
            d.decode_streams(g)
        best = min(best, time.process_time() - c)
    return best * 1e6 / (n * streams * per)


def child(reps: int) -> None:
    for streams, per, odd in SHAPES:
        print(f"{streams}x{per}{'/odd' if odd else ''} {time_shape(streams, per, odd, reps):.3f}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(ap, REPO)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    if a.child:
        child(a.reps)
        return
    repos = checkouts(a)
    rows: dict[str, dict[str, list[float]]] = {}
    for name, run in alternate(__file__, repos, a.rounds, ["--reps", str(a.reps)]):
        for shape, us in run:
            rows.setdefault(shape, {}).setdefault(name, []).append(us)
    names = [r.name for r in repos]
    print("decode_streams, CPU µs per message (best of reps; one value per round)")
    print(f"{'drain':>12} " + " ".join(f"{n:>22}" for n in names))
    for shape, by in rows.items():
        print(f"{shape:>12} " + " ".join(
            f"{', '.join(f'{v:.2f}' for v in by[n]):>22}" for n in names))


if __name__ == "__main__":
    main()

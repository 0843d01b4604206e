"""ONNX Runtime's intra-op pool spinning between runs, on and off (agent/detector.py turns it off).

    python benchmarks/bench_spinning.py [--model TimesNet_ad] [--threads 2] [--rate 40] [--seconds 6]

One session per setting, alternated twice, each fed one window `rate` times a second (a
daemon's pace) for `seconds`: the process CPU seconds it took and the median run time.
With model.threads 1 there is no pool and nothing to spin.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent.shipped import resolve_model  # noqa: E402


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="TimesNet_ad")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rate", type=float, default=40.0)
    ap.add_argument("--seconds", type=float, default=6.0)
    a = ap.parse_args()
    for spin in ("1", "0", "1", "0"):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        s = ort.InferenceSession(resolve_model(a.model), so, providers=["CPUExecutionProvider"])
        inp = s.get_inputs()[0]
        x = np.zeros([1 if isinstance(d, str) else d for d in inp.shape], np.float32)
        s.run(None, {inp.name: x})
        n = int(a.rate * a.seconds)
        c0, t0, runs = cpu_s(), time.monotonic(), []
        for k in range(n):
            r0 = time.perf_counter()
            s.run(None, {inp.name: x})
            runs.append(time.perf_counter() - r0)
            time.sleep(max(0.0, t0 + (k + 1) / a.rate - time.monotonic()))
        print(f"allow_spinning={spin}: {cpu_s() - c0:.2f} CPU-s in {time.monotonic() - t0:.1f} s, "
              f"median run {1e3 * float(np.median(runs)):.2f} ms")
        del s


if __name__ == "__main__":
    main()

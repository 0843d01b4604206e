"""Memory per stream (issue 15): the state a learned stream keeps, in bytes measured by
tracemalloc (no timing), with the shipped DLinear_ad (window 64, 8 channels) stepped the
daemon's way, a couple of samples at a time; and the adapter's sums, which a smaller
buffer must not change by a bit."""
from __future__ import annotations

import gc
import logging
import math
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from agent.adaptation import EPOCH, FOLD, Adapter
from agent.config import AdaptationConfig
from agent.contract import StreamScaler
from agent.detector import Detector
from agent.engine import Engine
from agent.jobs import detection_config
from agent.shipped import resolve_model
from agent.sources.base import Batch

REPO = Path(__file__).resolve().parents[1]

# bytes of Python heap one learned stream keeps, all included (ring, baseline, scaler
# versions, adapter, smoother, tracker, the engine's entry): 20.7 KB before issue
# 15's cuts, 13.6 KB after them, 11.3 KB with slots and a 16-row fold buffer, 12.1-12.2 KB
# with the level band and refinement (2026-12-07, in a fresh interpreter); 12.6 KB by the
# twenty-first session's end and 12.6-12.8 KB with `running:`'s slot (three fresh runs of
# each, side by side: runs differ by up to 0.2 KB), which left the old budget no margin
BUDGET = 13.0 * 1024
STREAMS, LEARN, AFTER = 20, 200, 3 * EPOCH


def measure() -> tuple[float, Engine]:
    """Bytes of Python heap each of STREAMS learned streams keeps, and their engine."""
    det = Detector(resolve_model("DLinear_ad"), threads=1)
    meta = det.meta
    rng = np.random.default_rng(0)
    n = LEARN + AFTER
    values = rng.normal(meta.scaler.mean, meta.scaler.std, (n, meta.n_channels)).astype(np.float32)
    ts = 1.7e9 + np.arange(n, dtype=np.float64)
    e = Engine(detection_config(meta, LEARN, node="t"), det, default_max_streams=STREAMS + 1)

    def run(sids):
        for a in range(0, n, 2):
            e.step([Batch(s, ts[a:a + 2], values[a:a + 2], source="t") for s in sids])

    run(["warm"])           # first calls: caches, lazy imports, ORT's arena
    e.drop("warm")
    gc.collect()
    # no log records: whatever handlers are installed (captured output that grows with
    # every line) must not count as the streams' memory
    logging.disable(logging.CRITICAL)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run([f"s{i}" for i in range(STREAMS)])
        gc.collect()
        per_stream = (tracemalloc.get_traced_memory()[0] - before) / STREAMS
    finally:
        tracemalloc.stop()
        logging.disable(logging.NOTSET)
    return per_stream, e


def test_a_learned_stream_keeps_under_its_byte_budget():
    # Measured in a fresh interpreter: in one that ran the tests before this one, what
    # they left (free lists, caches, interned objects) moved the figure by about 0.4 KB
    # a stream, more than the budget's margin, in either direction.
    out = subprocess.run([sys.executable, "-c", "import test_memory; print(test_memory.measure()[0])"],
                         cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    per_stream = float(out.stdout.split()[-1])
    print(f"{per_stream / 1024:.1f} KB per stream")
    assert per_stream < BUDGET
    e = measure()[1]
    st = e.streams["s0"]
    assert st.adapter is not None and not st.baseline.learning     # what is measured
    assert st.ring._buf.dtype == np.float32 and st.adapter._raw.dtype == np.float32
    assert len(st.adapter._raw) == FOLD < EPOCH
    # no instance dict on what every stream holds one of (slots)
    held = [st, st.ring, st.pace, st.smoother, st.baseline, st.tracker, st.tracker._hist,
            st.adapter]
    assert [type(o).__name__ for o in held if hasattr(o, "__dict__")] == []


class _Pace:
    interval = 1.0


@pytest.mark.parametrize("pieces", [[1] * EPOCH, [3, 7, 20, 33, 1], [EPOCH]])
def test_the_adapter_sums_an_epoch_to_the_bits_of_one_reduction(pieces):
    """Folding FOLD rows at a time continues one reduction: the adapted mean and error
    level equal, bit for bit, one reduction over the epoch's 64 rows."""
    c = 8
    rng = np.random.default_rng(1)
    mean, std = rng.normal(0, 5, c), rng.uniform(0.5, 2, c)
    raw = rng.normal(mean, std * 1.5, (EPOCH, c)).astype(np.float32)
    raw[5, 2] = np.nan
    ok = rng.random((EPOCH, c)) > 0.2
    err = rng.gamma(1.0, 1.0, (EPOCH, c)) * 10.0 ** rng.integers(-6, 6, (EPOCH, c))
    err[9, 1] = np.nan
    level = rng.uniform(0.5, 2, c)
    cfg = AdaptationConfig(enabled=True, time_constant_s=600, gate=3.0)
    ad = Adapter(cfg, StreamScaler(mean, std), _Pace(), level)
    a = 0
    for k in pieces:
        ad.observe(raw[a:a + k], ok[a:a + k], err[a:a + k])
        a += k
    assert a == EPOCH and ad.version == 1

    # the whole epoch as one reduction (the arithmetic before the buffer shrank), errors
    # rounded to float32 as the adapter keeps them
    x = raw.astype(np.float64)
    err = err.astype(np.float32).astype(np.float64)
    use = ok & (np.abs(x - mean) <= cfg.gate * std)
    n = np.add.reduce(use, axis=0, dtype=np.float64)
    e_ok = use & np.isfinite(err)
    e_n = np.add.reduce(e_ok, axis=0, dtype=np.float64)
    want_mean = mean + (1.0 - np.exp(-n / cfg.time_constant_s)) * (
        np.add.reduce(np.where(use, x, 0.0), axis=0) / n - mean)
    want_level = level + (1.0 - np.exp(-e_n / cfg.time_constant_s)) * (
        np.add.reduce(np.where(e_ok, err, 0.0), axis=0) / e_n - level)
    if cfg.max_shift is not None:
        lim = cfg.max_shift * std
        want_mean = np.clip(want_mean, mean - lim, mean + lim)
    assert ad.scaler.mean.tobytes() == want_mean.tobytes()
    assert ad.level.tobytes() == want_level.tobytes()
    assert math.isfinite(float(ad.scaler.mean.sum()))


@pytest.mark.parametrize("c", [1, 3])
def test_pieces_of_several_epochs_adapt_as_any_other_split(c):
    """A piece of several epochs (folded straight from the piece, whole epochs at once)
    adapts to the bits of one sample at a time (through the buffer), for one channel
    (which numpy sums pairwise, so by the buffer's blocks) as for several."""
    rng = np.random.default_rng(0)
    n = 3 * EPOCH
    raw = rng.normal(2.0, 1.5, (n, c)).astype(np.float32)
    ok = rng.random((n, 1)) > 0.1
    # errors of many magnitudes: their sums round, so the order of the additions shows
    err = rng.random((n, c)) * 10.0 ** rng.uniform(-3, 3, (n, c))
    cfg = AdaptationConfig(enabled=True, time_constant_s=60, gate=3.0)
    got = set()
    for pieces in ([n], [1] * n, [EPOCH] * 3, [5, 100, 87], [FOLD + 1, n - FOLD - 1]):
        # a small level to start from: the new one is mostly the epoch's error sum
        ad = Adapter(cfg, StreamScaler(np.zeros(c), np.ones(c)), _Pace(), np.full(c, 1e-6))
        a = 0
        for k in pieces:
            ad.observe(raw[a:a + k], ok[a:a + k], err[a:a + k])
            a += k
        assert ad.version == 3 and ad._filled == 0
        got.add((ad.scaler.mean.tobytes(), ad.level.tobytes()))
    assert len(got) == 1


def test_the_heap_is_trimmed_once_per_period():
    # the daemon calls maybe() every loop turn: it trims only when the period has passed
    from agent.heap import HeapTrimmer
    h = HeapTrimmer(every_s=15.0)
    assert h.available                          # glibc here: malloc_trim is found
    start = h._next
    assert h.maybe(start - 1.0) is False
    assert h.maybe(start) is True
    assert h.maybe(start + 14.0) is False       # not again within the period
    assert h.maybe(start + 15.0) is True


ARENA_COUNT = r"""
import ctypes, ctypes.util, os, sys, tempfile, threading
sys.path.insert(0, sys.argv[1])
from agent.heap import limit_arenas
if sys.argv[2] == "limit":
    assert limit_arenas(2)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
held, go = [], threading.Barrier(6)
def work():
    go.wait()                   # all threads alive at once: none inherits another's arena
    held.append(libc.malloc(4096))
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
path = os.path.join(tempfile.mkdtemp(), "info.xml")
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, f)
libc.fclose(f)
print(open(path).read().count("<heap nr="))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")
@pytest.mark.parametrize("mode", ["limit", "default"])
def test_the_daemon_limits_malloc_arenas(mode):
    # threads that allocate at once get an arena each (up to 8 per core), unless limited;
    # the daemon limits them before its threads start (agent/heap.py says why)
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", ARENA_COUNT, str(REPO), mode], env=env,
                         capture_output=True, text=True, check=True).stdout
    arenas = int(out)
    assert arenas <= 2 if mode == "limit" else arenas > 2


def test_an_arena_limit_in_the_environment_is_left_alone(monkeypatch):
    from agent.heap import limit_arenas
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_arenas() is False

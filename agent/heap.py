"""Keep the heap compact: few malloc arenas, and its free pages handed back every 15 s.

glibc's malloc keeps freed small blocks for reuse and returns memory only from the top
of the heap.  Every engine step frees many short-lived arrays between blocks that live
on (a stream's newest scaler version, its alert history), so the free space ends up
scattered over pages that stay resident: at 500 streams several MB that no object
uses (4.5 MB in benchmarks/bench_memory.py's run, "after malloc_trim").  malloc_trim(0) also releases
the whole free pages inside the heap (glibc >= 2.8); it takes a millisecond or two
(at 500 streams), so every 15 s costs nothing measurable, and the heap has little time
to scatter again in between.  Without glibc (musl, macOS) this is a no-op.

glibc also gives each thread that allocates an arena of its own (up to 8 per core), and
each arena keeps its own free blocks.  The agent's threads (the pipeline, paho's network
loops, the sinks) allocate mostly while holding the GIL, so they rarely contend for an
arena, and the extra arenas only hold more free memory: with at most ARENAS the daemon
needs 2-3 KB less per stream (benchmarks/soak.py, 50 -> 500 streams; docs/RESULTS.md).
`limit_arenas` sets that before the first thread starts, unless the environment already
chose (MALLOC_ARENA_MAX, GLIBC_TUNABLES).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

TRIM_S = 15.0
ARENAS = 2
M_ARENA_MAX = -8        # glibc's mallopt parameter


def _libc(name: str):
    """A glibc function, or None where the C library has none."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _malloc_trim():
    fn = _libc("malloc_trim")
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def limit_arenas(n: int = ARENAS) -> bool:
    """At most n malloc arenas from now on (call before starting threads); False where the
    C library has no mallopt or the environment sets the limit itself."""
    if "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    fn = _libc("mallopt")
    if fn is None:
        return False
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn(M_ARENA_MAX, n) == 1


class HeapTrimmer:
    def __init__(self, every_s: float = TRIM_S):
        self.every_s = every_s
        self._trim = _malloc_trim()
        self._next = time.monotonic() + every_s

    @property
    def available(self) -> bool:
        return self._trim is not None

    def maybe(self, now: float | None = None) -> bool:
        """Trim when the period has passed since the last trim; whether it trimmed."""
        now = time.monotonic() if now is None else now
        if self._trim is None or now < self._next:
            return False
        self._next = now + self.every_s
        return self.trim()

    def trim(self) -> bool:
        """Trim now (benchmarks/bench_memory.py measures what this gives back)."""
        if self._trim is None:
            return False
        self._trim(0)
        return True

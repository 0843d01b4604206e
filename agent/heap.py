"""Hand the heap's free pages back to the system, every 15 s.

glibc's malloc keeps freed small blocks for reuse and returns memory only from the top
of the heap.  Every engine step frees many short-lived arrays between blocks that live
on (a stream's newest scaler version, its alert history), so the free space ends up
scattered over pages that stay resident: at 500 streams several MB that no object
uses (4.5 MB in benchmarks/bench_memory.py's run, "after malloc_trim").  malloc_trim(0) also releases
the whole free pages inside the heap (glibc >= 2.8); it takes a millisecond or two
(at 500 streams), so every 15 s costs nothing measurable, and the heap has little time
to scatter again in between.  Without glibc (musl, macOS) this is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import time

TRIM_S = 15.0


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


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

"""When learned baselines reach the disk: a few at a time, between engine steps.

`StateStore` writes a stream's file atomically, with two fsyncs.  Written all at once
(at the end of a learning period that many streams started together, and at the
periodic save of every stream), they held up detection: 500 streams took 0.3-0.5 s on
this VM's disk and 11 s with 10 ms fsyncs, a stand-in for an SD card
(benchmarks/bench_state_save.py).  A writer thread took that wait away but cost the
daemon about 2 KB a stream (docs/RESULTS.md, ninth session).  So a save is made due, not
done: after each engine step, and on each idle tick of the pipeline, due streams are
saved until SAVE_BUDGET_S has passed, at least one.  A step then waits for about one
file, not for hundreds.

Rules:
- A stream whose learning period just ended is saved first: it has no file yet; so is
  one whose threshold was just refined (agent/refine.py), which a restart would
  otherwise refine again.  The periodic save (`due_all`) queues every stream behind those.
- A stream queued twice is saved once; one dropped or learning again by its turn is
  skipped by the save itself (`Engine.save`).
- `Engine.save_baselines` saves every stream at once and empties the queue: a clean stop
  or a reload, where no detection waits.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

SAVE_BUDGET_S = 0.005   # per step: about one file on an SD card, a dozen on a fast disk


class SaveQueue:
    __slots__ = ("_first", "_rest")

    def __init__(self) -> None:
        self._first: dict[str, None] = {}    # learning ended: no file yet
        self._rest: dict[str, None] = {}

    def __len__(self) -> int:
        return len(self._first) + len(self._rest)

    def due(self, sid: str, first: bool = False) -> None:
        (self._first if first else self._rest)[sid] = None

    def due_all(self, sids: Iterable[str]) -> None:
        self._rest.update(dict.fromkeys(sids))

    def clear(self) -> None:
        self._first.clear()
        self._rest.clear()

    def run(self, save: Callable[[str], None], budget_s: float | None = None) -> int:
        """Save due streams, in order, until `budget_s` (default SAVE_BUDGET_S) has passed;
        at least one when any is due.  How many were saved."""
        if not (self._first or self._rest):
            return 0
        end = time.monotonic() + (SAVE_BUDGET_S if budget_s is None else budget_s)
        n = 0
        for q, other in ((self._first, self._rest), (self._rest, self._first)):
            while q:
                sid = next(iter(q))
                del q[sid]
                other.pop(sid, None)
                save(sid)
                n += 1
                if time.monotonic() >= end:
                    return n
        return n

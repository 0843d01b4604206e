"""How much learning-period fitting one engine step may do, and the heartbeat during a fit.

Streams that start together end their learning periods together, and each fit scores
every window of its held samples.  Fitted in one step, 100 streams' 30 minutes at 1 Hz
took 10 s with TimesNet_ad here, and on a board 3x slower the daemon's main loop, which
feeds the systemd watchdog (WatchdogSec=30s), stopped past it (RESULTS, twelfth session).

The budget is the wall time the step's fits took: a step goes on fitting while its fits
have taken under FIT_SECONDS (its first fit always runs); the others wait, with their
later samples, for the next step, which the daemon runs at once.  A count of samples, the
budget before, held a model's cost per window fixed: a 300-channel PatchTST_ad costs 40x
the shipped one a window, and 4,096 samples of it took 36 s in one step (RESULTS,
twenty-first session).  Results do not change, only their step.

One stream's fit is never split (its windows are its baseline), so it can still be long:
a day of 1 Hz samples, or a heavy model.  The fit is the loop's progress, so `progress`
(the daemon: the watchdog's heartbeat) is told after each batch it infers, and the
stream's log line gives how long its fit took.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

# The sample budget it replaces (4,096) took the shipped models up to 0.24 s here: the
# same for them (100 TimesNet_ad streams ending 30 minutes of learning together: longest
# step 0.35 s before, 0.41 s now), and far under WatchdogSec on slower boards.
FIT_SECONDS = 0.25


class FitBudget:
    __slots__ = ("progress", "_used")

    def __init__(self):
        #: called after each batch a fit infers (the daemon: its watchdog's heartbeat)
        self.progress: Callable[[], None] | None = None
        self._used: float | None = None       # None: no fit yet in this step

    def new_step(self) -> None:
        self._used = None

    def room(self) -> bool:
        """Whether this step may start another fit."""
        return self._used is None or self._used < FIT_SECONDS

    def infer(self, infer: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        """`infer` telling `progress` after each call: what a fit is given."""
        if self.progress is None:
            return infer
        progress = self.progress

        def told(x: np.ndarray) -> np.ndarray:
            y = infer(x)
            progress()
            return y
        return told

    def spent(self, seconds: float) -> None:
        """A fit of this step took `seconds`."""
        self._used = (self._used or 0.0) + seconds

"""Counting and logging unusable input: every reason counted in `Metrics.malformed`,
logged at most once per reason per LOG_INTERVAL_S with how many more came meanwhile,
so a broken sensor neither floods the journal nor goes unnoticed.  A reason that keeps
coming (a device that always sends an extra key) is reported half as often each time,
down to once per MAX_LOG_INTERVAL_S: a condition that never changes is not news
8,640 times a day.  One that comes back after a quiet spell longer than its current
interval is reported at once, and after one longer than twice that interval and than
QUIET_S its interval starts again at LOG_INTERVAL_S: a device status message every
minute on the data topic is a condition that goes on, not news each minute (1,440 lines
a day before; RESULTS, twenty-first session).  Reasons met while
one payload is decoded (it may hold 100k samples) are `note`d and reported once by
`flush`."""
from __future__ import annotations

import logging
import time
from typing import Hashable

from .metrics import Metrics

log = logging.getLogger("tsad.decode")

LOG_INTERVAL_S = 10.0
MAX_LOG_INTERVAL_S = 3600.0
QUIET_S = 3600.0        # a reason away this long is news again when it comes back


def named(names: list[str], most: int = 3) -> str:
    """Names for a log detail: the first `most` (each cut to 40 characters), then how many
    more, so that one line says which without growing with the model."""
    shown = ", ".join(n[:40] for n in names[:most])
    return shown + (f" +{len(names) - most} more" if len(names) > most else "")


class BadInput:
    def __init__(self, metrics: Metrics, log_name: str):
        self.metrics, self.log_name = metrics, log_name
        self._last_log: dict[Hashable, float] = {}
        self._interval: dict[Hashable, float] = {}
        self._seen: dict[Hashable, float] = {}       # when each reason last came
        self._suppressed: dict[Hashable, int] = {}
        self._pending: dict[str, list] = {}

    def bad(self, reason: str, data: bytes | str = b"", n: int = 1, detail: str = "") -> None:
        """Count n unusable inputs; log unless this reason was logged < 10 s ago."""
        self.metrics.bad(reason, n)
        more = self.may_log(reason, n)
        if more is not None:
            snippet = data[:80] if isinstance(data, (bytes, str)) else b""
            log.warning("%s: %s%s in %r%s", self.log_name, reason,
                        f" ({detail})" if detail else "", snippet,
                        f" (+{more} more since last report)" if more else "")

    def may_log(self, key: Hashable, n: int = 1) -> int | None:
        """How many more of `key` (a reason, or any hashable) to report with this log line;
        None: not yet due."""
        now = time.monotonic()
        last, seen = self._last_log.get(key), self._seen.get(key)
        self._seen[key] = now
        gap = self._interval.get(key, LOG_INTERVAL_S)
        if last is not None and now - last < gap:
            self._suppressed[key] = self._suppressed.get(key, 0) + n
            return None
        # going on: it came again within twice the interval or an hour (so a quirk every
        # 15 s, or every minute, backs off too); after a quiet spell it is news again
        going_on = seen is not None and now - seen < max(2 * gap, QUIET_S)
        self._interval[key] = min(2 * gap, MAX_LOG_INTERVAL_S) if going_on else LOG_INTERVAL_S
        self._last_log[key] = now
        return self._suppressed.pop(key, 0) + n - 1

    def left_out(self, key: Hashable) -> int | None:
        """The occurrences of `key` left out of the log since its last line, once its
        interval has passed (they then count as reported); else None.  For a condition
        whose last occurrence was left out and that then persists without occurring
        again: its line is still owed."""
        n = self._suppressed.get(key)
        gap = self._interval.get(key, LOG_INTERVAL_S)
        if not n or time.monotonic() - self._last_log[key] < gap:
            return None
        self._last_log[key] = time.monotonic()
        self._interval[key] = min(2 * gap, MAX_LOG_INTERVAL_S)     # it went on: back off
        return self._suppressed.pop(key)

    def note(self, reason: str, data, detail: str = "") -> None:
        p = self._pending.get(reason)
        if p is None:
            self._pending[reason] = [1, data, detail]
        else:
            p[0] += 1

    def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, {}
            for reason, (n, data, detail) in pending.items():
                self.bad(reason, data, n, detail)

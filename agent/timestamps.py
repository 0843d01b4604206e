"""Time as the agent writes it: ISO 8601 in UTC with milliseconds, one convention in
every payload (alerts, scores, health, command results)."""
from __future__ import annotations

from datetime import datetime, timezone


def iso_utc(ts: float) -> str | None:
    """ISO 8601 UTC with milliseconds; None for a time no calendar can show (the decoders
    refuse such timestamps, but a replayed file or an API caller may still bring one)."""
    try:
        return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds") \
            .replace("+00:00", "Z")
    except (ValueError, OverflowError, OSError):
        return None

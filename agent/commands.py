"""Operator commands (alarm management after ISA-18.2), checked and carried out.

A command is a JSON object with a request id:

    {"id": "r1", "cmd": "recalibrate", "stream": "pump-1"}
    {"id": "r2", "cmd": "ack", "alert_id": "pump-hall-2:pump-1:1583750689000"}
    {"id": "r5", "cmd": "ack", "stream": "pump-1"}        (its latest alert: a static button)
    {"id": "r3", "cmd": "shelve", "stream": "pump-1", "for_s": 3600}
    {"id": "r4", "cmd": "unshelve", "stream": "pump-1"}

and every command gets exactly one result, {"id", "cmd", "ok", "error"?, ...}.  Parsing
never raises: a malformed command gets ok false and an error that says what is wrong.
`execute` runs on the pipeline thread (the engine has no locks), so commands arrive
through the pipeline's queue; the events a command causes (the end of an alert a
re-baseline closed, the update an ack produced) go to the sinks like any other.

A stream the agent shows (its Home Assistant entities) but does not run takes commands
too (`idle`): a topic-named stream before its first sample after a restart, one dropped
while silent.  "unknown stream" is for ids the agent does not know at all.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

from .engine import Engine
from .timestamps import iso_utc

COMMANDS = ("recalibrate", "ack", "shelve", "unshelve")
# a forgotten shelve must still lift within a week, of the stream's elapsed time: a device
# clock's step back does not lengthen it, nor a live stream's step forward end it
# (agent/sample_clock.py)
MAX_SHELVE_S = 7 * 24 * 3600.0
MAX_ID = 128

log = logging.getLogger(__name__)


@dataclass
class Command:
    request_id: str | None
    cmd: str | None
    args: dict = field(default_factory=dict)
    error: str | None = None            # set when the command could not be parsed
    reply: Callable[[dict], None] | None = None


def _text(doc: dict, key: str) -> str | None:
    v = doc.get(key)
    return v if isinstance(v, str) and 0 < len(v) <= MAX_ID else None


def parse(payload: bytes | str) -> Command:
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return Command(None, None, error="not JSON")
    if not isinstance(doc, dict):
        return Command(None, None, error="expected a JSON object")
    rid = doc.get("id")
    if rid is not None and not (isinstance(rid, str) and 0 < len(rid) <= MAX_ID):
        # not carried out: its result could not name it, and the sender could not tell
        # which command the result answers
        return Command(None, None, error=f"'id' must be a string of 1-{MAX_ID} chars")
    cmd = doc.get("cmd")
    if cmd not in COMMANDS:
        return Command(rid, None, error=f"cmd must be one of {', '.join(COMMANDS)}")
    need = {"recalibrate": ("stream",), "shelve": ("stream",), "unshelve": ("stream",),
            "ack": ("stream",) if "stream" in doc and "alert_id" not in doc else ("alert_id",)}[cmd]
    args = {}
    for key in need:
        v = _text(doc, key)
        if v is None:
            return Command(rid, cmd, error=f"{cmd} needs '{key}' (a string of 1-{MAX_ID} chars)")
        args[key] = v
    if cmd == "shelve":
        f = doc.get("for_s")
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) \
                or not 0 < f <= MAX_SHELVE_S:
            return Command(rid, cmd, error=f"shelve needs 'for_s', seconds in (0, {MAX_SHELVE_S:g}]")
        args["for_s"] = float(f)
    return Command(rid, cmd, args)


def execute(c: Command, engine: Engine) -> tuple[dict, list[dict]]:
    """(the result, alert events the command produced)."""
    result = {"id": c.request_id, "cmd": c.cmd, "ok": False}
    if c.error:
        return {**result, "error": c.error}, []
    a = c.args
    if c.cmd == "ack":
        ev = engine.ack(a.get("alert_id"), a.get("stream"))
        if ev is None:
            return {**result, "error": f"no alert {a['alert_id']!r} to acknowledge (open, or ended "
                                       f"unacknowledged)" if "alert_id" in a else
                    f"stream {a['stream']!r} has no alert to acknowledge"
                    + ("" if a["stream"] in engine.streams else " (no such stream runs: check "
                                                                "its id)")}, []
        return {**result, "ok": True, "alert_id": ev["id"]}, [ev]
    sid = a["stream"]
    if c.cmd == "recalibrate":
        known, ev = engine.rebaseline(sid)
        if not known:
            return {**result, "error": f"unknown stream {sid!r}"}, []
        return {**result, "ok": True, "stream": sid}, [ev] if ev else []
    until = engine.shelve(sid, a["for_s"] if c.cmd == "shelve" else 0.0)
    if until is None:
        return {**result, "error": f"unknown stream {sid!r}"}, []
    return {**result, "ok": True, "stream": sid,
            "shelved_until": iso_utc(until) if c.cmd == "shelve" else None}, []


def idle(c: Command, engine: Engine, book) -> dict:
    """The result of a stream command (parsed, no error) for a stream the agent shows but
    does not run.  A shelve waits in the ShelfBook `book` and is given at the stream's first
    sample, counted from now until then (as a configured stream's before its first sample);
    an unshelve lifts it.  A recalibrate deletes its saved baseline, so the stream learns
    afresh from its first sample, as a running one would from now."""
    sid = c.args["stream"]
    result = {"id": c.request_id, "cmd": c.cmd, "ok": True, "stream": sid}
    if c.cmd == "recalibrate":
        if engine.store:
            engine.store.forget(sid)
        log.info("stream %s: not running; its saved baseline is deleted: it learns afresh "
                 "from its first sample", sid)
        return result
    until = book.hold(sid, c.args["for_s"] if c.cmd == "shelve" else 0.0)
    return {**result, "shelved_until": iso_utc(until) if c.cmd == "shelve" else None}

"""The MQTT sink's operator command channel: P cmd in, P cmd/result out.

Each message on P cmd goes to the attached pipeline (`command`), which parses it,
carries it out on its own thread and hands the result back; the result, stamped `ts`,
goes out on P cmd/result.  Nothing but the broker's ACL authorises a command (README,
"Operate").  A malformed command gets an error result (with its request id when it has
one), never an exception; refused commands are counted in health (`mqtt.commands`) and
logged.  A retained command is refused: the broker would hand it over again at every
start and reconnect.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter

from ..timestamps import iso_utc
from .base import to_json

log = logging.getLogger("agent.sinks.mqtt")     # the sink's own name, as in operators' filters

MAX_COMMAND_BYTES = 4096   # a command is a few short fields; anything longer is refused unread


def _text(payload: bytes, key: str) -> str | None:
    """A command's `key` (its request id, its name) where the payload has it as text."""
    try:
        value = json.loads(payload).get(key)
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


class CommandChannel:
    def __init__(self, client, prefix: str) -> None:
        self.client = client
        self.t_cmd, self.t_result = prefix + "cmd", prefix + "cmd/result"
        self.command = None                 # the attached pipeline's command(payload, reply)
        self._counts: Counter = Counter()   # "ok" / "refused"
        self._lock = threading.Lock()       # results come from two threads

    def counts(self) -> dict:
        with self._lock:
            return {"ok": self._counts["ok"], "refused": self._counts["refused"]}

    def on_message(self, payload: bytes, retained: bool) -> None:
        from ..commands import COMMANDS     # here: commands needs the engine, whose config needs the sinks
        command = self.command
        if not payload:
            log.debug("empty message on %s (a retained command cleared): not a command", self.t_cmd)
        elif len(payload) > MAX_COMMAND_BYTES:
            self.reply({"id": None, "cmd": None, "ok": False,
                        "error": f"command longer than {MAX_COMMAND_BYTES} bytes"})
        elif retained:
            # The broker hands a retained message to every new subscription: at each start
            # and reconnect. Carried out, a retained recalibrate would learn whatever the
            # machine does at that moment (a fault included) as normal.
            name = _text(payload, "cmd")
            self.reply({"id": _text(payload, "id"), "cmd": name if name in COMMANDS else None,
                        "ok": False,
                        "error": "a retained command is refused: a command is carried out "
                                 "once, when it is sent; clear it with an empty retained "
                                 f"message on {self.t_cmd}"})
        elif command is None:     # a file replay (the demo's --mqtt) runs no pipeline
            self.reply({"id": _text(payload, "id"), "cmd": None, "ok": False,
                        "error": "this run of the agent takes no commands"})
        else:
            command(payload, self.reply)

    def reply(self, result: dict) -> None:
        """Publish a command's result (any thread: the pipeline's, or paho's)."""
        ok = bool(result.get("ok"))
        with self._lock:
            self._counts["ok" if ok else "refused"] += 1
            n = self._counts["refused"]
        if ok:       # the broker knows who sent it; this log says what was done
            log.info("command %s (id %r) carried out: %s", result.get("cmd"), result.get("id"),
                     {k: v for k, v in result.items() if k not in ("id", "cmd", "ok")})
        elif n <= 5 or n % 100 == 0:
            log.warning("command %s (id %r) refused: %s (%d refused so far)", result.get("cmd"),
                        result.get("id"), result.get("error"), n)
        self.client.publish(self.t_result, to_json({**result, "ts": iso_utc(time.time())}),
                            qos=1, retain=False)

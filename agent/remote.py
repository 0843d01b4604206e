"""Operator commands sent to a running agent over MQTT: the `tsad-agent ack | shelve |
unshelve | recalibrate` verbs.

One command per call: connect with a clean session (nothing is left behind in the
broker), subscribe to `P cmd/result`, publish the command on `P cmd` (QoS 1, with a
fresh request id), wait for the result carrying that id.  The agent checks the
command; this side only builds it, so a malformed one gets the agent's error.

Exit codes: 0 the agent carried it out; 1 the agent refused it (its error is
printed); 2 a usage or broker problem, or no result within the timeout (the broker keeps
the command for an agent of that node that is away, in its persistent session, and drops
it when no agent of that node ever connected: a misspelt --node).
"""
from __future__ import annotations

import json
import re
import sys
import threading
import uuid

import msgspec

from .config import ConfigError, load_config
from .config_build import build
from .mqtt_client import MqttConfig, TlsConfig, make_client
from .preflight import reason

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|min|h|d)?")
_UNIT_S = {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
MAX_SHELVE_S = 7 * 86400     # the agent's limit (agent.commands.MAX_SHELVE_S)


class UsageError(ValueError):
    pass


def duration_s(text: str) -> float:
    """'90', '90s', '15m', '1.5h', '2d' -> seconds."""
    m = _DURATION.fullmatch(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"--for {text!r}: expected a duration such as 90s, 15m, 1h or 2d")
    s = float(m.group(1)) * _UNIT_S[m.group(2)]
    if s > MAX_SHELVE_S:
        raise UsageError(f"--for {text!r}: a shelve lasts a week at most")
    return s


def command_doc(a) -> dict:
    doc = {"id": uuid.uuid4().hex, "cmd": a.cmd}
    if a.cmd == "ack":
        # an alert id is node:stream:ms; a stream id has no colon (config_base.STREAM_ID_CHARS)
        doc["alert_id" if ":" in a.alert_id else "stream"] = a.alert_id
    else:
        doc["stream"] = a.stream
    if a.cmd == "shelve":
        doc["for_s"] = duration_s(a.for_)
    return doc


def broker(a) -> tuple[MqttConfig, str, str]:
    """(broker settings, node, topic prefix) from --config and the flags over it."""
    if a.config:
        try:
            cfg = load_config(a.config)
        except ConfigError as e:
            raise UsageError(reason(e)) from None
        m, node, prefix = cfg.mqtt, cfg.node, cfg.topic_prefix
    elif a.node or a.prefix:
        m, node = MqttConfig(), a.node or "cli"
        prefix = a.prefix or f"tsad/{node}/"
    else:
        raise UsageError("give --config FILE, or --node NODE (with --host/--port) to say "
                         "which agent")
    over = {k: v for k, v in (("host", a.host), ("port", a.port), ("username", a.username))
            if v is not None}
    if a.password_file or a.password_env:
        over.update(password_file=a.password_file, password_env=a.password_env,
                    password_credential=None)
    if a.ca_file:
        over["tls"] = TlsConfig(ca_file=a.ca_file)
    try:
        m = build(MqttConfig, {**msgspec.structs.asdict(m), **over})
    except ValueError as e:
        raise UsageError(f"broker flags: {reason(e)}") from None
    if a.prefix:
        prefix = a.prefix if a.prefix.endswith("/") else a.prefix + "/"
    return m, node, prefix


def send(m: MqttConfig, node: str, prefix: str, doc: dict, timeout: float) -> dict:
    """Publish `doc` on P cmd and return the agent's result; OSError/TimeoutError/
    ConnectionError on broker problems."""
    done, ready = threading.Event(), threading.Event()
    box: dict = {}
    c = make_client(m, node, role=f"cli-{doc['id'][:8]}", clean_session=True)

    def on_connect(client, userdata, flags, rc, props):
        if rc.is_failure:
            box["refused"] = str(rc)
            ready.set()
        else:
            client.subscribe(prefix + "cmd/result", qos=1)

    def on_message(client, userdata, msg):
        try:
            result = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(result, dict) and result.get("id") == doc["id"]:
            box["result"] = result
            done.set()

    c.on_connect = on_connect
    c.on_subscribe = lambda *args: ready.set()
    c.on_message = on_message
    try:
        c.connect(m.host, m.port, keepalive=m.keepalive)
    except OSError as e:
        raise ConnectionError(f"cannot reach the broker {m.host}:{m.port}: "
                              f"{e.strerror or e}") from None
    c.loop_start()
    try:
        if not ready.wait(timeout) or "refused" in box:
            raise ConnectionError(f"broker {m.host}:{m.port} "
                                  + (f"refused the connection: {box['refused']}"
                                     if "refused" in box else "did not answer"))
        c.publish(prefix + "cmd", json.dumps(doc), qos=1).wait_for_publish(timeout)
        if not done.wait(timeout):
            raise TimeoutError(
                f"no result from the agent within {timeout:g} s: is {prefix}cmd its command "
                f"topic (--node, --prefix), and the agent running? An agent that is away gets "
                f"the command when it is back; where none ever subscribed, the broker dropped it")
        return box["result"]
    finally:
        c.disconnect()
        c.loop_stop()


def run(a) -> int:
    try:
        doc = command_doc(a)
        m, node, prefix = broker(a)
        result = send(m, node, prefix, doc, a.timeout)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:     # an unreadable password file or TLS file
        print(f"error: {'; '.join(e.problems)}", file=sys.stderr)
        return 2
    except (OSError, TimeoutError, ConnectionError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0 if result.get("ok") else 1


def add_parsers(sub) -> None:
    verbs = {"ack": ("acknowledge an alert, open or ended; a stream id: its latest", "alert_id"),
             "shelve": ("no new alert on a stream for a while", "stream"),
             "unshelve": ("lift a shelve now", "stream"),
             "recalibrate": ("start a new learning period on a stream", "stream")}
    for verb, (text, arg) in verbs.items():
        s = sub.add_parser(verb, help=f"{text} (sent over MQTT to a running agent)")
        s.add_argument(arg, metavar="ALERT_ID|STREAM" if verb == "ack" else arg.upper())
        if verb == "shelve":
            s.add_argument("--for", dest="for_", required=True, metavar="DURATION",
                           help="e.g. 90s, 15m, 1h, 2d (a week at most)")
        s.add_argument("--config", "-c", help="the agent's config: broker, node, prefix")
        s.add_argument("--host")
        s.add_argument("--port", type=int)
        s.add_argument("--node", help="the agent's node (topic prefix tsad/<node>/)")
        s.add_argument("--prefix", help="the agent's topic prefix, when not tsad/<node>/")
        s.add_argument("--username")
        s.add_argument("--password-file")
        s.add_argument("--password-env", metavar="NAME")
        s.add_argument("--ca-file", help="TLS: the broker's CA certificate")
        s.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the result")
        s.set_defaults(fn=run)

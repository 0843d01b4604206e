"""A link to the broker that dies without a word (Wi-Fi gone, a NAT entry timed out, the
broker's host without power): the real agent publishes into it until its keepalive runs
out, then reconnects.  What the broker retains afterwards must be the stream's state now.

paho resends the previous connection's unacknowledged publications after its on_connect
callback; the agent used to republish its retained values inside that callback, so the
older copies landed last: `normal` stayed retained, and no alert, while an alert was open
(the connection audit, 2 of 2 runs)."""
from __future__ import annotations

import json
import os
import select
import socket
import threading
import time

import pytest

from agent_harness import (MOSQUITTO, AgentProcess, LineWriter, Observer, Pty, alert_id,
                           retained, tiny_model, wait_until, write_config)
from conftest import Broker

pytestmark = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto not installed")


class Link:
    """A TCP relay to the broker on 127.0.0.1 that can go dead: `cut()` keeps every socket
    open and drops every byte both ways; `mend()` closes the dead connections (as the
    network would, eventually) and relays new ones again."""

    def __init__(self, target: int):
        self.target, self.dead = target, False
        self.pairs: dict[socket.socket, socket.socket] = {}
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._relay, daemon=True).start()

    def cut(self) -> None:
        self.dead = True

    def mend(self) -> None:
        with self.lock:
            for s in self.pairs:
                s.close()
            self.pairs.clear()
            self.dead = False

    def close(self) -> None:
        self.stopped = True
        self.mend()
        self.server.close()

    def _relay(self) -> None:
        while not self.stopped:
            with self.lock:
                socks = [self.server, *self.pairs]
            try:
                ready, _, _ = select.select(socks, [], [], 0.05)
            except (OSError, ValueError):
                continue
            for s in ready:
                with self.lock:
                    try:
                        self._one(s)
                    except OSError:     # closed by mend() or close() since the select
                        pass

    def _one(self, s: socket.socket) -> None:
        if s is self.server:
            client, _ = s.accept()
            if self.dead:               # a dead network answers nothing
                self.pairs[client] = client
                return
            up = socket.create_connection(("127.0.0.1", self.target))
            self.pairs[client], self.pairs[up] = up, client
            return
        if s not in self.pairs:
            return
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        if self.dead:
            return
        peer = self.pairs[s]
        if not data:
            for x in (s, peer):
                self.pairs.pop(x, None)
                x.close()
            return
        peer.sendall(data)


def test_after_a_dead_link_the_broker_retains_the_state_and_alert_of_now(tmp_path):
    (tmp_path / "mq").mkdir()
    broker = Broker(tmp_path / "mq").start()
    link = Link(broker.port)
    obs = Observer(broker.port).wait_subscribed()
    pty = Pty()
    cfg = write_config(tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=link.port,
                       serial_port=pty.path, state_dir=tmp_path / "state")
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    w = LineWriter(pty)
    try:
        agent.wait_log("open at")
        agent.wait_log("MQTT connected")
        w.normal(20)
        w.line(True)                       # alert 1 opens (one anomalous window)
        wait_until(lambda: len(obs.ids("new")) == 1, "alert 1 to open")
        first = next(iter(obs.ids("new")))
        link.cut()
        w.normal(5)                        # alert 1 ends: published into the dead link
        agent.wait_log("lost", timeout=30)     # keepalive 5 s: paho gives the link up
        second = w.line(True)              # alert 2 opens while the agent is away
        for _ in range(3):
            w.line(True)                   # and stays open
        time.sleep(0.5)
        link.mend()
        agent.wait_log("MQTT connected", 2, timeout=60)
        wait_until(lambda: alert_id(second) in obs.ids("new"), "alert 2's new event", 30)
        time.sleep(2)                      # the resends and the republication have landed
        state = retained(broker.port, "tsad/rb/stream/pump/state")
        alert = retained(broker.port, "tsad/rb/stream/pump/alert")
    finally:
        agent.close()
        obs.close()
        pty.close()
        link.close()
        broker.stop()
    assert obs.ids("end")[first] == 1      # alert 1's end came through with the resends
    assert state == b"anomaly", state
    assert alert and json.loads(alert)["id"] == alert_id(second), alert


def test_a_broker_that_drops_each_connection_is_backed_off_from_and_named_once(tmp_path):
    """A message over the broker's max_packet_size (here the health message) makes
    Mosquitto close the connection as soon as it comes, at every connection.  The agent
    reconnected every second, logging two lines each time (126 a minute, the connection
    audit); now short connections back off as failed ones do, and one error says why."""
    (tmp_path / "mq").mkdir()
    broker = Broker(tmp_path / "mq", extra_conf="max_packet_size 700\n").start()
    pty = Pty()
    cfg = write_config(tmp_path / "agent.yaml", model=tiny_model(tmp_path), port=broker.port,
                       serial_port=pty.path, state_dir=tmp_path / "state")
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        agent.wait_log("open at")
        LineWriter(pty).normal(20)      # a stream in health: over 700 bytes
        agent.wait_log("closed the connection within", timeout=30)
        time.sleep(20)
        log = agent.log()
        connects = (broker.dir / "mosquitto.log").read_text().count("New client connected")
        assert agent.running(), log
        # the limit raised: the journal's last word must not stay "closed the connection"
        broker.stop()
        (tmp_path / "mq2").mkdir()
        broker = Broker(tmp_path / "mq2", port=broker.port).start()
        agent.wait_log("has stayed up for 10 s, after", timeout=60)
    finally:
        agent.close()
        pty.close()
        broker.stop()
    assert log.count("closed the connection within") == 1, log
    # 1 + 2 + 4 + 8 + 16 s between attempts: about 7 connections in 30 s, not 30
    assert connects <= 10, connects
    assert log.count("MQTT connected") + log.count("lost") <= 8, log

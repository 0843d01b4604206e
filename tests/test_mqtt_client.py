"""The agent's MQTT clients read the socket in blocks (`mqtt.read_bytes`): every
message still arrives, in order, without waiting for later traffic, and a lost
connection's bytes are dropped."""
from __future__ import annotations

import socket
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from agent.mqtt_client import BufferedClient, MqttConfig, make_client
from conftest import started_broker


@pytest.fixture
def roomy_broker(tmp_path):
    """A broker that queues any number of messages for a client: mosquitto's default of
    1000 drops the rest of a burst that a busy subscriber is still reading."""
    b = started_broker(tmp_path, "max_queued_messages 0")
    yield b
    b.stop()


class _Sock:
    """A socket whose reads are counted; without recv_into, a transport paho reads itself."""

    def __init__(self, sock: socket.socket, recv_into: bool = True):
        self.sock, self.reads = sock, 0
        if recv_into:
            self.recv_into = self._recv_into

    def _recv_into(self, buf) -> int:
        self.reads += 1
        return self.sock.recv_into(buf)

    def recv(self, n: int) -> bytes:
        self.reads += 1
        return self.sock.recv(n)


def _counting_reads(monkeypatch, client) -> list[int]:
    """How often `client` goes to its socket for bytes (its buffer empty)."""
    reads = [0]
    orig = BufferedClient._sock_recv

    def counting(self, bufsize):
        if self is client and not self.buffered():
            reads[0] += 1
        return orig(self, bufsize)

    monkeypatch.setattr(BufferedClient, "_sock_recv", counting)
    return reads


def test_read_bytes_chooses_the_client():
    default = make_client(MqttConfig(), "unit", "a")
    assert isinstance(default, BufferedClient) and len(default._rmem) == 16384
    plain = make_client(MqttConfig(read_bytes=0), "unit", "p")
    assert type(plain) is mqtt.Client      # 0: paho reads each packet itself
    buffered = make_client(MqttConfig(read_bytes=4096), "unit", "b")
    assert isinstance(buffered, BufferedClient) and len(buffered._rmem) == 4096


def test_bytes_come_from_one_read_and_a_new_socket_drops_the_old_ones():
    c = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, client_id="unit")
    a, b = socket.socketpair()
    a2, b2 = socket.socketpair()
    try:
        a.setblocking(False)
        a2.setblocking(False)
        c._sock = first = _Sock(a)
        b.sendall(b"abcdef")
        assert [c._sock_recv(1), c._sock_recv(2), c._sock_recv(10)] == [b"a", b"bc", b"def"]
        assert first.reads == 1
        with pytest.raises(BlockingIOError):        # nothing waits: paho's "again"
            c._sock_recv(1)
        b.sendall(b"123456")
        assert c._sock_recv(1) == b"1" and c.buffered() == 5
        c._sock = _Sock(a2)                          # a reconnect: a new socket
        assert c.buffered() == 0
        b2.sendall(b"xy")
        assert c._sock_recv(5) == b"xy"
        b2.close()
        assert c._sock_recv(5) == b""               # closed: paho's "connection lost"
    finally:
        c._sock = None
        for s in (a, b, a2, b2):
            s.close()


def test_a_transport_without_recv_into_is_read_by_paho():
    c = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, client_id="unit")
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        c._sock = ws = _Sock(a, recv_into=False)
        b.sendall(b"abc")
        assert c._sock_recv(1) == b"a" and c.buffered() == 0
        assert c._sock_recv(5) == b"bc" and ws.reads == 2
    finally:
        c._sock = None
        a.close()
        b.close()


@pytest.mark.parametrize("qos", [0, 1])
def test_a_burst_arrives_whole_and_in_order_with_fewer_reads_than_messages(roomy_broker,
                                                                            monkeypatch, qos):
    broker = roomy_broker
    n = 3000
    got: list[bytes] = []
    done, subscribed = threading.Event(), threading.Event()
    sub = make_client(MqttConfig(port=broker.port, read_bytes=16384), "unit", "sub",
                      clean_session=True)
    reads = _counting_reads(monkeypatch, sub)

    def on_message(client, userdata, msg):
        got.append(msg.payload)
        if len(got) == n:
            done.set()

    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda client, *a: client.subscribe("burst/x", qos=qos)
    # a long keepalive: a message left in the buffer would wait for the next ping
    sub.connect("127.0.0.1", broker.port, keepalive=600)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="unit-pub")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        assert subscribed.wait(10)
        reads[0] = 0
        infos = [pub.publish("burst/x", str(i).encode(), qos=qos) for i in range(n)]
        infos[-1].wait_for_publish(30)
        # nothing is published after the burst: its last message must not wait in the buffer
        assert done.wait(30), f"{len(got)} of {n} messages arrived"
        time.sleep(0.2)
        assert got == [str(i).encode() for i in range(n)]
        # paho alone reads three times a message (type, length, body)
        assert reads[0] < n, f"{reads[0]} socket reads for {n} messages"
    finally:
        pub.loop_stop()
        pub.disconnect()
        sub.loop_stop()
        sub.disconnect()

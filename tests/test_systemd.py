"""systemd integration: sd_notify datagrams on a real socket, the progress-gated watchdog,
the unit file (verify + security exposure), and the unit's seccomp rules against the
real runtime libraries."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from agent import sdnotify
from agent.sdnotify import Watchdog

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "tsad-agent.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed "
                                   "(apt-get install systemd)")


# ---------------------------------------------------------------- sd_notify protocol
@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A bound datagram socket standing in for systemd's notification socket."""
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield s
    s.close()


def recv(s: socket.socket) -> str:
    return s.recv(4096).decode()


def test_ready_status_stopping_exact_datagrams(notify_socket):
    assert sdnotify.ready() is True
    assert recv(notify_socket) == "READY=1"
    assert sdnotify.ready("model warm, 2 sources open")
    assert recv(notify_socket) == "READY=1\nSTATUS=model warm, 2 sources open"
    assert sdnotify.status("3 streams")
    assert recv(notify_socket) == "STATUS=3 streams"
    assert sdnotify.watchdog()
    assert recv(notify_socket) == "WATCHDOG=1"
    assert sdnotify.stopping()
    assert recv(notify_socket) == "STOPPING=1"


def test_reloading_carries_monotonic_usec(notify_socket):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = recv(notify_socket).split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, usec = lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
    assert len(lines) == 2


def test_newline_in_value_cannot_forge_a_field(notify_socket):
    assert sdnotify.status("failed:\nREADY=1")
    assert recv(notify_socket) == "STATUS=failed: READY=1"


def test_abstract_namespace_socket(monkeypatch):
    name = f"tsad-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready("up")
        assert recv(s) == "READY=1\nSTATUS=up"


def test_no_socket_is_a_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    assert sdnotify.notify(STATUS="x") is False


def test_dead_socket_returns_false_instead_of_raising(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert sdnotify.ready() is False


def test_watchdog_interval_from_environment(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0
    # meant for another process (we inherited the environment): not ours to ping
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "abc", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None


# ---------------------------------------------------------------- watchdog gating
class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_watchdog_tick_needs_a_fresh_heartbeat():
    clock, sent = FakeClock(), []
    wd = Watchdog(interval=10.0, send=lambda: sent.append(1) or True, clock=clock)
    assert wd.tick() is False            # nothing reported since start
    wd.alive()
    assert wd.tick() is True
    assert wd.tick() is False            # no heartbeat since that ping
    wd.progress()
    clock.t += 5
    assert wd.tick() is True
    wd.alive()
    clock.t += 10.5                      # heartbeat older than the interval: loop is stuck
    assert wd.tick() is False
    wd.alive()
    assert wd.tick() is True             # recovered
    assert len(sent) == 3


def test_watchdog_disabled_without_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    wd = Watchdog()
    assert not wd.enabled
    wd.alive()
    assert wd.tick() is False
    wd.start()                           # no thread to start
    assert wd._thread is None
    wd.stop()


def test_watchdog_thread_pings_only_while_loop_reports(notify_socket, monkeypatch):
    interval = 0.2
    monkeypatch.setenv("WATCHDOG_USEC", str(int(interval * 1e6)))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    wd = Watchdog()
    assert wd.interval == interval
    beating = threading.Event()
    beating.set()
    done = threading.Event()

    def main_loop():                     # an idle loop: queue timeouts, no data
        while not done.is_set():
            if beating.is_set():
                wd.alive()
            time.sleep(0.01)

    loop = threading.Thread(target=main_loop)
    loop.start()
    wd.start()
    try:
        for _ in range(3):               # idle but alive: pings keep coming
            assert recv(notify_socket) == "WATCHDOG=1"
        beating.clear()                  # the loop hangs
        # After the last heartbeat at most one ping can still go out; watch for far
        # longer than systemd would wait before restarting us.
        notify_socket.settimeout(interval * 10)
        late = []
        try:
            while True:
                late.append(recv(notify_socket))
        except socket.timeout:
            pass
        assert len(late) <= 1
        beating.set()                    # the loop recovers: pings resume
        notify_socket.settimeout(10)
        assert recv(notify_socket) == "WATCHDOG=1"
    finally:
        wd.stop()
        done.set()
        loop.join()


# ---------------------------------------------------------------- the unit file
def verifiable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at a binary that exists here.

    `verify` checks that ExecStart is executable; the real path only exists on an
    installed device, and everything else in the unit is checked as shipped.
    """
    text = UNIT.read_text()
    exec_line = re.search(r"^ExecStart=(\S+)", text, re.M)
    assert exec_line and exec_line.group(1) == "/opt/tsad-agent/venv/bin/tsad-agent"
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(exec_line.group(1), shutil.which("true"), 1))
    return copy


@needs_analyze
def test_unit_verifies_clean(tmp_path):
    r = subprocess.run([ANALYZE, "verify", "--man=false", str(verifiable_copy(tmp_path))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "" and r.stdout.strip() == "", \
        r.stdout + r.stderr


@needs_analyze
def test_unit_security_exposure_at_most_2():
    r = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for tsad-agent\.service: (\d+(?:\.\d+)?)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout


def test_unit_contract():
    """The directives other parts of the project rely on."""
    text = UNIT.read_text()
    for line in ("Type=notify", "NotifyAccess=main", "Restart=on-failure",
                 # `run` exits 2 on a configuration error (test_faults_state)
                 "RestartPreventExitStatus=2",
                 "StateDirectory=tsad-agent", "ConfigurationDirectory=tsad-agent",
                 "LoadCredential=mqtt-password:/etc/tsad-agent/mqtt-password",
                 "SupplementaryGroups=dialout", "DeviceAllow=char-ttyUSB rw",
                 "ExecReload=/bin/kill -HUP $MAINPID", "MemoryDenyWriteExecute=yes",
                 "ExecStart=/opt/tsad-agent/venv/bin/tsad-agent run --config "
                 "/etc/tsad-agent/config.yaml"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^WatchdogSec=\d+s$", text, re.M)


# ---------------------------------------------------------------- seccomp rules, for real
# systemd compiles MemoryDenyWriteExecute= and SystemCallFilter= into seccomp filters
# installed just before exec.  The same filters are built here and installed in a child
# (preexec_fn, so the interpreter's own start-up runs under them, as under systemd),
# which then does what the agent does: numpy, pandas, ONNX Runtime with a thread pool,
# a pseudo-terminal as serial port, TCP and AF_UNIX datagrams.
AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JSET_K, BPF_AND_K, BPF_RET_K = 0x20, 0x15, 0x45, 0x54, 0x06
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000


def _insn(code, jt, jf, k):
    return code.to_bytes(2, "little") + bytes([jt, jf]) + k.to_bytes(4, "little")


def _unit_values(key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", UNIT.read_text(), re.M)


def _syscall_numbers() -> dict[str, int]:
    header = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"#define __NR_(\w+) (\d+)", header.read_text())}


def _expand(group: str, seen: set | None = None) -> set[str]:
    seen = set() if seen is None else seen
    out = subprocess.run([ANALYZE, "syscall-filter", group], capture_output=True,
                         text=True, check=True).stdout
    names: set[str] = set()
    for raw in out.splitlines()[1:]:
        item = raw.strip()
        if not item or item.startswith("#"):
            continue
        if item.startswith("@"):
            if item not in seen:
                seen.add(item)
                names |= _expand(item, seen)
        else:
            names.add(item)
    return names


def _allowed_syscalls() -> set[str]:
    """SystemCallFilter= lines of the unit, applied in order as systemd does."""
    allowed: set[str] = set()
    for value in _unit_values("SystemCallFilter"):
        deny = value.startswith("~")
        names: set[str] = set()
        for item in value.lstrip("~").split():
            names |= _expand(item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    return allowed


def _allowlist_filter(allowed: set[str]) -> bytes:
    nrs = sorted({n for name, n in _syscall_numbers().items() if name in allowed})
    prog = [_insn(BPF_LD_W_ABS, 0, 0, 4),                       # arch
            _insn(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
            _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM),   # SystemCallArchitectures=native
            _insn(BPF_LD_W_ABS, 0, 0, 0)]                       # syscall nr (x32 numbers never match)
    for nr in nrs:
        prog += [_insn(BPF_JEQ_K, 0, 1, nr), _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)]
    prog.append(_insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM))
    return b"".join(prog)


def _mdwe_filter() -> bytes:
    """systemd's MemoryDenyWriteExecute=: no mmap(W|X), no mprotect(+X), no shmat(SHM_EXEC)."""
    nr = _syscall_numbers()
    deny = _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM)
    allow = _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)
    arg2 = _insn(BPF_LD_W_ABS, 0, 0, 16 + 8 * 2)                # low 32 bits of args[2]
    prog = [_insn(BPF_LD_W_ABS, 0, 0, 0)]
    prog += [_insn(BPF_JEQ_K, 0, 4, nr["mmap"]), arg2,
             _insn(BPF_AND_K, 0, 0, PROT_WRITE | PROT_EXEC),
             _insn(BPF_JEQ_K, 0, 1, PROT_WRITE | PROT_EXEC), deny]
    prog += [_insn(BPF_LD_W_ABS, 0, 0, 0)]
    for name, bit in (("mprotect", PROT_EXEC), ("pkey_mprotect", PROT_EXEC), ("shmat", SHM_EXEC)):
        prog += [_insn(BPF_JEQ_K, 0, 3, nr[name]), arg2, _insn(BPF_JSET_K, 0, 1, bit), deny,
                 _insn(BPF_LD_W_ABS, 0, 0, 0)]
    prog.append(allow)
    return b"".join(prog)


def _install(filters: list[bytes]):
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buffers = [ctypes.create_string_buffer(f, len(f)) for f in filters]
    progs = [Fprog(len(f) // 8, ctypes.addressof(b)) for f, b in zip(filters, buffers)]

    def preexec():
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            os._exit(97)
        for p in progs:
            if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(p), 0, 0) != 0:
                os._exit(98)
    return preexec, (buffers, progs)


AGENT_WORKLOAD = textwrap.dedent(r"""
    import ctypes, mmap, os, socket, sys, tempfile
    import numpy as np, pandas as pd, onnx, serial
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], np.eye(64, dtype=np.float32).ravel())
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]),
                           helper.make_node("Relu", ["m"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    data = np.random.default_rng(0).normal(size=(512, 64)).astype(np.float32)
    out = sess.run(None, {"x": data})[0]
    assert np.allclose(out, np.maximum(data, 0), atol=1e-5)
    assert pd.DataFrame(data).rolling(8).mean().shape == (512, 64)

    master, slave = os.openpty()
    port = serial.Serial(os.ttyname(slave), 115200, timeout=5)
    os.write(master, b"1.0;2.0\n")
    assert port.readline() == b"1.0;2.0\n"

    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
    cli = socket.create_connection(srv.getsockname()); conn, _ = srv.accept()
    cli.sendall(b"ping"); assert conn.recv(4) == b"ping"
    with tempfile.TemporaryDirectory() as d:
        u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); u.bind(d + "/s")
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", d + "/s")
        assert u.recv(16) == b"READY=1"

    # the rules are really in force
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    p = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC,
                  mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert p in (None, ctypes.c_void_p(-1).value) and ctypes.get_errno() == 1, "W|X mmap allowed"
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 5)       # @resources is filtered out
        raise AssertionError("setpriority allowed")
    except PermissionError:
        pass
    print("WORKLOAD-OK")
""")


@needs_analyze
@pytest.mark.skipif(os.uname().machine != "x86_64" or sys.platform != "linux",
                    reason="the seccomp emulation is written for x86_64 syscall numbers")
def test_runtime_works_under_the_units_seccomp_rules():
    for key in ("MemoryDenyWriteExecute", "SystemCallArchitectures"):
        assert _unit_values(key) == [{"MemoryDenyWriteExecute": "yes",
                                      "SystemCallArchitectures": "native"}[key]]
    allowed = _allowed_syscalls()
    assert "mmap" in allowed and "setpriority" not in allowed
    preexec, keep = _install([_allowlist_filter(allowed), _mdwe_filter()])
    r = subprocess.run([sys.executable, "-c", AGENT_WORKLOAD], preexec_fn=preexec,
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and "WORKLOAD-OK" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------- the watchdog and a long fit
def test_a_long_learning_fit_keeps_the_real_agent_s_watchdog_fed(tmp_path, notify_socket,
                                                                  monkeypatch):
    """One stream's learning-period fit cannot be split, and a heavy model or a day of
    samples makes it long (a 300-channel PatchTST_ad: 10 s for 30 minutes at 1 Hz).  Before,
    the main loop gave no heartbeat during it, so the pings stopped for as long as the fit
    and WatchdogSec killed the agent mid-fit.  Now each batch the fit infers is progress."""
    from agent_harness import AgentProcess, LineWriter, Pty, write_config
    from conftest import started_broker
    from onnx_factory import make_model
    interval = 1.0
    monkeypatch.setenv("WATCHDOG_USEC", str(int(interval * 1e6)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    # a time-mixing model over 1,024 samples: about 0.3 ms a window here, so the fit of
    # 40,000 learning samples takes about 10 s (over 3 s on a machine 3x faster)
    model, _ = make_model(tmp_path / "slow.onnx", window=1024, channels=["a", "b", "c"],
                          kind="timemix", threshold=1.0, name="slow")
    (tmp_path / "mq").mkdir()
    broker = started_broker(tmp_path / "mq")
    pty = Pty()
    cfg = write_config(tmp_path / "agent.yaml", model=model, port=broker.port,
                       serial_port=pty.path, state_dir=tmp_path / "state",
                       calibration={"enabled": True, "samples": 40000},
                       scoring={"threshold": "model"})
    cfg.write_text(cfg.read_text().replace(f"path: {model}", f"path: {model}\n  threads: 1"))
    pings: list[float] = []
    done = threading.Event()

    def listen():
        notify_socket.settimeout(0.2)
        while not done.is_set():
            try:
                if "WATCHDOG=1" in recv(notify_socket):
                    pings.append(time.monotonic())
            except socket.timeout:
                pass
    t = threading.Thread(target=listen)
    t.start()
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        agent.wait_log("open at", timeout=60)
        LineWriter(pty).normal(40100)
        agent.wait_log("learned its baseline on 40000 samples", timeout=240)
        learned = time.monotonic()
    finally:
        done.set()
        t.join()
        agent.kill()
        pty.close()
        broker.stop()
    took = float(re.search(r"learned its baseline on 40000 samples .* in ([0-9.e+]+) s",
                           agent.log()).group(1))
    assert took > 2 * interval, f"the fit took {took} s: too quick to show a missed ping"
    # the pings from the fit's start to its end (the log line is written at its end)
    during = [p for p in pings if learned - took - interval <= p <= learned + interval]
    assert len(during) >= took / interval, (took, pings)
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert max(gaps) < 1.6 * interval, (took, gaps)

"""The two local servers under pressure from local users: the health port (every local user) and
the control socket. Connections must not cost threads, slow peers must not hold slots, and a
failing accept loop must recover or show on /healthz."""

from __future__ import annotations

import ctypes
import errno
import json
import select
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from daemon_harness import Project, wait_for
from tokensmith import control, health
from tokensmith.config import load_settings
from tokensmith.control import ControlServer, request
from tokensmith.daemon import Daemon
from tokensmith.devserver import OAuthServer
from tokensmith.health import HealthServer

LOCAL = "local user"
CONSUMER = "consumer in the socket group"


@pytest.fixture
def server():
    with OAuthServer(access_lifetime=300) as server:
        yield server


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def ask(path, message, timeout=5.0) -> dict:
    return request(str(path), message, timeout=timeout)


class FakeDaemon:
    def __init__(self, tmp_path):
        self.settings = SimpleNamespace(control_socket=tmp_path / "run" / "control.sock", control_socket_group=None,
                                        control_operators=[], audit_log_path=tmp_path / "audit.log")
        self.keepers = {}
        self.metrics = SimpleNamespace(exposition=lambda accept, encoding: (b"", {"Content-Type": "text/plain"}))

    def statuses(self):
        return []

    def healthy(self):
        return True

    def not_ready(self):
        return []

    def not_serving(self):
        return None

    def leadership_status(self):
        return {}

    def standby_refusal(self):
        return None


@pytest.fixture
def fake(tmp_path):
    return FakeDaemon(tmp_path)


@pytest.fixture
def control_server(fake):
    server = ControlServer(fake.settings, fake)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def health_server(fake):
    server = HealthServer("127.0.0.1:0", fake)
    server.start()
    yield server
    server.stop()


@pytest.mark.security(threat=LOCAL, claim="400 connections held open to the health port start no thread in the "
                                          "daemon, and meanwhile the control socket answers status and /healthz "
                                          "answers 200.")
def test_held_health_connections_cost_no_threads_and_block_nothing(tmp_path, server):
    project = Project(tmp_path, server)
    project.add_client("billing")
    running = project.start()
    held = []
    try:
        running.wait_ready()
        port = running.health_port()
        wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200)  # scheduler up
        baseline = threads_of(running.process.pid)
        for index in range(400):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if index % 2:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
            held.append(sock)
        time.sleep(0.3)
        assert threads_of(running.process.pid) <= baseline + 2
        started = time.monotonic()
        assert ask(project.root / "run" / "control.sock", {"op": "status"})["ok"]
        response = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert (response.status_code, response.text) == (200, "ok\n")
        assert time.monotonic() - started < 4  # not stuck behind the held connections' 5 s deadline
        assert threads_of(running.process.pid) <= baseline + 2
    finally:
        for sock in held:
            sock.close()
        running.stop()


@pytest.mark.security(threat=CONSUMER, claim="When a control connection's thread cannot be started, the peer gets "
                                             "a busy reply and the accept loop keeps serving.")
def test_control_accept_loop_survives_thread_start_failures(control_server, fake, monkeypatch, caplog):
    original = threading.Thread.start
    failures = {"left": 3}

    def start(thread):
        if thread.name == "control-conn" and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("can't start new thread")
        return original(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    for _ in range(3):
        reply = ask(fake.settings.control_socket, {"op": "status"}, timeout=3)
        assert reply["ok"] is False and reply["code"] == "busy"
    assert ask(fake.settings.control_socket, {"op": "status"}, timeout=3) == {"ok": True, "clients": [],
                                                                              "daemon": True}
    assert control_server.alive
    assert len([r for r in caplog.records if "backing off" in r.getMessage()]) == 1  # logged once per streak


@pytest.mark.security(threat=CONSUMER, claim="accept() failing with EMFILE makes the control loop back off and "
                                             "continue, not end.")
def test_control_accept_loop_survives_emfile(fake, tmp_path):
    class Flaky:
        def __init__(self, sock):
            self.sock, self.failures = sock, 0

        def accept(self):
            if self.failures < 3:
                self.failures += 1
                raise OSError(errno.EMFILE, "Too many open files")
            return self.sock.accept()

    path = tmp_path / "flaky.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    server = ControlServer(fake.settings, fake)  # not started: its accept loop runs over the flaky socket only
    flaky = Flaky(listener)
    thread = threading.Thread(target=server._serve, args=(flaky,), daemon=True)
    thread.start()
    try:
        for _ in range(3):
            assert ask(path, {"op": "ping"}, timeout=3) == {"ok": True}
        assert flaky.failures == 3 and thread.is_alive()
    finally:
        server.stop()
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(3)
    assert not thread.is_alive(), "closing the socket ends the loop"


@pytest.mark.security(threat=LOCAL, claim="accept() failing with EMFILE on the health port makes its loop back "
                                          "off and continue; /healthz answers once descriptors are free again.")
def test_health_loop_survives_emfile(fake):
    class Flaky:
        def __init__(self, sock):
            self.sock, self.failures = sock, 0

        def fileno(self):
            return self.sock.fileno()

        def accept(self):
            if self.failures < 3:
                self.failures += 1
                raise OSError(errno.EMFILE, "Too many open files")
            return self.sock.accept()

    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    wake = socket.socketpair()
    server = HealthServer("127.0.0.1:0", fake)  # not started: its loop runs over the flaky listener only
    flaky = Flaky(listener)
    thread = threading.Thread(target=server._loop, args=(flaky, wake[0]), daemon=True)
    thread.start()
    try:
        response = requests.get(f"http://127.0.0.1:{listener.getsockname()[1]}/healthz", timeout=5)
        assert (response.status_code, response.text) == (200, "ok\n")
        assert flaky.failures == 3 and thread.is_alive()
    finally:
        server._stopping.set()
        wake[1].send(b"x")
        thread.join(3)
        listener.close()
        for end in wake:
            end.close()


@pytest.mark.security(threat=CONSUMER, claim="Idle control connections are served by at most MAX_CONNECTIONS "
                                             "threads; the rest get a busy reply at once, and the slots come back "
                                             "when the request deadline passes.")
def test_control_connections_are_bounded(control_server, fake, monkeypatch):
    monkeypatch.setattr(control, "REQUEST_DEADLINE", 0.5, raising=False)
    slots = getattr(control, "MAX_CONNECTIONS", 16)
    before = threading.active_count()
    held = []
    try:
        for _ in range(60):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(fake.settings.control_socket))
            held.append(sock)
        time.sleep(0.1)
        assert threading.active_count() <= before + slots
        busy = 0
        for sock in held:
            sock.settimeout(0.2)
            try:
                busy += json.loads(sock.recv(4096) or b"{}").get("code") == "busy"
            except socket.timeout:
                pass
        assert busy >= 60 - slots
        assert wait_for(lambda: ask(fake.settings.control_socket, {"op": "status"}, timeout=2).get("ok"), timeout=3)
    finally:
        for sock in held:
            sock.close()


@pytest.mark.security(threat=CONSUMER, claim="A control peer that trickles its request gets a timeout reply once "
                                             "the whole-request deadline passes, however often it sends a byte.")
def test_control_request_has_an_overall_deadline(control_server, fake, monkeypatch):
    monkeypatch.setattr(control, "REQUEST_DEADLINE", 0.5, raising=False)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(fake.settings.control_socket))
    started = time.monotonic()
    reply = b""
    try:
        sock.sendall(b'{"op": "status"')
        while time.monotonic() - started < 4:
            if select.select([sock], [], [], 0.1)[0]:
                reply = sock.recv(4096)
                break
            sock.sendall(b" ")
    finally:
        sock.close()
    assert time.monotonic() - started < 2.5
    assert json.loads(reply)["code"] == "timeout"


@pytest.mark.security(threat=LOCAL, claim="A health-port peer that trickles its request head is disconnected once "
                                          "the whole-request deadline passes.")
def test_health_request_has_an_overall_deadline(health_server, monkeypatch):
    monkeypatch.setattr(health, "REQUEST_DEADLINE", 0.5, raising=False)
    sock = socket.create_connection(health_server.address, timeout=5)
    started = time.monotonic()
    closed = False
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        while time.monotonic() - started < 4 and not closed:
            if select.select([sock], [], [], 0.1)[0]:
                closed = True
                break
            try:
                sock.sendall(b"a")
            except OSError:
                closed = True
    finally:
        sock.close()
    assert closed and time.monotonic() - started < 2.5
    assert requests.get(f"http://127.0.0.1:{health_server.address[1]}/healthz", timeout=5).status_code == 200


@pytest.mark.security(threat=LOCAL, claim="A /metrics client that resets its connection before the reply costs "
                                          "no traceback on stderr, and the endpoint keeps answering.")
def test_a_reset_metrics_connection_prints_no_traceback(health_server, fake, capfd):
    def slow_big(accept, encoding):
        time.sleep(0.2)
        return b"x" * (4 << 20), {"Content-Type": "text/plain"}

    fake.metrics.exposition = slow_big
    for _ in range(2):
        sock = socket.create_connection(health_server.address, timeout=5)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # a reset, while the reply is being made
    time.sleep(0.6)
    fake.metrics.exposition = lambda accept, encoding: (b"ok", {"Content-Type": "text/plain"})
    assert requests.get(f"http://127.0.0.1:{health_server.address[1]}/metrics", timeout=5).status_code == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err, err


def kill_thread(thread: threading.Thread) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit))


@pytest.mark.security(threat=CONSUMER, claim="If the control socket's accept thread dies, /healthz turns 503.")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread is killed on purpose
def test_a_dead_control_thread_fails_healthz(tmp_path, server):
    project = Project(tmp_path, server)
    project.add_client("billing")
    daemon = Daemon(load_settings(project.write()), project.config)
    daemon.build()
    daemon.start()
    try:
        wait_for(lambda: daemon.health is not None and project.token("billing"), timeout=10)
        url = f"http://127.0.0.1:{daemon.health.address[1]}/healthz"
        assert requests.get(url, timeout=5).status_code == 200
        kill_thread(daemon.control.thread)
        try:
            ask(daemon.settings.control_socket, {"op": "ping"}, timeout=2)  # wakes accept() so the exception lands
        except control.Unreachable:
            pass
        wait_for(lambda: not daemon.control.thread.is_alive(), timeout=5)
        response = requests.get(url, timeout=5)
        assert (response.status_code, response.text) == (503, "unhealthy\n")
    finally:
        daemon.stop()

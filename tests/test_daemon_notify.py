"""`tokensmith run` speaks the systemd notify protocol to a real datagram socket: READY=1 after the
first tokens (or after ready_timeout, saying who is missing), WATCHDOG=1 while healthy,
RELOADING=1/READY=1 around SIGHUP, STOPPING=1 on SIGTERM."""

import signal
import socket
import time

import pytest

from daemon_harness import Project, wait_for
from tokensmith.devserver import OAuthServer


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.05)
    messages = []

    def drain():
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except socket.timeout:
                return messages

    yield str(path), drain
    sock.close()


def test_ready_watchdog_reload_and_stop(tmp_path, notify_socket):
    path, drain = notify_socket
    with OAuthServer(access_lifetime=60) as server:
        project = Project(tmp_path, server)
        project.add_client("a")
        project.add_client("b")
        daemon = project.start(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        try:
            ready = wait_for(lambda: [m for m in drain() if "READY=1" in m], timeout=15)
            assert project.token("a") and project.token("b"), "READY=1 came before the first tokens were written"
            assert "STATUS=2 clients have fresh tokens" in ready[0]
            wait_for(lambda: sum("WATCHDOG=1" in m for m in drain()) >= 3, timeout=5)
            project.write()
            daemon.signal(signal.SIGHUP)
            wait_for(lambda: any("RELOADING=1" in m for m in drain()), timeout=5)
            reloading = next(m for m in drain() if "RELOADING=1" in m)
            assert "MONOTONIC_USEC=" in reloading
            wait_for(lambda: sum("READY=1" in m for m in drain()) >= 2, timeout=5)
        finally:
            assert daemon.stop() == 0
        assert any("STOPPING=1" in m for m in drain())


def test_ready_after_timeout_names_the_missing_clients(tmp_path, notify_socket):
    path, drain = notify_socket
    with OAuthServer(access_lifetime=60) as server:
        project = Project(tmp_path, server, scheduler={"ready_timeout": 1})
        project.add_client("good")
        project.add_client("broken")
        server.set_client_secret("broken", "not-what-the-file-says")
        daemon = project.start(env={"NOTIFY_SOCKET": path})
        try:
            started = time.monotonic()
            ready = wait_for(lambda: [m for m in drain() if "READY=1" in m], timeout=15)
            assert time.monotonic() - started >= 0.5
            assert "STATUS=1/2 clients have tokens; missing: broken" in ready[0]
        finally:
            daemon.stop()

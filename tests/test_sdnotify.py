"""Tests for tokensmith.sdnotify against real AF_UNIX datagram sockets."""

from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from tokensmith.sdnotify import Notifier


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    """A bound notify socket; yields (NOTIFY_SOCKET value, socket)."""
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        assert len(path) < 100, "tmp_path too long for sun_path"
        env_value, address = path, path
    else:
        name = f"tokensmith-test-{os.getpid()}-{uuid.uuid4().hex}"
        env_value, address = "@" + name, "\0" + name
    sock = _bind(address)
    try:
        yield env_value, sock
    finally:
        sock.close()


def _recv(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def _assert_nothing_pending(sock: socket.socket) -> None:
    sock.settimeout(0)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_ready(listener):
    env_value, sock = listener
    n = Notifier({"NOTIFY_SOCKET": env_value})
    assert n.enabled is True
    assert n.ready() is True
    assert _recv(sock) == b"READY=1"
    _assert_nothing_pending(sock)


def test_ready_with_status(listener):
    env_value, sock = listener
    n = Notifier({"NOTIFY_SOCKET": env_value})
    assert n.ready(status="3 clients, all tokens fresh")
    assert _recv(sock) == b"READY=1\nSTATUS=3 clients, all tokens fresh"


def test_status_watchdog_stopping(listener):
    env_value, sock = listener
    n = Notifier({"NOTIFY_SOCKET": env_value})
    assert n.status("refreshing billing-api")
    assert n.watchdog()
    assert n.stopping()
    assert _recv(sock) == b"STATUS=refreshing billing-api"
    assert _recv(sock) == b"WATCHDOG=1"
    assert _recv(sock) == b"STOPPING=1"


def test_status_newlines_are_folded(listener):
    env_value, sock = listener
    n = Notifier({"NOTIFY_SOCKET": env_value})
    assert n.status("line one\nREADY=1\r\nline three")
    assert _recv(sock) == b"STATUS=line one READY=1 line three"


def test_status_utf8(listener):
    env_value, sock = listener
    n = Notifier({"NOTIFY_SOCKET": env_value})
    assert n.status("tokens \u2713")
    assert _recv(sock) == "STATUS=tokens \u2713".encode("utf-8")


def test_reloading_sends_monotonic_usec(listener):
    env_value, sock = listener
    n = Notifier({"NOTIFY_SOCKET": env_value})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = _recv(sock).decode().split("\n")
    assert len(lines) == 2
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_send_raw_lines(listener):
    env_value, sock = listener
    n = Notifier({"NOTIFY_SOCKET": env_value})
    assert n.send("STATUS=x", "ERRNO=5", "EXTEND_TIMEOUT_USEC=1000000")
    assert _recv(sock) == b"STATUS=x\nERRNO=5\nEXTEND_TIMEOUT_USEC=1000000"


def test_send_nothing_sends_nothing(listener):
    env_value, sock = listener
    n = Notifier({"NOTIFY_SOCKET": env_value})
    assert n.send() is False
    _assert_nothing_pending(sock)


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"NOTIFY_SOCKET": ""},
        {"NOTIFY_SOCKET": "@"},
        {"NOTIFY_SOCKET": "relative/notify.sock"},
        {"NOTIFY_SOCKET": "vsock:2:1234"},
    ],
)
def test_disabled_without_usable_socket(environ):
    n = Notifier(environ)
    assert n.enabled is False
    assert n.send("READY=1") is False
    assert n.ready() is False
    assert n.ready(status="x") is False
    assert n.reloading() is False
    assert n.stopping() is False
    assert n.status("x") is False
    assert n.watchdog() is False


def test_send_failure_returns_false_and_never_raises(tmp_path):
    # Nobody listens at this path: sendto fails with ENOENT.
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
    assert n.enabled is True
    assert n.send("READY=1") is False
    assert n.ready() is False
    # Not a socket at all: ECONNREFUSED.
    regular = tmp_path / "regular-file"
    regular.write_text("")
    assert Notifier({"NOTIFY_SOCKET": str(regular)}).watchdog() is False
    # Path longer than sun_path allows: the socket module raises, send doesn't.
    long_path = "/" + "x" * 200
    assert Notifier({"NOTIFY_SOCKET": long_path}).status("x") is False


def test_send_to_stream_socket_fails_cleanly(tmp_path):
    # systemd's socket is a datagram socket; a stream socket at that path
    # (misconfiguration) must produce False, not an exception.
    path = str(tmp_path / "stream.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    try:
        assert Notifier({"NOTIFY_SOCKET": path}).ready() is False
    finally:
        srv.close()


def test_defaults_to_os_environ(listener, monkeypatch):
    env_value, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", env_value)
    # The default argument is os.environ itself, read at construction time.
    n = Notifier()
    assert n.enabled
    assert n.watchdog()
    assert _recv(sock) == b"WATCHDOG=1"


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "SELF"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": ""}, 0.25),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "OTHER"}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "garbage"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_PID": "SELF"}, None),
    ],
)
def test_watchdog_interval(environ, expected):
    pids = {"SELF": str(os.getpid()), "OTHER": str(os.getpid() + 1)}
    environ = {k: pids.get(v, v) for k, v in environ.items()}
    assert Notifier(environ).watchdog_interval() == expected


def test_watchdog_interval_independent_of_notify_socket(listener):
    env_value, _ = listener
    env = {"NOTIFY_SOCKET": env_value, "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(env).watchdog_interval() == 10.0

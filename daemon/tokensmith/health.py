"""The health endpoint: GET or HEAD /healthz (liveness), /readyz (serving: the daemon runs and its
scheduler is alive; /readyz?strict=1: every client has a valid token in all its sinks, for a
sidecar's startup probe) and /metrics (Prometheus exposition), on a small stdlib HTTP server in a
daemon thread.

Bodies carry only "ok", "ready", client names and metric text: never a token or a secret.

Every local user can reach this port, so one thread serves it with a selector and never starts
another: an open connection costs a file descriptor, not a thread. At most MAX_CONNECTIONS are
open (a new one closes the oldest), the request head must arrive within REQUEST_DEADLINE and the
reply must be taken within REPLY_DEADLINE; one request per connection. Requests are parsed by the
stdlib's BaseHTTPRequestHandler, run over the buffered bytes.
"""

from __future__ import annotations

import errno
import io
import logging
import selectors
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("tokensmith.health")

MAX_NAMES = 100  # /readyz lists at most this many clients, then "... (N more)"
MAX_CONNECTIONS = 64
MAX_HEAD = 16 * 1024
REQUEST_DEADLINE = 5.0
REPLY_DEADLINE = 10.0


def parse_listen(listen: str) -> tuple[str, int]:
    """"host:port", "[v6]:port" or ":port" (all interfaces) -> (host, port)."""
    host, sep, port = str(listen).strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"health.listen {listen!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"health.listen {listen!r}: write an IPv6 address in brackets, as [::1]:9464")
    return host, int(port)


class _Handler(BaseHTTPRequestHandler):
    server_version = "tokensmith"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def __init__(self, head: bytes, daemon):  # one request, from bytes to bytes: no socket here
        self.rfile = io.BytesIO(head)
        self.wfile = io.BytesIO()
        self.daemon = daemon
        self.client_address = ("", 0)
        self.command = None
        self.close_connection = True
        self.handle_one_request()

    def do_GET(self):
        url = urlsplit(self.path)
        path = url.path
        daemon = self.daemon
        if path == "/healthz":
            try:
                healthy = bool(daemon.healthy())
            except Exception:
                log.exception("health check raised")
                healthy = False
            self._send(200 if healthy else 503, b"ok\n" if healthy else b"unhealthy\n")
        elif path == "/readyz" and parse_qs(url.query).get("strict", ["0"])[-1] in ("0", "false", ""):
            try:
                problem = daemon.not_serving()
            except Exception:
                log.exception("readiness check raised")
                problem = "readiness check failed"
            self._send(503 if problem else 200, f"not ready: {problem}\n".encode() if problem else b"ready\n")
        elif path == "/readyz":
            try:
                waiting = [str(name) for name in daemon.not_ready()]
            except Exception:
                log.exception("readiness check raised")
                self._send(503, b"not ready: readiness check failed\n")
                return
            if not waiting:
                self._send(200, b"ready\n")
                return
            names = ", ".join(waiting[:MAX_NAMES])
            if len(waiting) > MAX_NAMES:
                names += f", ... ({len(waiting) - MAX_NAMES} more)"
            self._send(503, f"not ready: {names}\n".encode())
        elif path == "/metrics":
            try:
                body, headers = daemon.metrics.exposition(self.headers.get("Accept"),
                                                          self.headers.get("Accept-Encoding"))
            except Exception:
                log.exception("rendering metrics failed")
                self._send(500, b"metrics unavailable\n")
                return
            self._send(200, body, headers.pop("Content-Type"), extra=headers)
        else:
            self._send(404, b"not found\n")

    do_HEAD = do_GET  # _send leaves the body out

    def _not_allowed(self):
        # any request body is left unread, so the connection cannot be reused
        self.close_connection = True
        self._send(405, b"method not allowed\n", extra={"Allow": "GET, HEAD", "Connection": "close"})

    def __getattr__(self, name):
        # BaseHTTPRequestHandler looks up do_<METHOD>: every method but GET and HEAD gets a 405 (not 501)
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", extra=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if not (extra and "Connection" in extra):
            self.send_header("Connection", "close")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass  # no per-request access log on stderr


def respond(head: bytes, daemon) -> bytes:
    try:
        return _Handler(head, daemon).wfile.getvalue()
    except Exception:
        log.exception("health request failed")
        return _canned(500, "internal error")


def _canned(status: int, reason: str) -> bytes:
    body = f"{reason}\n".encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class _Conn:
    __slots__ = ("sock", "deadline", "head", "reply", "sent")

    def __init__(self, sock: socket.socket, now: float):
        self.sock = sock
        self.deadline = now + REQUEST_DEADLINE
        self.head = bytearray()
        self.reply: bytes | None = None
        self.sent = 0


def _complete(head: bytearray) -> bool:
    return b"\r\n\r\n" in head or b"\n\n" in head


class HealthServer:
    def __init__(self, listen: str, daemon):
        self.listen = listen
        self.daemon = daemon
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._conns: dict[socket.socket, _Conn] = {}  # oldest first
        self._paused_until = 0.0
        self._failures = 0

    def start(self) -> None:
        host, port = parse_listen(self.listen)
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                try:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "[::]" takes IPv4 too
                except OSError:
                    pass
            sock.bind(sockaddr)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._stopping.clear()
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._loop, args=(sock, self._wake[0]), name="tokensmith-health",
                                        daemon=True)
        self._thread.start()
        host, port = self.address
        log.info("health endpoint listening on %s", f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                 extra={"event": "health_listening"})

    @property
    def address(self) -> tuple[str, int]:
        if self._sock is None:
            raise RuntimeError("health server is not started")
        host, port = self._sock.getsockname()[:2]
        return host, port

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._stopping.set()
        try:
            self._wake[1].send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        sock.close()
        for end in self._wake:
            end.close()

    # ---- the loop

    def _loop(self, listener: socket.socket, wake: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, "listen")
        selector.register(wake, selectors.EVENT_READ, "wake")
        self._paused_until = 0.0  # accept() failed (EMFILE...): leave the listener alone for a moment
        self._failures = 0
        broken = False
        try:
            while not self._stopping.is_set():
                try:
                    self._turn(listener, selector)
                    broken = False
                except Exception:  # a bug here must not end the endpoint
                    if not broken:
                        log.exception("health endpoint loop failed; continuing")
                    broken = True
                    self._stopping.wait(0.1)
        finally:
            for conn in list(self._conns.values()):
                self._close(conn, selector)
            selector.close()

    def _turn(self, listener: socket.socket, selector) -> None:
        now = time.monotonic()
        if self._paused_until and now >= self._paused_until:
            selector.register(listener, selectors.EVENT_READ, "listen")
            self._paused_until = 0.0
        timeout = min([conn.deadline for conn in self._conns.values()] + [now + 1.0]) - now
        try:
            events = selector.select(max(timeout, 0.0))
        except InterruptedError:
            return
        for key, _ in events:
            if key.data == "listen":
                try:
                    self._accept(listener, selector)
                    if self._failures:
                        log.info("health endpoint accepts connections again", extra={"event": "health_recovered"})
                    self._failures = 0
                except OSError as exc:
                    if not self._failures:
                        log.warning("health endpoint: accept failed: %s; backing off", exc.strerror or exc,
                                    extra={"event": "health_accept_failed"})
                    self._failures += 1
                    selector.unregister(listener)
                    self._paused_until = time.monotonic() + min(1.0, 0.05 * 2 ** min(self._failures, 5))
            elif key.data != "wake":
                self._service(key.data, selector)
        now = time.monotonic()
        for conn in [conn for conn in self._conns.values() if conn.deadline <= now]:
            self._close(conn, selector)

    def _accept(self, listener: socket.socket, selector) -> None:
        for _ in range(MAX_CONNECTIONS):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            if len(self._conns) >= MAX_CONNECTIONS:
                self._close(next(iter(self._conns.values())), selector)
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic())
            self._conns[sock] = conn
            selector.register(sock, selectors.EVENT_READ, conn)
            self._service(conn, selector)  # the request is often there already

    def _service(self, conn: _Conn, selector) -> None:
        try:
            if conn.reply is None:
                self._read(conn, selector)
            if conn.reply is not None:
                self._write(conn, selector)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:  # a peer that resets or vanishes: its business, not an error here
            log.debug("health connection dropped: %s", exc)
            self._close(conn, selector)
        except Exception:
            log.exception("health connection failed")
            self._close(conn, selector)

    def _read(self, conn: _Conn, selector) -> None:
        data = conn.sock.recv(MAX_HEAD)
        if not data:
            self._close(conn, selector)
            return
        conn.head += data
        if _complete(conn.head):
            reply = respond(bytes(conn.head), self.daemon)
        elif len(conn.head) > MAX_HEAD:
            reply = _canned(431, "Request Header Fields Too Large")
        else:
            return
        conn.reply, conn.head = reply, bytearray()
        conn.deadline = time.monotonic() + REPLY_DEADLINE
        selector.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def _write(self, conn: _Conn, selector) -> None:
        while conn.sent < len(conn.reply):
            conn.sent += conn.sock.send(memoryview(conn.reply)[conn.sent:conn.sent + 256 * 1024])
        try:
            while conn.sock.recv(65536):  # unread bytes would turn the close into a reset
                pass
        except OSError:
            pass
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._close(conn, selector)

    def _close(self, conn: _Conn, selector) -> None:
        if self._conns.pop(conn.sock, None) is None:
            return
        try:
            selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()



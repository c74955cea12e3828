"""The health endpoint: GET or HEAD /healthz (liveness), /readyz (serving: the daemon runs and its
scheduler is alive; /readyz?strict=1: every client has a valid token in all its sinks, for a
sidecar's startup probe) and /metrics (Prometheus exposition), on a small stdlib HTTP server in a
daemon thread.

Bodies carry only "ok", "ready", client names and metric text: never a token or a secret.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("tokensmith.health")

MAX_NAMES = 100  # /readyz lists at most this many clients, then "... (N more)"


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, handler, family, daemon):
        self.address_family = family
        self.daemon = daemon
        super().__init__(address, handler)

    def server_bind(self):
        # HTTPServer.server_bind would call socket.getfqdn(), a reverse DNS lookup that can stall start-up
        if self.address_family == socket.AF_INET6:
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "[::]" takes IPv4 too
            except OSError:
                pass
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _Handler(BaseHTTPRequestHandler):
    server_version = "tokensmith"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 10  # a stalled client cannot hold a thread for long

    def do_GET(self):
        url = urlsplit(self.path)
        path = url.path
        daemon = self.server.daemon
        if path == "/healthz":
            try:
                healthy = bool(daemon.healthy())
            except Exception:
                log.exception("health check raised")
                healthy = False
            self._send(200 if healthy else 503, b"ok\n" if healthy else b"unhealthy\n")
        elif path == "/readyz" and parse_qs(url.query).get("strict", ["0"])[-1] in ("0", "false", ""):
            try:
                serving = bool(daemon.serving())
            except Exception:
                log.exception("readiness check raised")
                serving = False
            self._send(200 if serving else 503, b"ready\n" if serving else b"not ready: not serving\n")
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
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass  # no per-request access log on stderr


class HealthServer:
    def __init__(self, listen: str, daemon):
        self.listen = listen
        self.daemon = daemon
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        host, port = parse_listen(self.listen)
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        self._server = _Server(sockaddr, _Handler, family, self.daemon)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="tokensmith-health", daemon=True)
        self._thread.start()
        host, port = self.address
        log.info("health endpoint listening on %s", f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                 extra={"event": "health_listening"})

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("health server is not started")
        host, port = self._server.server_address[:2]
        return host, port

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

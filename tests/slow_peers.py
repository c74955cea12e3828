"""Hostile HTTP peers on loopback for the deadline tests: each connection has its request read, then
gets one of the behaviours below, which keep a client that times out only each recv busy for ever."""

from __future__ import annotations

import socket
import threading


def response(body: bytes, content_type: str = "application/json") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


class SlowPeer:
    """A loopback TCP server (TLS when given a server context) that answers every request with `act`.
    `act(send, stop)` sends through `send` and paces itself with `stop.wait(...)`, which returns True when
    the peer is closed."""

    def __init__(self, act, tls=None):
        self.act = act
        self.tls = tls
        self.stop = threading.Event()
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
                self._conns.append(conn)
            while not self.stop.is_set():  # keep-alive: one request after another
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(65536)
                    if not data:
                        return
                    head += data
                self.act(conn.sendall, self.stop)
        except OSError:
            pass  # the client gave up and closed: what the tests want

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass

    def __enter__(self) -> "SlowPeer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def drip(payload: bytes, interval: float = 0.3):
    """A valid response, one byte every interval: each recv gets something, the whole takes minutes."""
    def act(send, stop):
        for i in range(len(payload)):
            send(payload[i:i + 1])
            if stop.wait(interval):
                return
    return act


def interim(interval: float = 0.2, status: bytes = b"102 Processing"):
    """Interim 1xx responses and never a final one (interval 0: as fast as the client reads)."""
    def act(send, stop):
        while not stop.is_set():
            send(b"HTTP/1.1 " + status + b"\r\n\r\n")
            if interval:
                stop.wait(interval)
    return act


def trailers(body: bytes, interval: float = 0.2):
    """A chunked response whose trailer section never ends (interval 0: as fast as the client reads)."""
    def act(send, stop):
        send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
             + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n")
        while not stop.is_set():
            send(b"X-Trailer: more\r\n")
            if interval:
                stop.wait(interval)
    return act

"""A pooled keep-alive connection that the peer drops just as it is reused (the idle-close race):
an idempotent GET is sent once more on a new connection; a POST is not, since the peer may have
acted on it."""

from __future__ import annotations

import http.client
import socket
import threading

import pytest

from tokensmith.transport import HttpPool

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class DropsSecondRequest:
    """Answers the first request on each connection and drops the connection on its second one."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.requests = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            served = 0
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                self.requests += 1
                if served:
                    return  # the idle-close race, made certain: the request arrived, no answer comes
                conn.sendall(OK)
                served += 1

    def close(self):
        self.sock.close()


@pytest.fixture
def server():
    peer = DropsSecondRequest()
    yield peer
    peer.close()


def test_a_get_on_a_dropped_keep_alive_connection_is_sent_once_more_on_a_new_one(server):
    pool = HttpPool()
    url = f"http://127.0.0.1:{server.port}/resource"
    for _ in range(2):
        reply, body = pool.get(url, {}, timeout=5, ca_bundle=None, max_body=1024)
        assert reply.status_code == 200 and body == b"ok"
    assert server.connections == 2 and server.requests == 3


def test_a_post_on_a_dropped_keep_alive_connection_is_not_sent_again(server):
    pool = HttpPool()
    url = f"http://127.0.0.1:{server.port}/token"
    reply, _ = pool.post(url, b"a=1", {"Content-Type": "application/x-www-form-urlencoded"}, timeout=5,
                         ca_bundle=None, max_body=1024)
    assert reply.status_code == 200
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        pool.post(url, b"a=2", {"Content-Type": "application/x-www-form-urlencoded"}, timeout=5, ca_bundle=None,
                  max_body=1024)
    assert server.connections == 1 and server.requests == 2

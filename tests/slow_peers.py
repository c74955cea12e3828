"""Hostile HTTP peers on loopback for the deadline tests: each connection has its request read, then
gets one of the behaviours below, which keep a client that times out only each recv busy for ever."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
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


def tls_pair(tmp_path):
    """A self-signed certificate for 127.0.0.1 (the client's CA bundle) and a server context using it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "slow-peer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "peer.crt", tmp_path / "peer.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return cert_path, context

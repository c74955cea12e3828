"""The HTTP transport for the token, revocation and introspection endpoints and the --verify-url check.

Lean on purpose (it is on every refresh's path): keep-alive HTTP/1.1 connections, the request sent in
one buffer, the response read straight off the socket. Every exchange has one absolute deadline,
`timeout` seconds after it starts, covering connect, TLS handshake, send and the whole response: a peer
that drips bytes, streams interim responses or endless trailers fails with TimeoutError at the deadline
instead of holding a worker.
"""

from __future__ import annotations

import http.client
import re
import select
import socket
import threading
import time
from urllib.parse import urlsplit

from tokensmith import resolver
from tokensmith.proxy import Proxy, ProxyError

INVALID_TARGET = re.compile(r"[^\x21-\x7e]")
MAX_INTERIM = 10  # interim 1xx responses skipped before a final one; more is a hostile or broken peer


class Reply:
    """What an endpoint answered: the status and the headers (case-insensitive .get)."""

    __slots__ = ("status_code", "headers")

    def __init__(self, status_code: int, headers):
        self.status_code = status_code
        self.headers = headers


class TLSSetupError(OSError):
    """The CA bundle could not be loaded."""


class BodyError(Exception):
    """The connection failed while the response body was being read (.status is the response's)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Headers:
    """Response header fields, looked up case-insensitively; a repeated field answers its first value, as
    email.message.Message.get does."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, str]):
        self._fields = fields

    def get(self, name: str, default=None):
        return self._fields.get(name.lower(), default)


def remaining(deadline: float) -> float:
    """Seconds left before the deadline; TimeoutError when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


class Wire:
    """One HTTP/1.x response read straight off the socket: http.client's semantics and limits (line length,
    header lines) without the file object, HTTPResponse and email.message.Message it builds for every
    response, which were ~13% of the daemon's CPU under load. Unlike http.client it skips every interim
    1xx response, not only 100 Continue (RFC 9110 §15.2), up to MAX_INTERIM of them. Every read waits
    only for what is left before the deadline."""

    __slots__ = ("buf", "pos", "sock", "deadline")

    def __init__(self, sock, deadline: float):
        self.sock = sock
        self.deadline = deadline
        self.buf = b""
        self.pos = 0

    def _fill(self) -> bool:
        self.sock.settimeout(remaining(self.deadline))
        data = self.sock.recv(65536)
        self.buf = self.buf[self.pos:] + data
        self.pos = 0
        return bool(data)

    def _line(self, what: str) -> bytes:
        """The next line with its ending; what is left (maybe b"") at the end of the stream."""
        while True:
            end = self.buf.find(b"\n", self.pos)
            if end >= 0:
                if end - self.pos >= http.client._MAXLINE:
                    raise http.client.LineTooLong(what)
                line = self.buf[self.pos:end + 1]
                self.pos = end + 1
                return line
            if len(self.buf) - self.pos > http.client._MAXLINE:
                raise http.client.LineTooLong(what)
            if not self._fill():
                line = self.buf[self.pos:]
                self.pos = len(self.buf)
                return line

    def _take(self, n: int) -> bytes:
        """The next n bytes, or fewer at the end of the stream."""
        while len(self.buf) - self.pos < n and self._fill():
            pass
        data = self.buf[self.pos:self.pos + n]
        self.pos += len(data)
        return data

    def _fields(self) -> dict[str, str]:
        fields: dict[str, str] = {}
        last = None
        for _ in range(http.client._MAXHEADERS):
            line = self._line("header line")
            if line in (b"\r\n", b"\n", b""):
                return fields
            text = line.decode("iso-8859-1")
            if text[0] in " \t":  # obsolete line folding (RFC 9112 §5.2): one field value on two lines
                if last is not None:
                    fields[last] += " " + text.strip(" \t\r\n")
                continue
            name, colon, value = text.partition(":")
            name = name.lower()
            last = None
            if colon and name not in fields:
                fields[name] = value.strip(" \t\r\n")
                last = name
        raise http.client.HTTPException(f"got more than {http.client._MAXHEADERS} headers")

    def head(self) -> tuple[int, dict[str, str], bool]:
        """The status, the header fields, and whether the server keeps the connection open afterwards."""
        for _ in range(MAX_INTERIM + 1):
            line = self._line("status line")
            if not line:
                raise http.client.RemoteDisconnected("Remote end closed connection without response")
            text = line.decode("iso-8859-1")
            words = text.split(None, 2)
            if len(words) < 2 or not words[0].startswith("HTTP/"):
                raise http.client.BadStatusLine(text)
            try:
                status = int(words[1])
            except ValueError:
                raise http.client.BadStatusLine(text) from None
            if not 100 <= status <= 999:
                raise http.client.BadStatusLine(text)
            fields = self._fields()
            if not 100 <= status < 200:
                break
        else:
            raise http.client.HTTPException(f"got more than {MAX_INTERIM} interim responses")
        version = words[0]
        connection = fields.get("connection", "").lower()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            keep_alive = bool(fields.get("keep-alive")) or "keep-alive" in connection \
                or "keep-alive" in fields.get("proxy-connection", "").lower()
        elif version.startswith("HTTP/1."):
            keep_alive = "close" not in connection
        else:
            raise http.client.UnknownProtocol(version)
        return status, fields, keep_alive

    def body(self, status: int, fields: dict[str, str], keep_alive: bool, limit: int) -> tuple[bytes, bool]:
        """The body, cut at limit + 1 bytes, and whether the connection can carry another request."""
        encoding = fields.get("transfer-encoding")
        if encoding and encoding.lower() == "chunked":
            data, complete = self._chunks(limit)
        else:
            length = None
            if status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED):
                length = 0
            elif fields.get("content-length"):
                try:
                    length = int(fields["content-length"])
                except ValueError:
                    pass
            if length is None or length < 0:
                return self._take(limit + 1), False  # delimited by the server closing the connection
            wanted = min(length, limit + 1)
            data = self._take(wanted)
            if len(data) < wanted:
                raise http.client.IncompleteRead(data, wanted - len(data))
            complete = length <= limit
        # bytes beyond the response would be read as the answer to the next request
        return data, complete and keep_alive and self.pos == len(self.buf)

    def _chunks(self, limit: int) -> tuple[bytes, bool]:
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                chunk_size = int(self._line("chunk size").split(b";", 1)[0], 16)
            except ValueError:
                chunk_size = -1
            if chunk_size < 0:
                raise http.client.IncompleteRead(b"".join(parts))
            if chunk_size == 0:
                break
            chunk = self._take(min(chunk_size, limit + 1 - size))
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                return b"".join(parts), False
            if len(chunk) < chunk_size or len(self._take(2)) < 2:
                raise http.client.IncompleteRead(b"".join(parts))
        for _ in range(http.client._MAXHEADERS):
            if self._line("trailer line") in (b"\r\n", b"\n", b""):
                return b"".join(parts), True
        raise http.client.HTTPException(f"got more than {http.client._MAXHEADERS} trailer lines")


def request_bytes(method: str, host: str, port: int, default_port: int, target: str, headers: dict,
                  body: bytes | None) -> bytes:
    """The bytes HTTPConnection(host, port).request(method, target, body, headers) sends, as one buffer:
    request line, the Host header it derives, Content-Length (when there is a body), then the caller's
    headers (which hold neither)."""
    if INVALID_TARGET.search(target):
        raise http.client.InvalidURL(f"request target can't hold controls, spaces or non-ASCII: {target!r}")
    try:
        host = host.encode("ascii").decode()
    except UnicodeEncodeError:
        host = host.encode("idna").decode()
    if ":" in host:
        host = f"[{host.partition('%')[0]}]"  # an IPv6 zone is local to this host
    if port != default_port:
        host = f"{host}:{port}"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    for name, value in headers.items():
        line = f"{name}: {value}"
        if "\r" in line or "\n" in line:
            raise ValueError(f"invalid header {name!r}")
        lines.append(line)
    lines.append("\r\n")
    return "\r\n".join(lines).encode("iso-8859-1") + (body or b"")


def post_bytes(host: str, port: int, default_port: int, target: str, headers: dict, body: bytes) -> bytes:
    return request_bytes("POST", host, port, default_port, target, headers, body)


class HttpPool:
    """Keep-alive HTTP/1.1 connections to the endpoints: the request goes out in one send and Wire reads
    the response (requests cost ~1 ms of CPU per call and ~0.1 s of start-up imports). Like the requests
    session it replaced: no redirects followed, no retries (the keeper is
    the one layer that retries), TLS always verified against the system store or the client's ca_bundle.
    An idle connection the server has closed is noticed before reuse and replaced."""

    def __init__(self, pool_size: int = 8):
        self.pool_size = pool_size
        self._idle: dict[tuple, list[socket.socket]] = {}
        self._contexts: dict[str | None, object] = {}
        self._lock = threading.Lock()

    def _context(self, ca_bundle: str | None):
        with self._lock:
            context = self._contexts.get(ca_bundle)
        if context is None:
            import ssl

            try:
                context = ssl.create_default_context(cafile=ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise TLSSetupError(f"cannot load CA bundle {ca_bundle}: {getattr(exc, 'strerror', None) or exc}") \
                    from exc
            with self._lock:
                self._contexts[ca_bundle] = context
        return context

    @staticmethod
    def _dropped(sock: socket.socket) -> bool:
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)  # an idle keep-alive connection has nothing to read unless it was closed

    def _checkout(self, key: tuple) -> socket.socket | None:
        with self._lock:
            idle = self._idle.get(key)
            while idle:
                sock = idle.pop()
                if not self._dropped(sock):
                    return sock
                sock.close()
        return None

    def _checkin(self, key: tuple, sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.pool_size:
                idle.append(sock)
                return
        sock.close()

    def _connect(self, host: str, port: int, context, deadline: float, proxy: Proxy | None = None) -> socket.socket:
        """socket.create_connection, but every address tried and the TLS handshake share the deadline. Through
        a proxy: a TCP connection to the proxy, then for TLS a CONNECT tunnel and the handshake with the
        endpoint inside it (SNI and the certificate check name the endpoint, not the proxy)."""
        if proxy is not None:
            try:
                sock = self._tcp(proxy.host, proxy.port, deadline)
            except TimeoutError:
                raise
            except OSError as exc:
                raise ProxyError(f"cannot reach proxy {proxy.label} ({getattr(exc, 'strerror', None) or type(exc).__name__})") \
                    from exc
            if context is None:
                return sock
            try:
                self._tunnel(sock, host, port, proxy, deadline)
                sock.settimeout(remaining(deadline))
                return context.wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
        sock = self._tcp(host, port, deadline)
        if context is not None:
            try:
                sock.settimeout(remaining(deadline))
                sock = context.wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
        return sock

    @staticmethod
    def _tunnel(sock: socket.socket, host: str, port: int, proxy: Proxy, deadline: float) -> None:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")
        sock.settimeout(remaining(deadline))
        try:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
            wire = Wire(sock, deadline)
            status, _, _ = wire.head()
        except TimeoutError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            raise ProxyError(f"proxy {proxy.label} failed during CONNECT ({type(exc).__name__})") from exc
        if status != 200:
            raise ProxyError(f"proxy {proxy.label} refused CONNECT with status {status}", status=status)
        if wire.pos != len(wire.buf):
            raise ProxyError(f"proxy {proxy.label} sent data after its CONNECT answer")

    @staticmethod
    def _tcp(host: str, port: int, deadline: float) -> socket.socket:
        error: OSError | None = None
        for family, kind, proto, _, address in resolver.getaddrinfo(host, port, deadline):
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(remaining(deadline))
                sock.connect(address)
            except OSError as exc:
                sock.close()
                error = exc
                if isinstance(exc, TimeoutError):
                    break
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except BaseException:
                sock.close()
                raise
            return sock
        raise error or OSError(f"getaddrinfo returned no address for {host}")

    def post(self, url: str, body: bytes | None, headers: dict, *, timeout: float, ca_bundle: str | None,
             max_body: int, proxy: Proxy | None = None, ssl_context=None) -> tuple[Reply, bytes]:
        """One POST; headers must not hold Host or Content-Length. See exchange."""
        return self.exchange("POST", url, body or b"", headers, timeout=timeout, ca_bundle=ca_bundle,
                             max_body=max_body, proxy=proxy, ssl_context=ssl_context)

    def get(self, url: str, headers: dict, *, timeout: float, ca_bundle: str | None,
            max_body: int, proxy: Proxy | None = None, ssl_context=None) -> tuple[Reply, bytes]:
        return self.exchange("GET", url, None, headers, timeout=timeout, ca_bundle=ca_bundle, max_body=max_body,
                             proxy=proxy, ssl_context=ssl_context)

    def exchange(self, method: str, url: str, body: bytes | None, headers: dict, *, timeout: float,
                 ca_bundle: str | None, max_body: int, proxy: Proxy | None = None,
                 ssl_context=None) -> tuple[Reply, bytes]:
        """One request and its response, all of it within timeout seconds (through a proxy: the connection to
        it, CONNECT, TLS and the exchange). A target or header that cannot be sent as it is raises InvalidURL
        or ValueError; past the deadline, TimeoutError; a failing proxy ProxyError (an OSError); before a
        status line arrives TLSSetupError, ssl.SSLError, OSError or http.client.HTTPException; while the body
        is read, BodyError. ssl_context (one with a client certificate) replaces the one made from ca_bundle,
        and must be the same object for the same material, as pooled connections are keyed by it."""
        deadline = time.monotonic() + timeout
        parts = urlsplit(url)
        https = parts.scheme == "https"
        host = parts.hostname or ""
        default_port = 443 if https else 80
        port = parts.port or default_port
        key = (https, host, port, ca_bundle, proxy, id(ssl_context) if ssl_context is not None else None)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if proxy is not None and not https:
            scheme_host = f"[{host}]" if ":" in host else host
            target = f"http://{scheme_host}" + (f":{port}" if port != default_port else "") + target
            if proxy.authorization:
                headers = {**headers, "Proxy-Authorization": proxy.authorization}
        request = request_bytes(method, host, port, default_port, target, headers, body)
        sock = self._checkout(key)
        while True:
            reused = sock is not None
            try:
                if sock is None:
                    context = (ssl_context or self._context(ca_bundle)) if https else None
                    sock = self._connect(host, port, context, deadline, proxy)
                sock.settimeout(remaining(deadline))
                sock.sendall(request)
                wire = Wire(sock, deadline)
                status, fields, keep_alive = wire.head()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                sock.close()
                sock = None
                # An idle keep-alive connection the peer closed just as it was reused: an idempotent GET is
                # sent once more on a new one (RFC 9110 §9.2.2); a POST is not, it may have been received.
                if not (reused and method == "GET"):
                    raise
            except BaseException:
                if sock is not None:
                    sock.close()
                raise
        try:
            data, reusable = wire.body(status, fields, keep_alive, max_body)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise
            raise BodyError(type(exc).__name__, status) from exc
        if reusable:
            self._checkin(key, sock)
        else:
            sock.close()
        return Reply(status, Headers(fields)), data

    def close(self) -> None:
        with self._lock:
            socks = [sock for idle in self._idle.values() for sock in idle]
            self._idle.clear()
        for sock in socks:
            sock.close()


def make_session(pool_size: int = 8) -> HttpPool:
    """One connection pool for all clients; retries off because the keeper is the one layer that retries."""
    return HttpPool(pool_size)

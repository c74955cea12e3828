"""The token endpoint client: grants x client-authentication dialects, and response parsing.

Dialects (from the seed providers): `basic` (HTTP Basic, RFC 6749 §2.3.1, form body),
`post` (client_id/client_secret in the form body), `json` (everything in a JSON body) and
`query` (everything in the query string of a POST). Every failure becomes a TokenEndpointError
whose message names the client and never holds a secret.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import re
import select
import socket
import threading
import time
from email.utils import parsedate_to_datetime
from urllib.parse import quote_plus, urlencode, urlsplit

from tokensmith.errors import TokenEndpointError
from tokensmith.sources import Credentials
from tokensmith.tokens import Token

MAX_BODY = 64 * 1024
MAX_LIFETIME = 366 * 24 * 3600.0
NON_RETRYABLE_OAUTH = {"invalid_client", "invalid_grant", "unsupported_grant_type", "unauthorized_client",
                       "invalid_scope", "invalid_request", "access_denied"}
TOKEN_CHARS = re.compile(r"^[\x21-\x7e]+$")
INVALID_TARGET = re.compile(r"[^\x21-\x7e]")


class Reply:
    """What a token endpoint answered: the status and the headers (case-insensitive .get)."""

    __slots__ = ("status_code", "headers")

    def __init__(self, status_code: int, headers):
        self.status_code = status_code
        self.headers = headers


class TLSSetupError(OSError):
    """The CA bundle could not be loaded."""


class BodyError(Exception):
    """The connection failed while the response body was being read."""


class Headers:
    """Response header fields, looked up case-insensitively; a repeated field answers its first value, as
    email.message.Message.get does."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, str]):
        self._fields = fields

    def get(self, name: str, default=None):
        return self._fields.get(name.lower(), default)


class Wire:
    """One HTTP/1.x response read straight off the socket: http.client's semantics and limits (line length,
    header lines) without the file object, HTTPResponse and email.message.Message it builds for every
    response, which were ~13% of the daemon's CPU under load. Unlike http.client it skips every interim
    1xx response, not only 100 Continue (RFC 9110 §15.2)."""

    __slots__ = ("buf", "pos", "sock")

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.pos = 0

    def _fill(self) -> bool:
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
        while True:
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
        while self._line("trailer line") not in (b"\r\n", b"\n", b""):
            pass
        return b"".join(parts), True


def post_bytes(host: str, port: int, default_port: int, target: str, headers: dict, body: bytes) -> bytes:
    """The bytes HTTPConnection(host, port).request("POST", target, body, headers) sends, as one buffer:
    request line, the Host header it derives, Content-Length, then the caller's headers (which hold neither)."""
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
    lines = [f"POST {target} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    for name, value in headers.items():
        line = f"{name}: {value}"
        if "\r" in line or "\n" in line:
            raise ValueError(f"invalid header {name!r}")
        lines.append(line)
    lines.append("\r\n")
    return "\r\n".join(lines).encode("iso-8859-1") + body


class HttpPool:
    """Keep-alive HTTP/1.1 connections to the token endpoints: http.client connects them (TLS included),
    the request goes out in one send and Wire reads the response (requests cost ~1 ms of CPU per call and
    ~0.1 s of start-up imports). Like the requests session it replaced: no proxies from the environment,
    no redirects followed, no retries (the keeper is the one layer that retries), TLS always verified
    against the system store or the client's ca_bundle. An idle connection the server has closed is
    noticed before reuse and replaced."""

    def __init__(self, pool_size: int = 8):
        self.pool_size = pool_size
        self._idle: dict[tuple, list[http.client.HTTPConnection]] = {}
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
    def _dropped(conn: http.client.HTTPConnection) -> bool:
        sock = conn.sock
        if sock is None:
            return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)  # an idle keep-alive connection has nothing to read unless it was closed

    def _checkout(self, key: tuple) -> http.client.HTTPConnection | None:
        with self._lock:
            idle = self._idle.get(key)
            while idle:
                conn = idle.pop()
                if not self._dropped(conn):
                    return conn
                conn.close()
        return None

    def _checkin(self, key: tuple, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.pool_size:
                idle.append(conn)
                return
        conn.close()

    def post(self, url: str, body: bytes | None, headers: dict, *, timeout: float, ca_bundle: str | None,
             max_body: int) -> tuple[Reply, bytes]:
        """One POST; headers must not hold Host or Content-Length. A target or header that cannot be sent
        as it is raises InvalidURL or ValueError; before a status line arrives it raises TLSSetupError,
        ssl.SSLError, TimeoutError, OSError or http.client.HTTPException; while the body is read, BodyError."""
        parts = urlsplit(url)
        https = parts.scheme == "https"
        host = parts.hostname or ""
        default_port = 443 if https else 80
        port = parts.port or default_port
        key = (https, host, port, ca_bundle)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = post_bytes(host, port, default_port, target, headers, body or b"")
        conn = self._checkout(key)
        if conn is None:
            if https:
                conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._context(ca_bundle))
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
        else:
            conn.sock.settimeout(timeout)
        try:
            if conn.sock is None:
                conn.connect()
            conn.sock.sendall(request)
            wire = Wire(conn.sock)
            status, fields, keep_alive = wire.head()
        except BaseException:
            conn.close()
            raise
        try:
            data, reusable = wire.body(status, fields, keep_alive, max_body)
        except BaseException as exc:
            conn.close()
            raise BodyError(type(exc).__name__) from exc
        if reusable:
            self._checkin(key, conn)
        else:
            conn.close()
        return Reply(status, Headers(fields)), data

    def close(self) -> None:
        with self._lock:
            conns = [conn for idle in self._idle.values() for conn in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


def make_session(pool_size: int = 8) -> HttpPool:
    """One connection pool for all clients; retries off because the keeper is the one layer that retries."""
    return HttpPool(pool_size)


def basic_auth_header(client_id: str, client_secret: str) -> str:
    pair = f"{quote_plus(client_id)}:{quote_plus(client_secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def parse_retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), 3600.0)
    try:
        return max(0.0, min(parsedate_to_datetime(value).timestamp() - now, 3600.0))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value) if isinstance(value, float) or abs(value) < 2 ** 1023 else math.inf  # no OverflowError
    elif isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+(\.\d+)?\s*", value, re.ASCII):  # what float() takes
        number = float(value)
    else:
        return None
    return number if math.isfinite(number) else None


def jwt_expiry(access_token: str) -> float | None:
    """The `exp` claim of a JWT access token, read without verifying it (we are not its audience).
    None for an opaque token or a JWT whose exp is missing or not a number."""
    if access_token.count(".") != 2 or not access_token.startswith("eyJ"):
        return None
    import jwt

    try:
        claims = jwt.decode(access_token, options={"verify_signature": False, "verify_exp": False,
                                                   "verify_nbf": False, "verify_iat": False, "verify_aud": False})
    except (jwt.PyJWTError, ValueError, TypeError):
        return None
    if not isinstance(claims, dict):
        return None
    return _number(claims.get("exp"))


def parse_token_response(body: bytes, *, client: str, sent_at: float, default_lifetime: float) -> Token:
    def bad(field: str, problem: str) -> TokenEndpointError:
        return TokenEndpointError(f"malformed token response: {field} {problem}", client=client,
                                  retryable=True, error="malformed_response")

    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise bad("body", "is not JSON") from None
    if not isinstance(data, dict):
        raise bad("body", "is not a JSON object")
    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise bad("access_token", "is missing")
    if not TOKEN_CHARS.fullmatch(access_token) or len(access_token) > 16384:
        raise bad("access_token", "holds characters a token cannot have")
    token_type = data.get("token_type", "Bearer")
    if not isinstance(token_type, str) or not token_type.isprintable() or len(token_type) > 64:
        raise bad("token_type", "is not a short string")
    if token_type.lower() == "bearer":
        token_type = "Bearer"
    refresh_token = data.get("refresh_token")
    if refresh_token is not None and (not isinstance(refresh_token, str) or not TOKEN_CHARS.fullmatch(refresh_token)):
        raise bad("refresh_token", "is not a token string")
    scope = data.get("scope")
    scope = scope if isinstance(scope, str) else None

    lifetimes = []
    if "expires_in" in data and data["expires_in"] is not None:
        expires_in = _number(data["expires_in"])
        if expires_in is None:
            raise bad("expires_in", "is not a number")
        if expires_in < 1:  # 0, negative, or so small that sent_at + expires_in == sent_at
            raise bad("expires_in", "is under one second")
        lifetimes.append(min(expires_in, MAX_LIFETIME))
    exp = jwt_expiry(access_token)
    if exp is not None:
        if exp <= sent_at:
            raise bad("access_token", "is a JWT that has already expired (check the clocks)")
        lifetimes.append(min(exp - sent_at, MAX_LIFETIME))
    lifetime = min(lifetimes) if lifetimes else default_lifetime
    return Token(access_token=access_token, token_type=token_type, obtained_at=sent_at,
                 expires_at=sent_at + lifetime, refresh_token=refresh_token or None, scope=scope)


LONG_WORD = re.compile(r"[A-Za-z0-9._~+/=-]{16,}")


def _describe(text: str, secrets: list[str]) -> str:
    """A server's error text, safe to log: our own secrets and anything token-like are cut out,
    since a provider may echo what it was sent."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = LONG_WORD.sub("[redacted]", text)
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text[:200]


class TokenClient:
    def __init__(self, client, session: HttpPool | None = None, clock=time.time):
        self.client = client
        self.session = session or make_session()
        self.clock = clock

    def _auth(self, creds: Credentials, params: dict, headers: dict) -> None:
        if self.client.auth_style == "basic":
            headers["Authorization"] = basic_auth_header(creds.client_id, creds.client_secret or "")
        else:
            params["client_id"] = creds.client_id
            if creds.client_secret is not None:
                params["client_secret"] = creds.client_secret

    def _post(self, url: str, params: dict, creds: Credentials, *, dialect: str, what: str) -> tuple[Reply, bytes]:
        headers = {"Accept": "application/json", "Accept-Encoding": "identity", "User-Agent": "tokensmith"}
        endpoint = urlsplit(url)._replace(query="", fragment="").geturl()  # the configured URL, never a parameter
        self._auth(creds, params, headers)
        body = None
        if dialect == "json":
            body = json.dumps(params, allow_nan=False).encode()
            headers["Content-Type"] = "application/json"
        elif dialect == "query":
            url = url + ("&" if urlsplit(url).query else "?") + urlencode(params)
        else:
            body = urlencode(params).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        name = self.client.name
        try:
            response, body = self.session.post(url, body, headers, timeout=self.client.timeout,
                                               ca_bundle=str(self.client.ca_bundle) if self.client.ca_bundle else None,
                                               max_body=MAX_BODY)
        except TLSSetupError as exc:
            raise TokenEndpointError(f"{what}: TLS setup failed: {exc}", client=name, retryable=True) from exc
        except BodyError as exc:
            raise TokenEndpointError(f"{what}: connection lost while reading the response", client=name,
                                     retryable=True, error="unreachable") from exc
        except (socket.timeout, TimeoutError) as exc:
            raise TokenEndpointError(f"{what}: no response from {endpoint} within {self.client.timeout:g}s",
                                     client=name, retryable=True, error="timeout") from exc
        except (OSError, http.client.HTTPException) as exc:
            import ssl

            if isinstance(exc, ssl.SSLError):
                raise TokenEndpointError(f"{what}: TLS verification failed", client=name, retryable=True) from exc
            reason = f"{type(exc).__name__}: {exc.strerror}" if getattr(exc, "strerror", None) else type(exc).__name__
            raise TokenEndpointError(f"{what}: cannot reach {endpoint} ({reason})", client=name,
                                     retryable=True, error="unreachable") from exc
        if len(body) > MAX_BODY:
            raise TokenEndpointError(f"{what}: response larger than {MAX_BODY // 1024} KiB refused", client=name,
                                     retryable=True, status=response.status_code, error="oversized_response")
        return response, body

    def _error(self, response: Reply, body: bytes, creds: Credentials, what: str) -> TokenEndpointError:
        status = response.status_code
        name = self.client.name
        retry_after = parse_retry_after(response.headers.get("Retry-After"), self.clock())
        if 300 <= status < 400:
            return TokenEndpointError(f"{what}: HTTP {status} redirect refused (credentials are never sent on)",
                                      client=name, retryable=False, status=status)
        code = description = None
        try:
            data = json.loads(body)
            if isinstance(data, dict) and isinstance(data.get("error"), str):
                code = _describe(data["error"], creds.secrets())[:64]
                if isinstance(data.get("error_description"), str):
                    description = _describe(data["error_description"], creds.secrets())
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass
        if code is None and status == 401:
            code = "invalid_client"
        retryable = status == 429 or status >= 500 or (code is not None and code not in NON_RETRYABLE_OAUTH
                                                       and status not in (400, 401, 403))
        text = f"{what}: HTTP {status}" + (f" {code}" if code else "") + (f": {description}" if description else "")
        return TokenEndpointError(text, client=name, retryable=retryable, error=code, status=status,
                                  retry_after=retry_after)

    def obtain(self, grant: str, creds: Credentials, refresh_token: str | None = None) -> Token:
        params: dict = {"grant_type": grant}
        if grant == "password":
            params["username"] = creds.username or ""
            params["password"] = creds.password or ""
        elif grant == "refresh_token":
            params["refresh_token"] = refresh_token or creds.refresh_token or ""
        if grant != "refresh_token":
            if self.client.scope:
                params["scope"] = self.client.scope
            if self.client.audience:
                params["audience"] = self.client.audience
        params.update(self.client.extra_params)
        sent_at = self.clock()
        what = f"{grant} grant"
        response, body = self._post(self.client.token_url, params, creds, dialect=self.client.auth_style, what=what)
        if response.status_code != 200:
            raise self._error(response, body, creds, what)
        return parse_token_response(body, client=self.client.name, sent_at=sent_at,
                                    default_lifetime=self.client.refresh.default_lifetime)

    def revoke(self, token: str, hint: str, creds: Credentials) -> None:
        """RFC 7009. Revocation is always form-encoded; the client authenticates in its own style."""
        if not self.client.revocation_url:
            raise TokenEndpointError("no revocation_url configured", client=self.client.name, retryable=False)
        dialect = "basic" if self.client.auth_style == "basic" else "post"
        what = f"revoke {hint}"
        response, body = self._post(self.client.revocation_url, {"token": token, "token_type_hint": hint}, creds,
                                    dialect=dialect, what=what)
        if response.status_code != 200:
            raise self._error(response, body, creds, what)

    def introspect(self, token: str, creds: Credentials) -> bool:
        """RFC 7662: True when the server says the token is still active."""
        if not self.client.introspection_url:
            raise TokenEndpointError("no introspection_url configured", client=self.client.name, retryable=False)
        dialect = "basic" if self.client.auth_style == "basic" else "post"
        response, body = self._post(self.client.introspection_url, {"token": token}, creds, dialect=dialect,
                                    what="introspection")
        if response.status_code != 200:
            raise self._error(response, body, creds, "introspection")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("active"), bool):
            raise TokenEndpointError("introspection: response has no boolean 'active'", client=self.client.name,
                                     retryable=True, error="malformed_response")
        return data["active"]

"""A stateful OAuth2 token endpoint on loopback that behaves like the seed providers.

Used by ``tokensmith demo``, the test suite and the benchmarks. Stdlib only, so it imports fast.

Dialects, per client:
    post   form body with client_id/client_secret (iQmetrix); a non-form body gets
           400 unsupported_grant_type "The authorization grant type ' ' is not supported ..."
    basic  HTTP Basic client auth (RFC 6749 §2.3.1 form-encoded), form body; bad credentials -> 401
    json   all parameters in a JSON body
    query  all parameters in the query string of a POST (SailPoint); token_type "bearer" plus extra fields

Semantics: every credential grant makes a new access token and leaves older ones valid; exchanging a
refresh token revokes the access token it came with and spends the refresh token (reuse -> invalid_grant).

    python -m tokensmith.devserver --port 8080 --client ID:SECRET[:DIALECT] [--user NAME:PASSWORD]
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import socket
import signal
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import parse_qsl, unquote_plus, urlsplit

from tokensmith.devserver_auth import AUTH_METHODS, ClientAuthChecks, _OAuthError

MAX_BODY = 64 * 1024
DIALECTS = ("basic", "post", "json", "query")
GRANTS = ("client_credentials", "password", "refresh_token")
FORM = "application/x-www-form-urlencoded"
STATS = ("token_requests", "issued", "refresh_exchanges", "refresh_reuse", "invalid_client", "revocations",
         "introspections")
SAILPOINT_FIELDS = {"scope": "read write", "accessType": "OFFLINE", "internal": False, "pod": "dev01",
                    "tenant_id": "58eb06a4-dcd7-4e96-8fac-cca2afc03e61", "org": "tokensmith", "strong_auth": True,
                    "strong_auth_supported": False, "authorities": ["ORG_ADMIN"], "enabled": True}


def _invalid_grant(description):
    return _OAuthError("invalid_grant", description)


def _same(expected, given):
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())


def _content_type(headers):
    return (headers.get("Content-Type") or "").split(";")[0].strip().lower()


def _form(body):
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def _basic_credentials(headers):
    scheme, _, value = (headers.get("Authorization") or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    client_id, _, secret = decoded.partition(":")
    return unquote_plus(client_id), unquote_plus(secret)


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class OAuthServer(ClientAuthChecks):
    """Serves /oauth2/token, /oauth2/revoke (RFC 7009), /oauth2/introspect (RFC 7662) and /resource."""

    def __init__(self, host="127.0.0.1", port=0, *, access_lifetime=3600, refresh_lifetime=7 * 24 * 3600,
                 jwt=False, expires_in_as_string=False, issue_refresh_tokens=True, clock=time.time,
                 tls_context=None):
        self.access_lifetime = access_lifetime
        self.refresh_lifetime = refresh_lifetime
        self.jwt = jwt
        self.jwt_key = secrets.token_bytes(32)
        self.expires_in_as_string = expires_in_as_string
        self.issue_refresh_tokens = issue_refresh_tokens
        self.clock = clock
        self.stats = dict.fromkeys(STATS, 0)
        self._lock = threading.Lock()
        self._clients = {}
        self._access = {}
        self._refresh = {}
        self._issued = {}
        self._issued_refresh = {}
        self._faults = deque()
        self._seen_jti = {}
        self.rejections = []  # (client_id, reason) of every failed client authentication, for tests
        self.auth_methods = ["client_secret_basic", "client_secret_post", *AUTH_METHODS[:3]]
        self._routes = {"/oauth2/token": ("POST", self._token), "/oauth2/revoke": ("POST", self._revoke),
                        "/oauth2/introspect": ("POST", self._introspect), "/resource": ("GET", self._resource),
                        "/.well-known/oauth-authorization-server": ("GET", self._metadata)}
        self._httpd = _HTTPServer((host, port), self, tls_context)  # bound now so that url is known before start()
        self._thread = None
        bound_host, bound_port = self._httpd.server_address[:2]
        self.url = f"{'https' if tls_context else 'http'}://{bound_host}:{bound_port}"
        self.issuer = self.url
        self.token_url = self.url + "/oauth2/token"
        self.revocation_url = self.url + "/oauth2/revoke"
        self.introspection_url = self.url + "/oauth2/introspect"
        self.resource_url = self.url + "/resource"

    def start(self):
        if self._httpd is None:
            raise RuntimeError("a stopped OAuthServer cannot be restarted; make a new one")
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                            name="tokensmith-devserver", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        if self._httpd is None:
            return
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()
        # Keep-alive connections would otherwise go on being served by their threads after stop().
        for conn in list(self._httpd.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def add_client(self, client_id, client_secret, *, dialect="post", users=None, access_lifetime=None, auth=None,
                   key=None, audience=None):
        """auth: None (the dialect's secret) or one of AUTH_METHODS. key: for private_key_jwt the public key
        (PEM), for tls_client_auth the certificate's SHA-256 fingerprint (hex), for jwt_bearer the issuer's
        public key (PEM). audience: what an assertion's aud must hold (default the token URL or issuer)."""
        if dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
        if auth is not None and auth not in AUTH_METHODS:
            raise ValueError(f"unknown auth {auth!r}; expected one of {', '.join(AUTH_METHODS)}")
        with self._lock:
            self._clients[client_id] = SimpleNamespace(secret=client_secret, dialect=dialect,
                                                       users=dict(users or {}), access_lifetime=access_lifetime,
                                                       auth=auth, key=key, audience=audience)
            self._issued.setdefault(client_id, [])

    def set_client_key(self, client_id, key):
        with self._lock:
            self._clients[client_id].key = key

    def set_client_secret(self, client_id, new_secret):
        with self._lock:
            self._clients[client_id].secret = new_secret

    def is_active(self, access_token):
        return self._active(access_token) is not None

    def issued_tokens(self, client_id):
        with self._lock:
            return list(self._issued.get(client_id, ()))

    def issued_refresh_tokens(self, client_id):
        with self._lock:
            return list(self._issued_refresh.get(client_id, ()))

    def fail_next(self, n=1, *, status=503, body=None, headers=None, delay=0.0, close_connection=False):
        """Fault the next n token requests. status=None with a delay gives a slow but normal answer."""
        if body is None and status is not None:
            body = json.dumps({"error": "temporarily_unavailable",
                               "error_description": f"Injected fault (HTTP {status})"}).encode()
        if isinstance(body, str):
            body = body.encode()
        fault = SimpleNamespace(status=status, body=body or b"", delay=delay, drop=close_connection,
                                headers={"Content-Type": "application/json", **(headers or {})})
        with self._lock:
            self._faults.extend([fault] * n)

    # Each route takes (query, headers, body) and returns a JSON payload, or raises _OAuthError.

    def _handle(self, method, target, headers, body, peer_cert=None):
        url = urlsplit(target)
        route = self._routes.get(url.path)
        delay = 0.0
        try:
            if route is None:
                raise _OAuthError("not_found", f"No such endpoint: {url.path}", 404)
            if method != route[0]:
                raise _OAuthError("invalid_request", f"Use {route[0]}", 405, {"Allow": route[0]})
            if url.path == "/oauth2/token":
                with self._lock:
                    self.stats["token_requests"] += 1
                    fault = self._faults.popleft() if self._faults else None
                if fault is not None:
                    if fault.drop or fault.status is not None:
                        return fault.status, fault.body, fault.headers, fault.delay, fault.drop
                    delay = fault.delay
            query = dict(parse_qsl(url.query, keep_blank_values=True))
            headers = _WithPeer(headers, peer_cert)
            status, payload, extra = 200, route[1](query, headers, body), {}
        except _OAuthError as e:
            status, payload, extra = e.status, {"error": e.error, "error_description": e.description}, e.headers
        headers = {"Content-Type": "application/json", "Cache-Control": "no-store", "Pragma": "no-cache", **extra}
        return status, json.dumps(payload).encode(), headers, delay, False

    def _token(self, query, headers, body):
        basic = _basic_credentials(headers)
        ctype = _content_type(headers)
        form = _form(body) if ctype == FORM else {}
        data = {}
        if ctype == "application/json":
            try:
                data = json.loads(body)
            except ValueError:
                raise _OAuthError("invalid_request", "The request body is not valid JSON") from None
            if not isinstance(data, dict):
                raise _OAuthError("invalid_request", "The request body must be a JSON object")
        client_id = basic[0] if basic else form.get("client_id") or data.get("client_id") or query.get("client_id")
        with self._lock:
            client = self._clients.get(client_id) if isinstance(client_id, str) else None
            if client:
                dialect = client.dialect
            else:
                dialect = "basic" if basic else "json" if data else "post" if form or not query else "query"
            params = {"basic": form, "post": form, "json": data, "query": query}[dialect]
            grant = str(params.get("grant_type") or "")
            if dialect == "query":
                grant = grant.lower()  # SailPoint's docs spell it both ways
            # Checked before the client, as iQmetrix does: a JSON body there yields this, not invalid_client.
            if grant not in GRANTS:
                raise _OAuthError("unsupported_grant_type",
                                 f"The authorization grant type '{grant or ' '}' is not supported by the "
                                 "authorization server")
            if client is not None and client.auth:
                self._check_method(client_id, client, params, headers)
            else:
                secret = (basic[1] if basic else None) if dialect == "basic" else params.get("client_secret")
                self._check_client(client, secret, challenge=dialect == "basic")
            user = None
            if grant == "password":
                user = params.get("username")
                if not (isinstance(user, str) and user in client.users and _same(client.users[user],
                                                                                 params.get("password"))):
                    raise _invalid_grant("The user name or password is incorrect.")
            elif grant == "refresh_token":
                user = self._spend_refresh(client_id, params.get("refresh_token"))
            return self._issue(client_id, client, grant, user)

    def _spend_refresh(self, client_id, token):
        record = self._refresh.get(token) if isinstance(token, str) else None
        if record is None:
            raise _invalid_grant("The refresh token is invalid.")
        if record.client_id != client_id:
            raise _invalid_grant("The refresh token was issued to another client.")
        if record.spent:
            self.stats["refresh_reuse"] += 1
            raise _invalid_grant("The refresh token has already been used.")
        if self.clock() >= record.exp:
            raise _invalid_grant("The refresh token has expired.")
        record.spent = True
        self._access.pop(record.access, None)
        self.stats["refresh_exchanges"] += 1
        return record.user

    def _issue(self, client_id, client, grant, user):
        now = self.clock()
        lifetime = int(client.access_lifetime or self.access_lifetime)
        jti = secrets.token_hex(16)
        if self.jwt:
            claims = {"client_id": client_id, "iat": int(now), "exp": int(now) + lifetime, "jti": jti}
            if user:
                claims["user_name"] = user
            access = self._encode_jwt(claims)
        else:
            access = secrets.token_hex(16)
        refresh = None
        if self.issue_refresh_tokens and (grant != "client_credentials" or client.dialect == "json"):
            refresh = secrets.token_hex(20)
            self._refresh[refresh] = SimpleNamespace(client_id=client_id, exp=now + self.refresh_lifetime,
                                                     access=access, user=user, spent=False)
            self._issued_refresh.setdefault(client_id, []).append(refresh)
        self._access[access] = SimpleNamespace(client_id=client_id, exp=now + lifetime)
        self._issued[client_id].append(access)
        self.stats["issued"] += 1
        payload = {"access_token": access, "token_type": "bearer" if client.dialect == "query" else "Bearer",
                   "expires_in": str(lifetime) if self.expires_in_as_string else lifetime}
        if refresh:
            payload["refresh_token"] = refresh
        if client.dialect == "query":
            payload.update(SAILPOINT_FIELDS, client_id=client_id, jti=jti)
            if user:
                payload.update(user_name=user, identity_id=hashlib.sha256(user.encode()).hexdigest()[:32])
        return payload

    def _encode_jwt(self, claims):
        signing_input = (_b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"."
                         + _b64url(json.dumps(claims, separators=(",", ":")).encode()))
        signature = hmac.new(self.jwt_key, signing_input, hashlib.sha256).digest()
        return (signing_input + b"." + _b64url(signature)).decode()

    def _check_client(self, client, secret, challenge):
        if client is None or not _same(client.secret, secret):
            self.stats["invalid_client"] += 1
            raise _OAuthError("invalid_client", "Client authentication failed.", 401 if challenge else 400,
                             {"WWW-Authenticate": 'Basic realm="tokensmith"'} if challenge else None)

    def _authenticated_form(self, headers, body):
        """For revoke and introspect: Basic or form client credentials (or the client's method), and the token."""
        form = _form(body) if _content_type(headers) == FORM else {}
        basic = _basic_credentials(headers)
        client_id, secret = basic or (form.get("client_id"), form.get("client_secret"))
        client = self._clients.get(client_id)
        if client is not None and client.auth:
            self._check_method(client_id, client, form, headers)
        else:
            self._check_client(client, secret, challenge=basic is not None)
        if not form.get("token"):
            raise _OAuthError("invalid_request", "The token parameter is required.")
        return client_id, form["token"]

    def _revoke(self, query, headers, body):
        with self._lock:
            client_id, token = self._authenticated_form(headers, body)
            self.stats["revocations"] += 1
            access = self._access.get(token)
            if access and access.client_id == client_id:
                del self._access[token]
            refresh = self._refresh.get(token)
            if refresh and refresh.client_id == client_id:
                del self._refresh[token]
                self._access.pop(refresh.access, None)
        return {}

    def _introspect(self, query, headers, body):
        with self._lock:
            _, token = self._authenticated_form(headers, body)
            self.stats["introspections"] += 1
            now = self.clock()
            for kind, record in (("access_token", self._access.get(token)),
                                 ("refresh_token", self._refresh.get(token))):
                if record and now < record.exp and not getattr(record, "spent", False):
                    return {"active": True, "client_id": record.client_id, "exp": int(record.exp),
                            "token_type": kind}
        return {"active": False}

    def _resource(self, query, headers, body):
        scheme, _, token = (headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer":
            raise _OAuthError("invalid_request", "A Bearer token is required.", 401, {"WWW-Authenticate": "Bearer"})
        record = self._active(token.strip())
        if record is None:
            raise _OAuthError("invalid_token", "The access token is invalid, expired or revoked.", 401,
                             {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return {"ok": True, "client_id": record.client_id}

    def _active(self, token):
        with self._lock:
            record = self._access.get(token)
            return record if record and self.clock() < record.exp else None


class _WithPeer:
    """The request's headers, and the TLS client certificate (DER) it came with."""

    def __init__(self, headers, peer_cert):
        self._headers = headers
        self.peer_cert = peer_cert

    def get(self, name, default=None):
        return self._headers.get(name, default)


class _HTTPServer(ThreadingHTTPServer):
    def __init__(self, address, app, tls_context=None):
        self.app = app
        self.connections = set()
        self.tls_context = tls_context
        super().__init__(address, _Handler)

    def finish_request(self, request, client_address):
        # the handshake in the connection's own thread, so a slow or failing client holds up no other
        if self.tls_context is not None:
            try:
                request.settimeout(5)
                request = self.tls_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except OSError:
                return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # a client that hung up is not worth a traceback
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tokensmith-devserver"
    disable_nagle_algorithm = True  # headers and body go out in two writes: avoid the 40 ms delayed-ACK stall

    def log_message(self, format, *args):
        pass  # tests and the demo own stderr

    def setup(self):
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self):
        self.server.connections.discard(self.connection)
        super().finish()

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def _serve(self, method):
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit() or int(length) > MAX_BODY:
            self.close_connection = True
            error = {"error": "invalid_request", "error_description": "Request body too large or unsized."}
            return self._reply(413, json.dumps(error).encode(), {"Content-Type": "application/json"})
        body = self.rfile.read(int(length))
        peer = self.connection.getpeercert(binary_form=True) if hasattr(self.connection, "getpeercert") else None
        status, payload, headers, delay, drop = self.server.app._handle(method, self.path, self.headers, body, peer)
        if delay:
            time.sleep(delay)
        if drop:
            self.close_connection = True
            return
        self._reply(status, payload, headers)

    def _reply(self, status, payload, headers):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tokensmith.devserver",
                                     description="Run a local OAuth2 token endpoint for trying tokensmith out.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port (default 8080)")
    parser.add_argument("--client", action="append", default=[], metavar="ID:SECRET[:DIALECT]",
                        help="register a client (repeatable; default demo:demo-secret); "
                             f"DIALECT is one of {', '.join(DIALECTS)}, default post")
    parser.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD",
                        help="a user for the password grant, given to every client (repeatable)")
    parser.add_argument("--access-lifetime", type=int, default=3600, metavar="SECONDS")
    parser.add_argument("--jwt", action="store_true", help="issue HS256 JWT access tokens")
    args = parser.parse_args(argv)
    users = {}
    for spec in args.user:
        name, sep, password = spec.partition(":")
        if not (name and sep):
            parser.error(f"--user {spec!r}: expected NAME:PASSWORD")
        users[name] = password
    clients = []
    for spec in args.client or ["demo:demo-secret"]:
        parts = spec.split(":")
        dialect = parts.pop() if len(parts) > 2 and parts[-1] in DIALECTS else "post"
        if len(parts) < 2 or not parts[0]:
            parser.error(f"--client {spec!r}: expected ID:SECRET[:DIALECT]")
        clients.append((parts[0], ":".join(parts[1:]), dialect))
    server = OAuthServer(args.host, args.port, access_lifetime=args.access_lifetime, jwt=args.jwt)
    for client_id, secret, dialect in clients:
        server.add_client(client_id, secret, dialect=dialect, users=users)
    # Ctrl-C and SIGTERM stop it even when it was started with SIGINT ignored (as `cmd &` in a script does)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # announced only once serving, so a Ctrl-C sent after reading the URL cannot land inside start()
    with server:
        try:  # the announcement too: a reader may signal before print() has returned
            for client_id, _, dialect in clients:
                print(f"client {client_id} ({dialect} dialect)")
            print(server.token_url, flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The token endpoint client against a real OAuthServer on loopback (the seed dialects), small local
servers for what the dev server cannot do (redirects, echoed secrets, TLS, raw HTTP/1.1 framing), and
parse_token_response."""

import base64
import contextlib
import datetime
import http.client
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import parse_qsl, urlsplit

import jwt
import pytest
import requests
from hypothesis import given, settings as hsettings, strategies as st

from fakes import FakeClock
from tokensmith.config import ClientConfig
from tokensmith.errors import TokenEndpointError
from tokensmith.sources import Credentials
from tokensmith.tokenclient import (MAX_BODY, MAX_LIFETIME, TokenClient, basic_auth_header, jwt_expiry,
                                    parse_token_response)
from tokensmith.transport import BodyError, HttpPool, post_bytes

SECRET = "s3cr3t-Client-Secret-7Hq2"
PASSWORD = "pa55-User-Password-X9w"
JWT_KEY = "an-hs256-test-key-that-is-32-bytes-long!"
FORM = "application/x-www-form-urlencoded"


def client_config(token_url, auth_style="post", grant="client_credentials", name="billing-api", **fields):
    return ClientConfig(name=name, token_url=token_url, auth_style=auth_style, grant=grant,
                        source={"type": "env"}, sinks=[{"type": "file", "path": f"/run/tokensmith/{name}.token"}],
                        **fields)


def expect_error(client: TokenClient, grant="client_credentials", creds=None, refresh_token=None,
                 secrets=(SECRET,)) -> TokenEndpointError:
    creds = creds or Credentials(client_id="cid", client_secret=SECRET)
    with pytest.raises(TokenEndpointError) as info:
        client.obtain(grant, creds, refresh_token=refresh_token)
    error = info.value
    assert f"client {client.client.name}:" in str(error)
    for secret in secrets:
        assert secret not in str(error)
    assert "\n" not in str(error)
    return error


class LocalServer:
    """A tiny HTTP(S) server on loopback that records every request and answers with respond(request)."""

    def __init__(self, respond, ssl_context=None):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                request = SimpleNamespace(method=self.command, path=self.path, headers=self.headers,
                                          body=self.rfile.read(length))
                outer.requests.append(request)
                status, headers, payload = respond(request)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        port = self.httpd.server_address[1]
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.thread.join()
        self.httpd.server_close()


def token_reply(request, **extra):
    payload = {"access_token": "tok-from-local-server", "token_type": "Bearer", "expires_in": 600, **extra}
    return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()


# ---- the four dialects against the stateful dev server


@pytest.mark.parametrize("dialect", ["basic", "post", "json", "query"])
def test_each_dialect_obtains_a_token_with_client_credentials(oauth, dialect):
    oauth.add_client(f"cid-{dialect}", SECRET, dialect=dialect)
    token = TokenClient(client_config(oauth.token_url, dialect)).obtain(
        "client_credentials", Credentials(client_id=f"cid-{dialect}", client_secret=SECRET))
    assert oauth.is_active(token.access_token)
    assert oauth.issued_tokens(f"cid-{dialect}") == [token.access_token]
    assert token.token_type == "Bearer"  # the query (SailPoint) dialect answers "bearer"
    assert oauth.stats["invalid_client"] == 0


def test_lifetime_is_measured_from_when_the_request_was_sent(oauth):
    oauth.add_client("cid", SECRET)
    clock = FakeClock(1_700_000_000.0)
    token = TokenClient(client_config(oauth.token_url), clock=clock).obtain(
        "client_credentials", Credentials(client_id="cid", client_secret=SECRET))
    assert token.obtained_at == 1_700_000_000.0
    assert token.expires_at == 1_700_000_000.0 + 3600


def test_query_dialect_sailpoint_response_with_extra_fields_parses(oauth):
    oauth.add_client("cid", SECRET, dialect="query")
    token = TokenClient(client_config(oauth.token_url, "query")).obtain(
        "client_credentials", Credentials(client_id="cid", client_secret=SECRET))
    assert token.scope == "read write"
    assert token.lifetime == 3600


def test_password_grant_then_refresh_token_exchange_revokes_the_old_token(oauth):
    oauth.add_client("cid", SECRET, dialect="post", users={"alice": PASSWORD})
    creds = Credentials(client_id="cid", client_secret=SECRET, username="alice", password=PASSWORD)
    client = TokenClient(client_config(oauth.token_url, "post", grant="password"))
    first = client.obtain("password", creds)
    assert first.refresh_token
    assert oauth.is_active(first.access_token)

    second = client.obtain("refresh_token", creds, refresh_token=first.refresh_token)
    assert second.access_token != first.access_token
    assert oauth.is_active(second.access_token)
    assert not oauth.is_active(first.access_token)
    assert second.refresh_token and second.refresh_token != first.refresh_token

    error = expect_error(client, "refresh_token", creds, refresh_token=first.refresh_token,
                         secrets=(SECRET, PASSWORD, first.refresh_token))
    assert error.error == "invalid_grant"
    assert error.retryable is False
    assert error.status == 400
    assert oauth.is_active(second.access_token)


def test_refresh_token_grant_uses_the_bootstrap_refresh_token_from_the_source(oauth):
    oauth.add_client("cid", SECRET, dialect="json")
    client = TokenClient(client_config(oauth.token_url, "json"))
    first = client.obtain("client_credentials", Credentials(client_id="cid", client_secret=SECRET))
    assert first.refresh_token  # the JSON-body seed returns one for every grant
    creds = Credentials(client_id="cid", client_secret=SECRET, refresh_token=first.refresh_token)
    second = client.obtain("refresh_token", creds)
    assert oauth.is_active(second.access_token) and not oauth.is_active(first.access_token)


def test_wrong_password_is_invalid_grant_and_not_retryable(oauth):
    oauth.add_client("cid", SECRET, users={"alice": PASSWORD})
    creds = Credentials(client_id="cid", client_secret=SECRET, username="alice", password="wrong-" + PASSWORD)
    error = expect_error(TokenClient(client_config(oauth.token_url, grant="password")), "password", creds,
                         secrets=(SECRET, "wrong-" + PASSWORD))
    assert (error.error, error.retryable, error.status) == ("invalid_grant", False, 400)


def test_basic_auth_form_encodes_special_characters(oauth):
    client_id, secret = "a+b:c", "s&cr=t %"
    oauth.add_client(client_id, secret, dialect="basic")
    token = TokenClient(client_config(oauth.token_url, "basic")).obtain(
        "client_credentials", Credentials(client_id=client_id, client_secret=secret))
    assert oauth.issued_tokens(client_id) == [token.access_token]


def test_basic_auth_header_is_rfc6749_form_encoded():
    header = basic_auth_header("a+b:c", "s&cr=t %")
    scheme, _, value = header.partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(value).decode() == "a%2Bb%3Ac:s%26cr%3Dt+%25"


def test_form_dialect_is_what_the_server_accepts_and_never_the_seed_content_type_error(oauth):
    oauth.add_client("cid", SECRET, dialect="post")
    # What the iQmetrix-like server answers a non-form body (the FAQ's "grant type ' '" error) ...
    with requests.Session() as session:
        session.trust_env = False  # straight to loopback, whatever proxy variables say
        wrong = session.post(oauth.token_url, json={"grant_type": "client_credentials", "client_id": "cid",
                                                    "client_secret": SECRET}, timeout=5)
    assert wrong.status_code == 400
    assert wrong.json()["error"] == "unsupported_grant_type" and "' '" in wrong.json()["error_description"]
    # ... and the client's form request is accepted.
    token = TokenClient(client_config(oauth.token_url, "post")).obtain(
        "client_credentials", Credentials(client_id="cid", client_secret=SECRET))
    assert oauth.is_active(token.access_token)


@pytest.mark.parametrize("dialect", ["post", "basic"])
def test_form_request_is_urlencoded_with_parameters_in_the_body(dialect):
    with LocalServer(token_reply) as server:
        config = client_config(server.url + "/oauth2/token", dialect, scope="read write", audience="https://api",
                               extra_params={"resource": "inventory"})
        TokenClient(config).obtain("client_credentials", Credentials(client_id="cid", client_secret=SECRET))
    (request,) = server.requests
    assert request.method == "POST"
    assert request.headers.get("Content-Type").split(";")[0] == FORM
    assert urlsplit(request.path).query == ""
    body = dict(parse_qsl(request.body.decode()))
    expected = {"grant_type": "client_credentials", "scope": "read write", "audience": "https://api",
                "resource": "inventory"}
    if dialect == "post":
        expected.update(client_id="cid", client_secret=SECRET)
        assert "Authorization" not in request.headers
    else:
        assert base64.b64decode(request.headers["Authorization"].split(" ")[1]).decode() == f"cid:{SECRET}"
    assert body == expected


def test_json_dialect_posts_a_json_body():
    with LocalServer(token_reply) as server:
        TokenClient(client_config(server.url + "/t", "json")).obtain(
            "password", Credentials(client_id="cid", client_secret=SECRET, username="alice", password=PASSWORD))
    (request,) = server.requests
    assert request.headers.get("Content-Type").split(";")[0] == "application/json"
    assert json.loads(request.body) == {"grant_type": "password", "username": "alice", "password": PASSWORD,
                                        "client_id": "cid", "client_secret": SECRET}


def test_query_dialect_posts_parameters_in_the_query_string():
    with LocalServer(token_reply) as server:
        TokenClient(client_config(server.url + "/oauth/token", "query")).obtain(
            "client_credentials", Credentials(client_id="cid", client_secret=SECRET))
    (request,) = server.requests
    assert request.method == "POST"
    parts = urlsplit(request.path)
    assert parts.path == "/oauth/token"
    assert dict(parse_qsl(parts.query)) == {"grant_type": "client_credentials", "client_id": "cid",
                                            "client_secret": SECRET}


# ---- refusals and faults


def test_bad_secret_with_post_is_invalid_client_400(oauth):
    oauth.add_client("cid", "the-real-secret", dialect="post")
    error = expect_error(TokenClient(client_config(oauth.token_url, "post")))
    assert (error.error, error.status, error.retryable) == ("invalid_client", 400, False)


def test_bad_secret_with_basic_is_invalid_client_401(oauth):
    oauth.add_client("cid", "the-real-secret", dialect="basic")
    error = expect_error(TokenClient(client_config(oauth.token_url, "basic")))
    assert (error.error, error.status, error.retryable) == ("invalid_client", 401, False)


def test_503_is_retryable_with_its_status(oauth):
    oauth.add_client("cid", SECRET)
    oauth.fail_next(status=503)
    error = expect_error(TokenClient(client_config(oauth.token_url)))
    assert error.retryable is True and error.status == 503


def test_429_with_retry_after_seconds(oauth):
    oauth.add_client("cid", SECRET)
    oauth.fail_next(status=429, headers={"Retry-After": "7"})
    error = expect_error(TokenClient(client_config(oauth.token_url)))
    assert error.retryable is True and error.status == 429
    assert error.retry_after == 7


def test_429_with_retry_after_http_date_uses_the_injected_clock(oauth):
    oauth.add_client("cid", SECRET)
    clock = FakeClock(1_700_000_000.0)
    oauth.fail_next(status=429, headers={"Retry-After": formatdate(1_700_000_030, usegmt=True)})
    error = expect_error(TokenClient(client_config(oauth.token_url), clock=clock))
    assert error.retry_after == 30


def test_200_that_is_not_json_is_a_malformed_response(oauth):
    oauth.add_client("cid", SECRET)
    oauth.fail_next(status=200, body="<html>maintenance</html>", headers={"Content-Type": "text/html"})
    error = expect_error(TokenClient(client_config(oauth.token_url)))
    assert error.error == "malformed_response" and error.retryable is True


def test_200_without_access_token_names_the_field(oauth):
    oauth.add_client("cid", SECRET)
    oauth.fail_next(status=200, body=json.dumps({"token_type": "Bearer", "expires_in": 3600}))
    error = expect_error(TokenClient(client_config(oauth.token_url)))
    assert error.error == "malformed_response"
    assert "access_token" in str(error)


def test_response_slower_than_the_client_timeout_is_a_timeout(oauth):
    oauth.add_client("cid", SECRET)
    oauth.fail_next(status=None, delay=0.5)
    error = expect_error(TokenClient(client_config(oauth.token_url, timeout=0.2)))
    assert error.error == "timeout" and error.retryable is True


def test_connection_closed_without_answer_is_retryable_unreachable(oauth):
    oauth.add_client("cid", SECRET)
    oauth.fail_next(close_connection=True)
    error = expect_error(TokenClient(client_config(oauth.token_url)))
    assert error.error == "unreachable" and error.retryable is True


def test_nothing_listening_is_retryable_unreachable():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = expect_error(TokenClient(client_config(f"http://127.0.0.1:{port}/t", "query")))
    assert error.error == "unreachable" and error.retryable is True


@pytest.mark.security(threat="hostile or slow provider", claim="A token response larger than the 64 KiB cap is "
                                                               "refused with a typed error.")
def test_oversized_response_is_refused(oauth, report):
    oauth.add_client("cid", SECRET)
    body = json.dumps({"access_token": "a" * (MAX_BODY + 10), "token_type": "Bearer"})
    oauth.fail_next(status=200, body=body)
    error = expect_error(TokenClient(client_config(oauth.token_url)))
    assert "refused" in str(error)
    assert error.error == "oversized_response"
    report.record('token response larger than 64 KiB', 'refused with a typed error (oversized_response); no token returned')

@pytest.mark.security(threat="hostile or slow provider", claim="A redirect from the token endpoint is not followed: "
                                                               "the credentials never reach the redirect target.")
def test_redirect_from_the_token_endpoint_is_not_followed(report):
    with LocalServer(token_reply) as elsewhere:
        def redirect(request):
            return 302, {"Location": elsewhere.url + "/oauth2/token"}, b""

        with LocalServer(redirect) as endpoint:
            for dialect in ("post", "basic", "json", "query"):
                error = expect_error(TokenClient(client_config(endpoint.url + "/oauth2/token", dialect)))
                assert error.retryable is False and error.status == 302
        assert len(endpoint.requests) == 4
    assert elsewhere.requests == []
    report.record('302 redirect from the token endpoint', 'not followed; the redirect target received nothing; non-retryable error')

def test_400_invalid_scope_is_not_retryable():
    def refuse(request):
        return 400, {"Content-Type": "application/json"}, b'{"error":"invalid_scope"}'

    with LocalServer(refuse) as server:
        error = expect_error(TokenClient(client_config(server.url + "/t")))
    assert error.error == "invalid_scope" and error.retryable is False


# ---- secrets never appear in error messages, even when the server echoes them


@pytest.mark.security(threat="hostile or slow provider", claim="A token endpoint echoing the client secret, password "
                                                               "or refresh token in its error (code or description) "
                                                               "never gets it into the error message.")
@pytest.mark.parametrize("status", [400, 401, 503])
@pytest.mark.parametrize("dialect", ["post", "basic", "query"])
def test_server_echoing_the_secret_is_redacted(status, dialect):
    def echo(request):
        body = {"error": "invalid_client", "error_description": f"bad secret {SECRET}"}
        return status, {"Content-Type": "application/json"}, json.dumps(body).encode()

    with LocalServer(echo) as server:
        error = expect_error(TokenClient(client_config(server.url + "/t", dialect)))
    assert error.error == "invalid_client"
    assert "bad secret" in str(error)


@pytest.mark.security(threat="hostile or slow provider", claim="A token endpoint echoing the client secret, password "
                                                               "or refresh token in its error (code or description) "
                                                               "never gets it into the error message.")
def test_server_echoing_secrets_in_the_error_code_is_redacted():
    def echo(request):
        body = {"error": f"{SECRET}{PASSWORD}", "error_description": f"{PASSWORD} / {SECRET}"}
        return 400, {"Content-Type": "application/json"}, json.dumps(body).encode()

    with LocalServer(echo) as server:
        creds = Credentials(client_id="cid", client_secret=SECRET, username="alice", password=PASSWORD)
        expect_error(TokenClient(client_config(server.url + "/t", grant="password")), "password", creds,
                     secrets=(SECRET, PASSWORD))


@pytest.mark.security(threat="hostile or slow provider", claim="A token endpoint echoing the client secret, password "
                                                               "or refresh token in its error (code or description) "
                                                               "never gets it into the error message.")
def test_server_echoing_the_refresh_token_is_redacted():
    refresh = "rt-Refresh-Token-Value-Q4z"

    def echo(request):
        body = {"error": "invalid_grant", "error_description": f"refresh token {refresh} was already used"}
        return 400, {"Content-Type": "application/json"}, json.dumps(body).encode()

    with LocalServer(echo) as server:
        expect_error(TokenClient(client_config(server.url + "/t")), "refresh_token",
                     Credentials(client_id="cid", client_secret=SECRET), refresh_token=refresh,
                     secrets=(SECRET, refresh))


def test_json_body_that_is_pathologically_nested_is_a_typed_error():
    def nested(request):
        return 400, {"Content-Type": "application/json"}, b"[" * 50000

    with LocalServer(nested) as server:
        error = expect_error(TokenClient(client_config(server.url + "/t")))
    assert error.status == 400


# ---- the wire: request bytes, response parsing, connection reuse

RAW_TOKEN = json.dumps({"access_token": "tok-from-raw-server", "token_type": "Bearer", "expires_in": 600}).encode()
HEADERS = {"Accept": "application/json", "Accept-Encoding": "identity", "User-Agent": "tokensmith",
           "Authorization": basic_auth_header("cid", SECRET), "Content-Type": FORM}


def fixed(body=RAW_TOKEN, *fields, status="HTTP/1.1 200 OK") -> bytes:
    return "\r\n".join([status, *fields, f"Content-Length: {len(body)}", "", ""]).encode() + body


def chunked(*chunks, trailer="") -> bytes:
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + f"0\r\n{trailer}\r\n".encode()


class RawServer:
    """A loopback server, one connection at a time, that answers the n-th request with answers[n] as raw
    bytes (in pieces of `piece` bytes when given) and hangs up after every answer when hang_up is set."""

    def __init__(self, *answers, hang_up=False, piece=None):
        self.answers = list(answers)
        self.hang_up = hang_up
        self.piece = piece
        self.requests = []
        self.connections = 0
        self.hung_up = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.listener.close()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn, conn.makefile("rb") as reader, contextlib.suppress(ConnectionError):
                while self._answer(conn, reader):
                    pass
            self.hung_up.set()

    def _answer(self, conn, reader) -> bool:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = reader.readline()
            if not line:
                return False
            head += line
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
        self.requests.append(head + reader.read(length))
        answer = self.answers.pop(0)
        if self.piece is None:
            conn.sendall(answer)
        else:
            for start in range(0, len(answer), self.piece):
                conn.sendall(answer[start:start + self.piece])
                time.sleep(0.002)
        return not self.hang_up


@pytest.fixture
def pool():
    pool = HttpPool()
    yield pool
    pool.close()


def post(pool, server, body=b"grant_type=client_credentials"):
    return pool.post(server.url + "/t", body, HEADERS, timeout=2, ca_bundle=None, max_body=MAX_BODY)


class Capture:
    def __init__(self):
        self.sent = b""

    def sendall(self, data):
        self.sent += data


@pytest.mark.parametrize("https, host, port", [(False, "127.0.0.1", 8080), (False, "token.example", 80),
                                               (True, "token.example", 443), (True, "::1", 8443),
                                               (False, "fe80::1%eth0", 80), (True, "bücher.example", 443)])
@pytest.mark.parametrize("target, body", [("/oauth2/token", b"grant_type=client_credentials"),
                                          ("/t?grant_type=client_credentials&client_id=cid", None)])
def test_request_bytes_are_what_http_client_sends(https, host, port, target, body):
    if https:
        conn = http.client.HTTPSConnection(host, port, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port)
    conn.sock = Capture()
    conn.request("POST", target, body=body, headers=HEADERS)
    assert post_bytes(host, port, conn.default_port, target, HEADERS, body or b"") == conn.sock.sent


@pytest.mark.parametrize("target, headers, error", [("/a b", HEADERS, http.client.InvalidURL),
                                                    ("/t\x7f", HEADERS, http.client.InvalidURL),
                                                    ("/tökén", HEADERS, http.client.InvalidURL),
                                                    ("/t", {**HEADERS, "X-Note": "a\r\nX-Injected: 1"}, ValueError)])
def test_request_that_cannot_be_sent_safely_is_refused_before_sending(pool, target, headers, error):
    with RawServer() as server, pytest.raises(error):
        pool.post(server.url + target, b"x=1", headers, timeout=2, ca_bundle=None, max_body=MAX_BODY)
    assert server.connections == 0


def test_keep_alive_connection_is_reused_and_requests_arrive_whole(pool):
    with RawServer(fixed(), fixed(), fixed()) as server:
        for _ in range(3):
            reply, data = post(pool, server)
            assert reply.status_code == 200 and data == RAW_TOKEN
    assert server.connections == 1
    assert server.requests == [post_bytes("127.0.0.1", server.port, 80, "/t", HEADERS,
                                          b"grant_type=client_credentials")] * 3


def test_token_client_reuses_its_connection():
    with RawServer(fixed(), fixed()) as server:
        client = TokenClient(client_config(server.url + "/t"))
        for _ in range(2):
            token = client.obtain("client_credentials", Credentials(client_id="cid", client_secret=SECRET))
            assert token.access_token == "tok-from-raw-server"
    assert server.connections == 1


def test_chunked_body_arriving_in_pieces_is_reassembled_and_the_connection_reused(pool):
    first, second = RAW_TOKEN[:20], RAW_TOKEN[20:]
    with RawServer(chunked(first, second, trailer="X-Checksum: 1\r\n"), chunked(RAW_TOKEN), piece=7) as server:
        assert post(pool, server)[1] == RAW_TOKEN
        assert post(pool, server)[1] == RAW_TOKEN
    assert server.connections == 1


def test_chunked_body_over_the_cap_is_refused():
    big = b"a" * (MAX_BODY // 2)
    with RawServer(chunked(big, big, big)) as server:
        error = expect_error(TokenClient(client_config(server.url + "/t")))
    assert error.error == "oversized_response"


def test_header_names_are_case_insensitive_and_the_first_of_a_repeated_field_wins(pool):
    answer = fixed(RAW_TOKEN, "x-SEEN: first", "X-Seen: second", "X-Folded: a,", "\tb", "No colon here",
                   "Retry-After: 7")
    with RawServer(answer) as server:
        reply, _ = post(pool, server)
    assert reply.headers.get("X-Seen") == reply.headers.get("x-seen") == "first"
    assert reply.headers.get("x-folded") == "a, b"
    assert reply.headers.get("RETRY-AFTER") == "7"
    assert reply.headers.get("missing", "default") == "default"


def test_retry_after_is_read_whatever_the_case_of_its_name():
    answer = fixed(b'{"error":"slow_down"}', "rEtRy-AfTeR: 7", status="HTTP/1.1 429 Too Many Requests")
    with RawServer(answer) as server:
        error = expect_error(TokenClient(client_config(server.url + "/t")))
    assert error.status == 429 and error.retry_after == 7


@pytest.mark.parametrize("fields, ok", [(99, True), (100, False)])
def test_header_line_count_has_http_clients_limit(pool, fields, ok):
    answer = fixed(RAW_TOKEN, *(f"X-Field-{n}: {n}" for n in range(fields - 1)))  # + Content-Length
    with RawServer(answer) as server:
        if ok:
            assert post(pool, server)[1] == RAW_TOKEN
        else:
            with pytest.raises(http.client.HTTPException, match="more than 100 headers"):
                post(pool, server)


@pytest.mark.parametrize("size, ok", [(65536, True), (65537, False)])
def test_header_line_length_has_http_clients_limit(pool, size, ok):
    answer = fixed(RAW_TOKEN, "X-Long: " + "a" * (size - len("X-Long: \r\n")))
    with RawServer(answer) as server:
        if ok:
            assert post(pool, server)[1] == RAW_TOKEN
        else:
            with pytest.raises(http.client.LineTooLong, match="header line"):
                post(pool, server)


@pytest.mark.parametrize("answer, error", [
    (b"HTTP/1.1 200 " + b"x" * 70000 + b"\r\n\r\n", http.client.LineTooLong),
    (b"HTTP/1.1 200 OK\r\nX-Endless: " + b"x" * 70000, http.client.LineTooLong),
    (b"SPDY/3 200 OK\r\n\r\n", http.client.BadStatusLine),
    (b"HTTP/1.1 20 OK\r\n\r\n", http.client.BadStatusLine),
    (b"HTTP/1.1 OK\r\n\r\n", http.client.BadStatusLine),
    (b"HTTP/2 200\r\n\r\n", http.client.UnknownProtocol),
    (b"", http.client.RemoteDisconnected)])
def test_malformed_status_or_header_is_a_typed_error(pool, answer, error, report):
    with RawServer(answer, answer, hang_up=True) as server:
        with pytest.raises(error):
            post(pool, server)
        failure = expect_error(TokenClient(client_config(server.url + "/t", "query")))
    assert failure.error == "unreachable" and failure.retryable is True
    report.record('malformed status line or header block (overlong line, bad status, unknown protocol)',
                  "typed HTTPException; retryable 'unreachable' error")


@pytest.mark.parametrize("answer", [fixed(RAW_TOKEN)[:-5],
                                    chunked(RAW_TOKEN)[:-10],
                                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 70000])
def test_body_cut_short_or_garbled_is_a_body_error(pool, answer):
    with RawServer(answer, answer, hang_up=True) as server:
        with pytest.raises(BodyError):
            post(pool, server)
        error = expect_error(TokenClient(client_config(server.url + "/t")))
    assert "connection lost while reading the response" in str(error) and error.retryable is True


def test_interim_1xx_responses_are_skipped(pool):
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    with RawServer(interim + fixed(), fixed()) as server:
        reply, data = post(pool, server)
        assert reply.status_code == 200 and data == RAW_TOKEN
        assert post(pool, server)[1] == RAW_TOKEN
    assert server.connections == 1


@pytest.mark.parametrize("answer, hang_up", [
    (fixed(RAW_TOKEN, "Connection: close"), True),
    (fixed(RAW_TOKEN, "Connection: keep-alive, close"), False),
    (fixed(RAW_TOKEN, status="HTTP/1.0 200 OK"), True),
    (b"HTTP/1.1 200 OK\r\n\r\n" + RAW_TOKEN, True),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n" + RAW_TOKEN, True),
    (fixed(RAW_TOKEN) + b"HTTP/1.1 200 OK\r\n", False)])
def test_connection_the_response_does_not_leave_reusable_is_replaced(pool, answer, hang_up):
    with RawServer(answer, fixed(), hang_up=hang_up) as server:
        assert post(pool, server)[1] == RAW_TOKEN
        assert post(pool, server)[1] == RAW_TOKEN
    assert server.connections == 2


def test_http_1_0_keep_alive_response_keeps_the_connection(pool):
    answer = fixed(RAW_TOKEN, "Connection: Keep-Alive", status="HTTP/1.0 200 OK")
    with RawServer(answer, answer) as server:
        post(pool, server)
        post(pool, server)
    assert server.connections == 1


def test_idle_connection_the_server_closed_is_noticed_and_replaced(pool, report):
    with RawServer(fixed(), fixed(), hang_up=True) as server:
        assert post(pool, server)[1] == RAW_TOKEN
        assert server.hung_up.wait(2)
        assert post(pool, server)[1] == RAW_TOKEN
    assert server.connections == 2
    report.record('token endpoint closes an idle keep-alive connection',
                  'noticed before reuse; the next request goes out on a new connection')


# ---- TLS


def self_signed(tmp_path, name):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path):
    cert, key = self_signed(tmp_path, "server")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with LocalServer(token_reply, ssl_context=context) as server:
        server.ca = cert
        yield server


def test_tls_with_the_right_ca_bundle_succeeds(tls_server, report):
    token = TokenClient(client_config(tls_server.url + "/t", ca_bundle=tls_server.ca)).obtain(
        "client_credentials", Credentials(client_id="cid", client_secret=SECRET))
    assert token.access_token == "tok-from-local-server"
    report.record('TLS endpoint signed by the configured CA bundle', 'token obtained')

def test_tls_with_an_unrelated_ca_bundle_fails_verification(tls_server, tmp_path, report):
    other, _ = self_signed(tmp_path, "other")
    error = expect_error(TokenClient(client_config(tls_server.url + "/t", ca_bundle=other)))
    assert "TLS verification failed" in str(error)
    assert tls_server.requests == []  # nothing, credentials least of all, went over the unverified channel
    report.record('TLS endpoint with a certificate outside the configured CA bundle', 'refused (verification on, CA bundle honoured)')

def test_tls_with_a_nonexistent_ca_bundle_is_a_typed_error(tls_server, tmp_path):
    missing = tmp_path / "no-such-ca.pem"
    error = expect_error(TokenClient(client_config(tls_server.url + "/t", ca_bundle=missing)))
    assert "TLS setup failed: cannot load CA bundle" in str(error) and str(missing) in str(error)
    assert "verification" not in str(error) and tls_server.requests == []


# ---- parse_token_response

SENT_AT = 1_800_000_000.0


def parse(payload, sent_at=SENT_AT, default_lifetime=900.0, client="billing-api"):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return parse_token_response(body, client=client, sent_at=sent_at, default_lifetime=default_lifetime)


def make_jwt(exp=None, **claims):
    if exp is not None:
        claims["exp"] = exp
    return jwt.encode({"sub": "svc", **claims}, JWT_KEY, algorithm="HS256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_expires_in_integer():
    token = parse({"access_token": "abc", "token_type": "Bearer", "expires_in": 3600})
    assert token.access_token == "abc"
    assert token.obtained_at == SENT_AT and token.expires_at == SENT_AT + 3600


def test_expires_in_numeric_string():
    assert parse({"access_token": "abc", "expires_in": "3600"}).lifetime == 3600


@pytest.mark.parametrize("given, expected", [("bearer", "Bearer"), ("BEARER", "Bearer"), ("Bearer", "Bearer"),
                                              ("DPoP", "DPoP")])
def test_token_type_bearer_is_case_insensitive(given, expected):
    assert parse({"access_token": "abc", "token_type": given, "expires_in": 60}).token_type == expected


def test_token_type_is_optional():
    assert parse({"access_token": "abc", "expires_in": 60}).token_type == "Bearer"


def test_refresh_token_is_optional():
    assert parse({"access_token": "abc", "expires_in": 60}).refresh_token is None
    assert parse({"access_token": "abc", "expires_in": 60, "refresh_token": "rt1"}).refresh_token == "rt1"


SAILPOINT_RESPONSE = {
    "access_token": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ0ZW5hbnRfaWQiOiI1OGViMDZhNC1kY2Q3LTRlOTYtOGZhYy1jY2EyYWZj"
                    "MDNlNjEiLCJpbnRlcm5hbCI6ZmFsc2UsInBvZCI6ImNvb2siLCJvcmciOiJuZWlsLXRlc3QiLCJpZGVudGl0eV9pZCI6ImZm"
                    "ODA4MTgxNTVmZThjMDgwMTU1ZmU4ZDkyNWIwMzE2IiwidXNlcl9uYW1lIjoic2xwdC5zZXJ2aWNlcyIsInN0cm9uZ19hdXRo"
                    "Ijp0cnVlLCJhdXRob3JpdGllcyI6WyJPUkdfQURNSU4iXSwiZW5hYmxlZCI6dHJ1ZSwiY2xpZW50X2lkIjoiZmNjMGRkYmIt"
                    "MTA1Yy00Y2Q3LWI5NWUtMDI3NmNiZTQ1YjkwIiwiYWNjZXNzVHlwZSI6Ik9GRkxJTkUiLCJzdHJvbmdfYXV0aF9zdXBwb3J0"
                    "ZWQiOmZhbHNlLCJ1c2VyX2lkIjoiNTk1ODI2Iiwic2NvcGUiOlsicmVhZCIsIndyaXRlIl0sImV4cCI6MTU2NTg5MTA2Mywi"
                    "anRpIjoiOTQ5OWIyOTktOTVmYS00N2ZiLTgxNWMtODVkNWY2YjQzZTg2In0.zJYfjIladuGHoLXr92EOJ3A9qGNkiG5UJ9eq"
                    "rtSYXAQ",
    "token_type": "bearer",
    "refresh_token": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ0ZW5hbnRfaWQiOiI1OGViMDZhNC1kY2Q3LTRlOTYtOGZhYy1jY2EyYW"
                     "ZjMDNlNjEiLCJpbnRlcm5hbCI6ZmFsc2UsInBvZCI6ImNvb2siLCJvcmciOiJuZWlsLXRlc3QiLCJpZGVudGl0eV9pZCI6Im"
                     "ZmODA4MTgxNTVmZThjMDgwMTU1ZmU4ZDkyNWIwMzE2IiwidXNlcl9uYW1lIjoic2xwdC5zZXJ2aWNlcyIsInN0cm9uZ19hdX"
                     "RoIjp0cnVlLCJhdXRob3JpdGllcyI6WyJPUkdfQURNSU4iXSwiZW5hYmxlZCI6dHJ1ZSwiY2xpZW50X2lkIjoiZmNjMGRkYm"
                     "ItMTA1Yy00Y2Q3LWI5NWUtMDI3NmNiZTQ1YjkwIiwiWYNjZXNzVHlwZSI6Ik9GRkxJTkUiLCJzdHJvbmdfYXV0aF9zdXBwb3"
                     "J0ZWQiOmZhbHNlLCJ1c2VyX2lkIjoiNTk1ODI2Iiwic2NvcGUiOlsicmVhZCIsIndyaXRlIl0sImF0aSI6Ijk0OTliMjk5LT"
                     "k1ZmEtNDdmYi04MTVjLTg1ZDVmNmI0M2U4NiIsImV4cCI6MTU2NTk3NjcxMywianRpIjoiODliODk1ZDMtNTdlNC00ZDAwLW"
                     "I5ZjctOTFlYWVjNDcxMGQ3In0.pfDcB0sGChdHk-oDNmiIxsKFLxq9CcPQV5-eXWgIcp4",
    "expires_in": 749, "scope": "read write", "accessType": "OFFLINE",
    "tenant_id": "58eb06a4-dcd7-4e96-8fac-cca2afc03e61", "internal": False, "pod": "cook",
    "strong_auth_supported": False, "org": "example", "user_id": "595826",
    "identity_id": "ff80818155fe8c080155fe8d925b0316", "strong_auth": True, "enabled": True,
    "jti": "9499b299-95fa-47fb-815c-85d5f6b43e86",
}


def test_sailpoint_seed_response_extra_fields_are_ignored():
    exp = 1565891063  # the seed JWT's exp; the response was generated expires_in (749 s) before it
    token = parse(SAILPOINT_RESPONSE, sent_at=exp - 749)
    assert jwt_expiry(SAILPOINT_RESPONSE["access_token"]) == exp
    assert token.access_token == SAILPOINT_RESPONSE["access_token"]
    assert token.refresh_token == SAILPOINT_RESPONSE["refresh_token"]
    assert token.token_type == "Bearer"
    assert token.scope == "read write"
    assert token.lifetime == 749


def test_jwt_exp_earlier_than_expires_in_wins():
    token = parse({"access_token": make_jwt(exp=int(SENT_AT) + 300), "expires_in": 3600})
    assert token.expires_at == SENT_AT + 300


def test_expires_in_earlier_than_jwt_exp_wins():
    token = parse({"access_token": make_jwt(exp=int(SENT_AT) + 7200), "expires_in": 600})
    assert token.expires_at == SENT_AT + 600


def test_jwt_without_expires_in_uses_exp():
    token = parse({"access_token": make_jwt(exp=int(SENT_AT) + 1234)}, default_lifetime=60)
    assert token.expires_at == SENT_AT + 1234


def test_neither_expires_in_nor_jwt_exp_uses_default_lifetime():
    assert parse({"access_token": "opaque"}, default_lifetime=900).expires_at == SENT_AT + 900
    assert parse({"access_token": make_jwt()}, default_lifetime=450).expires_at == SENT_AT + 450


def test_lifetime_is_measured_from_sent_at_not_from_parse_time():
    long_ago = 1_000_000_000.0
    token = parse({"access_token": make_jwt(exp=int(long_ago) + 500), "expires_in": 3600}, sent_at=long_ago)
    assert token.obtained_at == long_ago and token.expires_at == long_ago + 500


def test_jwt_with_alg_none_does_not_crash(report):
    token_value = b64(b'{"alg":"none","typ":"JWT"}') + "." + b64(json.dumps({"exp": SENT_AT + 100}).encode()) + "."
    token = parse({"access_token": token_value, "expires_in": 3600})
    assert 0 < token.lifetime <= 3600
    report.record('JWT access token with alg none', 'no crash; a token whose lifetime is positive and no longer than expires_in')

def test_jwt_with_garbage_signature_still_gives_its_exp(report):
    header, payload, _ = make_jwt(exp=int(SENT_AT) + 100).split(".")
    token = parse({"access_token": f"{header}.{payload}.bm90LWEtc2lnbmF0dXJl", "expires_in": 3600})
    assert token.lifetime == 100  # we are not the token's audience: exp is read, the signature is not checked
    report.record('JWT with a garbage signature', 'exp read without trusting the signature; no crash')

@pytest.mark.parametrize("exp", ["tomorrow", None, True, [1], {"at": 1}, 10 ** 400])
def test_jwt_with_non_numeric_exp_falls_back(exp, report):
    token_value = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(b'{"exp":' + json.dumps(exp).encode() + b"}") \
        + ".c2ln"
    assert parse({"access_token": token_value, "expires_in": 3600}).lifetime == 3600
    assert parse({"access_token": token_value}, default_lifetime=77).lifetime == 77
    report.record('JWT with a non-numeric exp', 'lifetime from expires_in or the default; no crash')

def test_jwt_with_exp_in_the_past_is_a_typed_error():
    with pytest.raises(TokenEndpointError) as info:
        parse({"access_token": make_jwt(exp=int(SENT_AT) - 10), "expires_in": 3600})
    assert info.value.error == "malformed_response"
    assert "billing-api" in str(info.value)


@pytest.mark.parametrize("header", [b'{"alg": broken', b'{"alg":"HS256"}}}', b'{"alg":"HS256","typ":"JWT"',
                                    b'{"a\xff\xfe":1}'])
def test_jwt_with_a_header_that_is_not_json_falls_back(header):
    token_value = b64(header) + "." + b64(json.dumps({"exp": SENT_AT + 5}).encode()) + ".c2ln"
    assert token_value.startswith("eyJ")  # looks like a JWT, so the client does try to read it
    assert parse({"access_token": token_value, "expires_in": 3600}).lifetime == 3600


def test_jwt_with_a_payload_that_is_not_a_json_object_falls_back():
    token_value = b64(b'{"alg":"HS256"}') + "." + b64(b"[1,2,3]") + ".c2ln"
    assert parse({"access_token": token_value, "expires_in": 3600}).lifetime == 3600


@pytest.mark.parametrize("expires_in", [0, -5, "abc", "", "1e3x", True, [3600], {"s": 1}, float("nan"), 10 ** 400])
def test_unusable_expires_in_is_a_typed_error(expires_in):
    with pytest.raises(TokenEndpointError) as info:
        parse({"access_token": "abc", "expires_in": expires_in})
    assert info.value.error == "malformed_response"
    assert "expires_in" in str(info.value)


@pytest.mark.parametrize("expires_in", [10 ** 12, "99999999999", 1e300])
def test_huge_expires_in_is_clamped(expires_in):
    assert parse({"access_token": "abc", "expires_in": expires_in}).lifetime == MAX_LIFETIME


def test_expires_in_null_is_treated_as_absent():
    assert parse({"access_token": "abc", "expires_in": None}, default_lifetime=321).lifetime == 321


@pytest.mark.parametrize("body", [b"", b"null", b"[]", b'"token"', b"{", b"\xff\xfe", b"[" * 50000,
                                  b'{"access_token": ""}', b'{"access_token": 5}', b'{"access_token": "a b"}',
                                  b'{"access_token": "abc", "refresh_token": 7}',
                                  b'{"access_token": "abc", "token_type": "x\\ny"}'])
def test_malformed_bodies_are_typed_errors(body):
    with pytest.raises(TokenEndpointError) as info:
        parse(body)
    assert info.value.error == "malformed_response" and info.value.retryable is True


# ---- fuzz: a usable Token, or a typed error naming the client and never the token

MARK = "Zq7xMARKx"
FUZZ_CLIENT = "fuzz-client"
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=2)
                           | st.dictionaries(st.text(max_size=4), children, max_size=2), max_leaves=4)
marked_text = st.builds(lambda a, b: a + MARK + b, st.text(max_size=6), st.text(max_size=6))
jwt_tokens = st.builds(
    lambda header, claims, sig: b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode()) + "." + sig,
    st.sampled_from([{"alg": "HS256", "typ": "JWT"}, {"alg": "none"}, [], "x", {"alg": {"a": 1}}]),
    st.one_of(st.builds(lambda exp: {"exp": exp}, st.integers(int(SENT_AT) - 100, int(SENT_AT) + 10 ** 9) | scalars),
              json_values),
    st.builds(lambda s: MARK + s, st.text(alphabet="abcXYZ-_", max_size=6)))
numeric_strings = st.builds(lambda pad, sign, number: f"{pad}{sign}{number}{pad}", st.sampled_from(["", " ", "\t"]),
                            st.sampled_from(["", "-", "+"]), st.integers(0, 10 ** 20) | st.floats(0, 1e20))
lifetimes = st.one_of(st.integers(), st.floats(), numeric_strings, scalars)
responses = st.builds(
    lambda extra, base: {**extra, **base},
    st.dictionaries(st.text(max_size=6), scalars, max_size=2),
    st.fixed_dictionaries({}, optional={"access_token": st.one_of(marked_text, jwt_tokens, json_values),
                                        "token_type": st.one_of(st.sampled_from(["bearer", "Bearer", "MAC"]), scalars),
                                        "expires_in": lifetimes,
                                        "refresh_token": st.one_of(marked_text, scalars),
                                        "scope": scalars}))
bodies = st.one_of(responses.map(lambda data: json.dumps(data).encode()), st.binary(max_size=120))


@pytest.mark.security(threat="hostile or slow provider", claim="Any token response body (2,000 generated ones) gives "
                                                               "a token or a one-line typed error that names the "
                                                               "client and echoes nothing.")
def test_fuzzed_responses_give_a_token_or_a_typed_error(report):
    cases = []

    @hsettings(max_examples=2000, deadline=None)
    @given(body=bodies, default_lifetime=st.floats(1, 10 ** 6))
    def check(body, default_lifetime):
        cases.append(1)
        try:
            token = parse_token_response(body, client=FUZZ_CLIENT, sent_at=SENT_AT, default_lifetime=default_lifetime)
        except TokenEndpointError as error:
            assert FUZZ_CLIENT in str(error)
            assert MARK not in str(error)
            assert "\n" not in str(error)
        else:
            assert isinstance(token.access_token, str) and token.access_token
            assert token.obtained_at == SENT_AT
            assert token.expires_at > SENT_AT
            assert token.lifetime <= max(MAX_LIFETIME, default_lifetime)

    check()
    report.record('hypothesis: arbitrary token-response bodies (bytes, JSON, hostile JWTs)', 'always a Token with a future expiry or a one-line typed error naming the client; never a crash', cases=len(cases))




# ---- parse_token_response and friends: exact errors and boundaries (kills the mutants that
# scripts/mutation found surviving; docs/testing.md)

from tokensmith.redact import Redactor  # noqa: E402
from tokensmith.tokenclient import _describe, _number, parse_retry_after  # noqa: E402


@pytest.mark.parametrize("body, message", [
    (b"{", "body is not JSON"),
    (b"[1]", "body is not a JSON object"),
    (b'{"token_type": "Bearer"}', "access_token is missing"),
    (b'{"access_token": "a b"}', "access_token holds characters a token cannot have"),
    (b'{"access_token": "abc", "token_type": 7}', "token_type is not one of Bearer, DPoP, N_A, MAC"),
    (b'{"access_token": "abc", "token_type": "Bearerx"}', "token_type is not one of Bearer, DPoP, N_A, MAC"),
    (b'{"access_token": "abc", "refresh_token": 7}', "refresh_token is not a token string"),
    (b'{"access_token": "abc", "expires_in": "soon"}', "expires_in is not a number"),
    (b'{"access_token": "abc", "expires_in": 0.5}', "expires_in is under one second"),
])
def test_a_malformed_response_names_client_and_field_in_one_line(body, message):
    with pytest.raises(TokenEndpointError) as info:
        parse(body)
    assert str(info.value) == f"client billing-api: malformed token response: {message}"
    assert info.value.error == "malformed_response" and info.value.retryable is True


def test_an_expired_jwt_error_says_to_check_the_clocks():
    with pytest.raises(TokenEndpointError) as info:
        parse({"access_token": make_jwt(exp=int(SENT_AT))})  # exp == sent_at is already expired
    assert str(info.value) == ("client billing-api: malformed token response: access_token is a JWT that has "
                               "already expired (check the clocks)")


def test_size_limits_are_inclusive():
    assert parse({"access_token": "a" * 16384}).access_token == "a" * 16384
    with pytest.raises(TokenEndpointError):
        parse({"access_token": "a" * 16385})


@pytest.mark.parametrize("sent, kept", [("bearer", "Bearer"), ("BEARER", "Bearer"), ("dpop", "DPoP"),
                                        ("n_a", "N_A"), ("Mac", "MAC")])
def test_token_type_is_taken_case_insensitively_and_spelt_the_standard_way(sent, kept):
    assert parse({"access_token": "abc", "token_type": sent}).token_type == kept


def test_one_second_is_the_shortest_lifetime_taken():
    assert parse({"access_token": "abc", "expires_in": 1}).lifetime == 1
    assert parse({"access_token": "abc", "expires_in": 1.5}).lifetime == 1.5


def test_a_scope_that_is_not_a_string_is_dropped():
    assert parse({"access_token": "abc", "scope": ["read"]}).scope is None
    assert parse({"access_token": "abc", "scope": "read write"}).scope == "read write"


def test_expires_in_takes_only_ascii_digits():
    with pytest.raises(TokenEndpointError, match="expires_in is not a number"):
        parse({"access_token": "abc", "expires_in": "\u0663\u0666\u0660\u0660"})  # Arabic-Indic 3600


def test_numbers_too_big_for_a_float_are_not_numbers():
    assert _number(2 ** 1023) is None and _number(2 ** 1024 - 1) is None
    assert _number(2 ** 1022) == float(2 ** 1022)


@pytest.mark.parametrize("claims", [{"nbf": SENT_AT + 10 ** 6}, {"iat": SENT_AT + 10 ** 6}, {"aud": "someone-else"}])
def test_jwt_claims_we_are_not_the_audience_for_are_not_checked(claims):
    """nbf, iat and aud are for the resource server; only exp is read, and it still counts."""
    token = parse({"access_token": make_jwt(exp=int(SENT_AT) + 100, **claims), "expires_in": 3600})
    assert token.lifetime == 100


def test_retry_after_is_capped_at_an_hour_and_never_negative():
    now = 1_800_000_000.0
    assert parse_retry_after("7200", now) == 3600.0 and parse_retry_after("3599", now) == 3599.0
    assert parse_retry_after(formatdate(now + 7200, usegmt=True), now) == 3600.0
    assert parse_retry_after(formatdate(now - 60, usegmt=True), now) == 0.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == 30.0


def test_describe_redacts_secrets_and_token_like_words_and_keeps_one_short_line():
    assert _describe("bad secret s3cr3t here", Redactor(["s3cr3t"])) == "bad secret [redacted] here"
    assert _describe("token abcdefghijklmnopqrstuvwxyz0123 seen", Redactor([])) == "token [redacted] seen"
    assert _describe("two\nlines\x00", Redactor([])) == "two lines "
    assert _describe("word " * 100, Redactor([])) == ("word " * 40)[:200]

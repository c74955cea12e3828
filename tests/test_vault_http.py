"""What VaultClient owns now that it speaks Vault's HTTP API itself: the login-again-and-repeat-once rule,
the headers on every request, the status -> retryable mapping, keep-alive reuse and redirects. Against a
loopback stand-in that records every request (real OpenBao cannot be made to deny exactly once)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tokensmith.config import VaultConfig
from tokensmith.errors import SinkError, SourceError, StateError
from tokensmith.vault import VaultClient

CLIENT = "billing-api"
SECRET_ID = "secret-id-4f1b2a9c"
APPROLE = {"method": "approle", "role_id": "role-1", "secret_id": SECRET_ID}
KV = {"data": {"data": {"client_id": "cid"}, "metadata": {"version": 3}}}


class FakeVault:
    """Answers each request with answer(method, path, body) -> (status, document[, headers]); records
    (method, path, headers with lowercase names, body) and counts TCP connections."""

    def __init__(self, answer):
        self.answer = answer
        self.requests: list[tuple[str, str, dict, dict | None]] = []
        self.connections = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                fake.connections += 1

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status, document, *extra = fake.answer(self.command, self.path, body)
                data = document if isinstance(document, bytes) else json.dumps(document).encode()
                self.send_response(status)
                for name, value in (extra[0] if extra else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def calls(self) -> list[tuple[str, str, str | None]]:
        """(method, path, token sent) of every request."""
        return [(method, path, headers.get("x-vault-token")) for method, path, headers, _ in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def peer(request):
    made = []

    def make(answer) -> FakeVault:
        made.append(FakeVault(answer))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


def logins_and(read):
    """Logins answer tok-1, tok-2, ...; everything else goes to read(method, path, body, token number)."""
    issued = []

    def answer(method, path, body):
        if path.endswith("/login"):
            issued.append(1)
            return 200, {"auth": {"client_token": f"tok-{len(issued)}"}}
        return read(method, path, body, len(issued))
    return answer


def client(fake: FakeVault, auth=None, **extra) -> VaultClient:
    return VaultClient(VaultConfig(address=fake.url, timeout=2, auth=auth or APPROLE, **extra))


def test_a_denied_call_logs_in_again_and_is_repeated_once(peer):
    fake = peer(logins_and(lambda method, path, body, token: (200, KV) if token == 2
                           else (403, {"errors": ["permission denied"]})))
    assert client(fake).read_kv("secret", "app", 2, client=CLIENT) == {"client_id": "cid"}
    assert fake.calls() == [("POST", "/v1/auth/approle/login", None), ("GET", "/v1/secret/data/app", "tok-1"),
                            ("POST", "/v1/auth/approle/login", None), ("GET", "/v1/secret/data/app", "tok-2")]
    assert fake.requests[0][3] == {"role_id": "role-1", "secret_id": SECRET_ID}


def test_a_denial_after_logging_in_again_is_an_error_not_a_loop(peer):
    denied = {"errors": ["1 error occurred: permission denied"]}
    fake = peer(logins_and(lambda method, path, body, token: (403, denied)))
    with pytest.raises(SourceError) as caught:
        client(fake).read_kv("secret", "app", 2, client=CLIENT)
    assert not caught.value.retryable
    assert str(caught.value) == f"client {CLIENT}: vault secret secret/app: permission denied (HTTP 403)"
    assert [path for _, path, _ in fake.calls()] == ["/v1/auth/approle/login", "/v1/secret/data/app"] * 2


def test_a_literal_token_that_is_denied_is_not_tried_again(peer):
    fake = peer(lambda method, path, body: (403, {"errors": ["permission denied"]}))
    with pytest.raises(SourceError, match="permission denied"):
        client(fake, {"method": "token", "token": "literal-token"}).read_kv("secret", "app", 2, client=CLIENT)
    assert fake.calls() == [("GET", "/v1/secret/data/app", "literal-token")]


def test_every_request_carries_the_namespace_and_kv2_requests_the_latest_storage_index(peer):
    def read(method, path, body, token):
        if method == "POST":
            return 200, {"data": {"version": 1}}, {"X-Vault-Index": "index-after-write"}
        if "list=true" in path:
            return 200, {"data": {"keys": ["a", "b/"]}}
        return 200, KV

    fake = peer(logins_and(read))
    vault = client(fake, namespace="team-a")
    assert vault.kv2_put("secret", "state/a", {"v": 1}, 0, error_cls=StateError) == (1, "index-after-write")
    assert vault.kv2_get("secret", "state/a", error_cls=StateError) == ({"client_id": "cid"}, 3, None)
    assert vault.kv2_list("secret", "state", error_cls=StateError) == ["a", "b/"]
    assert all(headers.get("x-vault-namespace") == "team-a" for _, _, headers, _ in fake.requests)
    login, put, get, listing = fake.requests
    assert "x-vault-token" not in login[2] and put[3] == {"options": {"cas": 0}, "data": {"v": 1}}
    assert "x-vault-index" not in put[2]  # nothing written yet
    for _, _, headers, _ in (get, listing):
        assert headers["x-vault-index"] == "index-after-write"
        assert headers["x-vault-inconsistent"] == "forward-active-node"
    assert listing[1] == "/v1/secret/metadata/state?list=true"


@pytest.mark.parametrize("status, retryable", [(500, True), (502, True), (503, True), (504, True), (429, True),
                                               (412, True), (400, False), (405, False), (403, False)])
def test_server_errors_and_throttling_are_retryable_client_errors_are_not(peer, status, retryable):
    fake = peer(lambda method, path, body: (status, {"errors": ["something the server said"]}))
    with pytest.raises(SinkError) as caught:
        client(fake, {"method": "token", "token": "t"}).write_kv2("secret", "out", {"a": "b"}, cas=0, client=CLIENT)
    assert caught.value.retryable is retryable and f"(HTTP {status})" in str(caught.value)
    assert "something the server said" not in str(caught.value)


@pytest.mark.security(threat="hostile secret store", claim="A Vault error that echoes the request (a secret ID, "
                      "a written token) is reported by its status only, never with its text.")
def test_error_text_that_echoes_the_request_is_not_repeated(peer):
    fake = peer(lambda method, path, body: (400, {"errors": [f"invalid secret_id {SECRET_ID!r} for role"]}))
    with pytest.raises(SourceError) as caught:
        client(fake).read_kv("secret", "app", 2, client=CLIENT)
    message = str(caught.value)
    assert SECRET_ID not in message and not caught.value.retryable
    assert message == f"client {CLIENT}: vault approle login at auth/approle: Bad Request (HTTP 400)"


def test_calls_share_one_keep_alive_connection(peer):
    fake = peer(logins_and(lambda method, path, body, token: (200, KV)))
    vault = client(fake)
    for _ in range(5):
        vault.read_kv("secret", "app", 2, client=CLIENT)
    assert len(fake.requests) == 6 and fake.connections == 1


def test_a_redirect_to_the_active_node_is_followed_with_the_token(peer):
    active = peer(lambda method, path, body: (200, KV))
    standby = peer(lambda method, path, body: (307, {}, {"Location": f"{active.url}{path}"}))
    vault = client(standby, {"method": "token", "token": "t"})
    assert vault.read_kv("secret", "app", 2, client=CLIENT) == {"client_id": "cid"}
    assert standby.calls() == active.calls() == [("GET", "/v1/secret/data/app", "t")]


def test_an_answer_without_a_client_token_is_a_login_error(peer):
    fake = peer(lambda method, path, body: (200, {"auth": None}))
    with pytest.raises(SourceError, match="approle login at auth/approle: the answer holds no client token") as caught:
        client(fake).read_kv("secret", "app", 2, client=CLIENT)
    assert not caught.value.retryable

"""The development OAuth2 server, over real HTTP on loopback."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote_plus

import jwt as pyjwt
import pytest
import requests

from tokensmith.devserver import OAuthServer

SEED_MESSAGE = "The authorization grant type ' ' is not supported by the authorization server"
DAEMON_DIR = Path(__file__).resolve().parent.parent / "daemon"


class Clock:
    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make_server(clock):
    servers = []

    def make(**kwargs):
        kwargs.setdefault("clock", clock)
        server = OAuthServer(**kwargs).start()
        servers.append(server)
        server.add_client("basic-id", "basic-secret", dialect="basic")
        server.add_client("post-id", "post-secret", dialect="post", users={"alice": "wonderland"})
        server.add_client("json-id", "json-secret", dialect="json", users={"alice": "wonderland"})
        server.add_client("query-id", "query-secret", dialect="query")
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server):
    return make_server()


def basic_header(client_id, secret):
    """RFC 6749 §2.3.1: form-encode id and secret, then base64 "id:secret"."""
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def get_token(server, dialect, grant="client_credentials", **params):
    """A token request in the dialect's own shape; returns the response."""
    params = {"grant_type": grant, **params}
    if dialect == "basic":
        return requests.post(server.token_url, data=params, headers=basic_header("basic-id", "basic-secret"))
    creds = {"client_id": f"{dialect}-id", "client_secret": f"{dialect}-secret"}
    if dialect == "post":
        return requests.post(server.token_url, data={**params, **creds})
    if dialect == "json":
        return requests.post(server.token_url, json={**params, **creds})
    return requests.post(server.token_url, params={**params, **creds})


def resource(server, token):
    return requests.get(server.resource_url, headers={"Authorization": f"Bearer {token}"})


def form_auth(dialect):
    return {"client_id": f"{dialect}-id", "client_secret": f"{dialect}-secret"}


# --- issuing in each dialect


@pytest.mark.parametrize("dialect, grant, extra, token_type, has_refresh", [
    ("basic", "client_credentials", {}, "Bearer", False),
    ("post", "password", {"username": "alice", "password": "wonderland"}, "Bearer", True),
    ("post", "client_credentials", {}, "Bearer", False),
    ("json", "client_credentials", {}, "Bearer", True),
    ("json", "password", {"username": "alice", "password": "wonderland"}, "Bearer", True),
    ("query", "client_credentials", {}, "bearer", False),
])
def test_each_dialect_issues_a_working_token(server, dialect, grant, extra, token_type, has_refresh):
    response = get_token(server, dialect, grant, **extra)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert body["token_type"] == token_type
    assert body["expires_in"] == 3600
    assert ("refresh_token" in body) == has_refresh
    assert len(body["access_token"]) == 32 and int(body["access_token"], 16) >= 0
    assert server.is_active(body["access_token"])
    ok = resource(server, body["access_token"])
    assert ok.status_code == 200 and ok.json() == {"ok": True, "client_id": f"{dialect}-id"}
    assert server.issued_tokens(f"{dialect}-id") == [body["access_token"]]
    assert server.stats["issued"] == 1 and server.stats["token_requests"] == 1


def test_query_dialect_answers_like_sailpoint(server):
    body = get_token(server, "query").json()
    for field in ("tenant_id", "pod", "org", "strong_auth", "authorities", "scope", "jti"):
        assert field in body
    assert body["client_id"] == "query-id"
    assert "user_name" not in body and "identity_id" not in body  # no user context for client credentials
    assert requests.post(server.token_url, params={"grant_type": "CLIENT_CREDENTIALS",
                                                   **form_auth("query")}).status_code == 200


def test_query_dialect_password_grant_carries_the_user(server):
    server.add_client("q2", "s2", dialect="query", users={"bob": "pw"})
    body = requests.post(server.token_url, params={"grant_type": "password", "client_id": "q2", "client_secret": "s2",
                                                   "username": "bob", "password": "pw"}).json()
    assert body["user_name"] == "bob" and len(body["identity_id"]) == 32 and "refresh_token" in body


# --- dialect errors


def test_post_dialect_with_json_body_gets_the_seed_error(server):
    response = requests.post(server.token_url, json={"grant_type": "password", **form_auth("post"),
                                                     "username": "alice", "password": "wonderland"})
    assert response.status_code == 400
    assert response.json() == {"error": "unsupported_grant_type", "error_description": SEED_MESSAGE}


def test_post_dialect_with_parameters_outside_the_body_gets_the_seed_error(server):
    response = requests.post(server.token_url, params={"grant_type": "client_credentials", **form_auth("post")})
    assert response.status_code == 400 and response.json()["error_description"] == SEED_MESSAGE


def test_post_dialect_bad_secret_is_400_invalid_client(server):
    response = requests.post(server.token_url, data={"grant_type": "client_credentials", "client_id": "post-id",
                                                     "client_secret": "nope"})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_client"
    assert "WWW-Authenticate" not in response.headers
    assert server.stats["invalid_client"] == 1 and server.stats["issued"] == 0


@pytest.mark.parametrize("headers", [
    basic_header("basic-id", "wrong"),
    basic_header("nobody", "basic-secret"),
    {"Authorization": "Basic !!!not-base64"},
    {},
])
def test_basic_dialect_bad_credentials_is_401(server, headers):
    data = {"grant_type": "client_credentials"}
    if not headers:
        data.update(form_auth("basic"))  # credentials in the body are not what this provider accepts
    response = requests.post(server.token_url, data=data, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert response.json()["error"] == "invalid_client"
    assert server.stats["invalid_client"] == 1


def test_basic_credentials_are_form_encoded_before_base64(server):
    server.add_client("id with space", "s3cr+t:%/é", dialect="basic")
    data = {"grant_type": "client_credentials"}
    response = requests.post(server.token_url, data=data, headers=basic_header("id with space", "s3cr+t:%/é"))
    assert response.status_code == 200, response.text
    # requests' own auth= does not form-encode, so a "+" in the secret arrives as a space
    raw = requests.post(server.token_url, data=data, auth=("id with space", "s3cr+t:%/é"))
    assert raw.status_code == 401


def test_json_dialect_rejects_malformed_json(server):
    response = requests.post(server.token_url, data=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"


@pytest.mark.parametrize("dialect", ["basic", "post", "json", "query"])
def test_unknown_grant_type_is_unsupported(server, dialect):
    response = get_token(server, dialect, "authorization_code", code="xyz")
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "unsupported_grant_type"
    assert "'authorization_code'" in body["error_description"]


@pytest.mark.parametrize("username, password", [("alice", "wrong"), ("mallory", "wonderland"), (None, None)])
def test_password_grant_with_bad_user_is_invalid_grant(server, username, password):
    extra = {k: v for k, v in {"username": username, "password": password}.items() if v is not None}
    response = get_token(server, "post", "password", **extra)
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"


def test_token_endpoint_wants_post_and_unknown_paths_are_404(server):
    assert requests.get(server.token_url).status_code == 405
    assert requests.get(server.url + "/nope").status_code == 404


def test_oversized_body_is_refused(server):
    response = requests.post(server.token_url, data=b"x" * (64 * 1024 + 1),
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 413


# --- token lifecycle


def test_a_new_credential_grant_leaves_the_previous_token_valid(server):
    first = get_token(server, "basic").json()["access_token"]
    second = get_token(server, "basic").json()["access_token"]
    assert first != second
    assert resource(server, first).status_code == 200
    assert resource(server, second).status_code == 200
    assert server.issued_tokens("basic-id") == [first, second]


def test_refresh_revokes_the_old_access_token_and_cannot_be_reused(server):
    old = get_token(server, "post", "password", username="alice", password="wonderland").json()
    new = get_token(server, "post", "refresh_token", refresh_token=old["refresh_token"])
    assert new.status_code == 200, new.text
    new = new.json()
    assert new["refresh_token"] != old["refresh_token"]
    assert resource(server, old["access_token"]).status_code == 401
    assert resource(server, new["access_token"]).status_code == 200
    assert server.stats["refresh_exchanges"] == 1

    again = get_token(server, "post", "refresh_token", refresh_token=old["refresh_token"])
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    assert server.stats["refresh_reuse"] == 1
    assert resource(server, new["access_token"]).status_code == 200  # reuse does not kill the new pair

    newest = get_token(server, "post", "refresh_token", refresh_token=new["refresh_token"])
    assert newest.status_code == 200
    assert server.issued_tokens("post-id") == [old["access_token"], new["access_token"],
                                               newest.json()["access_token"]]


def test_refresh_in_json_dialect_returns_a_fresh_refresh_token(server):
    first = get_token(server, "json").json()
    second = get_token(server, "json", "refresh_token", refresh_token=first["refresh_token"]).json()
    assert second["refresh_token"] != first["refresh_token"]
    assert not server.is_active(first["access_token"]) and server.is_active(second["access_token"])


def test_refresh_token_belongs_to_the_client_that_got_it(server):
    server.add_client("other", "other-secret", users={"alice": "wonderland"})
    token = get_token(server, "post", "password", username="alice", password="wonderland").json()
    response = requests.post(server.token_url, data={"grant_type": "refresh_token", "client_id": "other",
                                                     "client_secret": "other-secret",
                                                     "refresh_token": token["refresh_token"]})
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
    assert server.is_active(token["access_token"])


def test_unknown_refresh_token_is_invalid_grant(server):
    response = get_token(server, "post", "refresh_token", refresh_token="never-issued")
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
    assert server.stats["refresh_reuse"] == 0


def test_expiry_follows_the_injected_clock(make_server, clock):
    server = make_server(access_lifetime=100, refresh_lifetime=1000)
    token = get_token(server, "post", "password", username="alice", password="wonderland").json()
    assert token["expires_in"] == 100
    clock.advance(99)
    assert resource(server, token["access_token"]).status_code == 200
    clock.advance(1)
    assert not server.is_active(token["access_token"])
    expired = resource(server, token["access_token"])
    assert expired.status_code == 401 and expired.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    clock.advance(900)
    response = get_token(server, "post", "refresh_token", refresh_token=token["refresh_token"])
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
    assert "expired" in response.json()["error_description"]


def test_per_client_access_lifetime(server):
    server.add_client("short", "s", dialect="post", access_lifetime=60)
    body = requests.post(server.token_url, data={"grant_type": "client_credentials", "client_id": "short",
                                                 "client_secret": "s"}).json()
    assert body["expires_in"] == 60


def test_secret_reset_locks_out_the_old_secret_but_keeps_tokens(server):
    token = get_token(server, "post").json()["access_token"]
    server.set_client_secret("post-id", "rotated")
    assert get_token(server, "post").json()["error"] == "invalid_client"
    response = requests.post(server.token_url, data={"grant_type": "client_credentials", "client_id": "post-id",
                                                     "client_secret": "rotated"})
    assert response.status_code == 200
    assert server.is_active(token)


def test_refresh_tokens_can_be_switched_off(make_server):
    server = make_server(issue_refresh_tokens=False)
    assert "refresh_token" not in get_token(server, "post", "password", username="alice", password="wonderland").json()
    assert "refresh_token" not in get_token(server, "json").json()


def test_expires_in_as_string(make_server):
    server = make_server(expires_in_as_string=True, access_lifetime=43199)
    assert get_token(server, "post").json()["expires_in"] == "43199"


def test_jwt_access_tokens_carry_exp_matching_the_lifetime(make_server, clock):
    server = make_server(jwt=True, access_lifetime=749)
    body = get_token(server, "query").json()
    claims = pyjwt.decode(body["access_token"], server.jwt_key, algorithms=["HS256"],
                          options={"verify_exp": False})
    assert claims["exp"] - claims["iat"] == 749 == body["expires_in"]
    assert claims["iat"] == int(clock.now)
    assert claims["client_id"] == "query-id" and claims["jti"] == body["jti"]
    assert pyjwt.get_unverified_header(body["access_token"])["alg"] == "HS256"
    assert resource(server, body["access_token"]).status_code == 200


def test_resource_without_bearer_is_401(server):
    response = requests.get(server.resource_url)
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"


# --- revocation and introspection


def test_revoke_an_access_token(server):
    token = get_token(server, "post").json()["access_token"]
    response = requests.post(server.revocation_url, data={"token": token, "token_type_hint": "access_token",
                                                          **form_auth("post")})
    assert response.status_code == 200
    assert not server.is_active(token)
    assert server.stats["revocations"] == 1


def test_revoking_a_refresh_token_revokes_its_access_token(server):
    token = get_token(server, "post", "password", username="alice", password="wonderland").json()
    other = get_token(server, "post").json()["access_token"]
    response = requests.post(server.revocation_url, data={"token": token["refresh_token"]},
                             headers=basic_header("post-id", "post-secret"))
    assert response.status_code == 200
    assert not server.is_active(token["access_token"])
    assert server.is_active(other)
    reuse = get_token(server, "post", "refresh_token", refresh_token=token["refresh_token"])
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
    assert server.stats["refresh_reuse"] == 0  # revoked, not spent


def test_revoke_unknown_or_foreign_token_is_200_and_changes_nothing(server):
    foreign = get_token(server, "basic").json()["access_token"]
    for token in ("never-issued", foreign):
        response = requests.post(server.revocation_url, data={"token": token, **form_auth("post")})
        assert response.status_code == 200
    assert server.is_active(foreign)


def test_revoke_and_introspect_need_client_authentication(server):
    token = get_token(server, "post").json()["access_token"]
    for url in (server.revocation_url, server.introspection_url):
        bad_form = requests.post(url, data={"token": token, "client_id": "post-id", "client_secret": "x"})
        assert bad_form.status_code == 400 and bad_form.json()["error"] == "invalid_client"
        bad_basic = requests.post(url, data={"token": token}, headers=basic_header("post-id", "x"))
        assert bad_basic.status_code == 401 and "WWW-Authenticate" in bad_basic.headers
        missing = requests.post(url, data=form_auth("post"))
        assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"
    assert server.is_active(token)
    assert server.stats["invalid_client"] == 4


def test_introspection(server, clock):
    token = get_token(server, "post", "password", username="alice", password="wonderland").json()

    def introspect(value):
        response = requests.post(server.introspection_url, data={"token": value},
                                 headers=basic_header("basic-id", "basic-secret"))
        assert response.status_code == 200
        return response.json()

    assert introspect(token["access_token"]) == {"active": True, "client_id": "post-id",
                                                 "exp": int(clock.now) + 3600, "token_type": "access_token"}
    assert introspect(token["refresh_token"])["token_type"] == "refresh_token"
    assert introspect("never-issued") == {"active": False}
    clock.advance(3600)
    assert introspect(token["access_token"]) == {"active": False}
    assert server.stats["introspections"] == 4


# --- injected faults


def test_fail_next_default_is_503_then_normal(server):
    server.fail_next(2)
    for _ in range(2):
        response = get_token(server, "post")
        assert response.status_code == 503
        assert response.json()["error"] == "temporarily_unavailable"
    assert get_token(server, "post").status_code == 200
    assert server.stats["token_requests"] == 3 and server.stats["issued"] == 1


def test_fail_next_429_with_retry_after(server):
    server.fail_next(status=429, headers={"Retry-After": "2"})
    response = get_token(server, "basic")
    assert response.status_code == 429 and response.headers["Retry-After"] == "2"


def test_fail_next_non_json_and_missing_access_token(server):
    server.fail_next(status=200, body=b"not json")
    server.fail_next(status=200, body=b'{"token_type":"bearer"}')
    response = get_token(server, "post")
    assert response.status_code == 200 and response.content == b"not json"
    with pytest.raises(ValueError):
        response.json()
    assert get_token(server, "post").json() == {"token_type": "bearer"}
    assert server.stats["issued"] == 0


def test_fail_next_delay(server, capfd):
    server.fail_next(status=503, delay=0.3)
    with pytest.raises(requests.Timeout):
        requests.post(server.token_url, data={"grant_type": "client_credentials", **form_auth("post")}, timeout=0.1)
    server.fail_next(status=None, delay=0.3)  # slow but successful
    started = time.monotonic()
    response = get_token(server, "post")
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200 and server.is_active(response.json()["access_token"])
    # by now the first answer met a closed socket: no traceback, no request log
    assert capfd.readouterr().err == ""


def test_fail_next_close_connection(server):
    server.fail_next(close_connection=True)
    with pytest.raises(requests.ConnectionError):
        get_token(server, "post")
    assert get_token(server, "post").status_code == 200


def test_faults_only_hit_the_token_endpoint(server):
    token = get_token(server, "post").json()["access_token"]
    server.fail_next()
    assert resource(server, token).status_code == 200
    assert get_token(server, "post").status_code == 503


# --- server lifecycle and concurrency


def test_concurrent_requests_are_counted_exactly(server):
    tokens, errors = [], []

    def worker():
        with requests.Session() as session:
            for _ in range(20):
                response = session.post(server.token_url, data={"grant_type": "client_credentials",
                                                                **form_auth("post")})
                (tokens if response.status_code == 200 else errors).append(response.json().get("access_token"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(tokens)) == 160
    assert server.stats["issued"] == server.stats["token_requests"] == 160
    assert len(server.issued_tokens("post-id")) == 160


def test_stop_drops_keep_alive_connections(clock):
    server = OAuthServer(clock=clock).start()
    server.add_client("c", "s")
    with requests.Session() as session:
        data = {"grant_type": "client_credentials", "client_id": "c", "client_secret": "s"}
        assert session.post(server.token_url, data=data).status_code == 200
        server.stop()
        with pytest.raises(requests.ConnectionError):
            session.post(server.token_url, data=data, timeout=2)
    server.stop()  # idempotent


def test_context_manager_and_urls():
    with OAuthServer() as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert server.token_url == server.url + "/oauth2/token"
        assert server.revocation_url == server.url + "/oauth2/revoke"
        assert server.introspection_url == server.url + "/oauth2/introspect"
        assert server.resource_url == server.url + "/resource"
        with pytest.raises(ValueError):
            server.add_client("x", "y", dialect="xml")


@pytest.mark.parametrize("stop_with", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("inherited_sigint", [signal.SIG_DFL, signal.SIG_IGN], ids=["sigint-default", "sigint-ignored"])
def test_command_line_serves_until_interrupted(stop_with, inherited_sigint):
    env = {**os.environ, "PYTHONPATH": str(DAEMON_DIR)}
    # a script's `cmd &` starts it with SIGINT ignored, and CI runners may too
    proc = subprocess.Popen([sys.executable, "-m", "tokensmith.devserver", "--port", "0",
                             "--client", "cli-id:cli:secret:basic", "--user", "ann:pw"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, inherited_sigint))
    try:
        lines = [proc.stdout.readline().strip() for _ in range(2)]
        assert lines[0] == "client cli-id (basic dialect)"
        token_url = lines[1]
        assert token_url.startswith("http://127.0.0.1:") and token_url.endswith("/oauth2/token")
        response = requests.post(token_url, data={"grant_type": "password", "username": "ann", "password": "pw"},
                                 headers=basic_header("cli-id", "cli:secret"), timeout=5)
        assert response.status_code == 200 and "refresh_token" in response.json()
    finally:
        proc.send_signal(stop_with)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"the dev server did not stop on {signal.Signals(stop_with).name}") from None
    assert proc.returncode == 0, err
    assert err == ""

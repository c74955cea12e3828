"""private_key_jwt, client_secret_jwt, tls_client_auth and jwt_bearer_file against the dev token server,
which checks assertions (signature, aud, exp, jti replay) and client certificates strictly; the faults
(wrong key, expired assertion, replayed jti, wrong certificate) are clear non-retryable errors naming
the client and the method, and an alert in status; rotated keys and certificates in the source are used
by the next request."""

from __future__ import annotations

import json
import os
import random
import time

import jwt
import pytest

from fakes import MemorySink, StaticSource
from pki import new_key, private_pem, public_pem
from tokensmith import clientauth
from tokensmith.clientauth import jwk_thumbprint
from tokensmith.config import ClientConfig
from tokensmith.devserver import OAuthServer
from tokensmith.errors import TokenEndpointError
from tokensmith.keeper import Keeper
from tokensmith.sources import Credentials
from tokensmith.sources.file import FileSource
from tokensmith.state import StateStore
from tokensmith.tokenclient import TokenClient
from tokensmith.transport import HttpPool

SECRET = "jwt-client-Secret-Kq93-long-enough-for-hs256"


@pytest.fixture
def server():
    with OAuthServer(access_lifetime=3600) as server:
        yield server


def config(url, name, method, **fields):
    return ClientConfig(name=name, token_url=url, auth_style=method, source={"type": "env"},
                        sinks=[{"type": "file", "path": f"/run/t/{name}"}], timeout=5, **fields)


def expect_rejected(client, creds, *words):
    with pytest.raises(TokenEndpointError) as info:
        client.obtain("client_credentials", creds)
    error = info.value
    text = str(error)
    assert text.startswith(f"client {client.client.name}:") and f"({client.client.auth_style})" in text, text
    assert error.error == "invalid_client" and not error.retryable
    for word in words:
        assert word in text, text
    for secret in creds.secrets():
        assert secret not in text
    return error


@pytest.mark.parametrize("kind, alg", [("rsa", "RS256"), ("rsa", "PS256"), ("ec", "ES256"), ("ed", "EdDSA")])
def test_private_key_jwt_signs_a_short_lived_unique_assertion(server, kind, alg):
    key = new_key(kind)
    server.add_client("pk", "", auth="private_key_jwt", key=public_pem(key))
    client = TokenClient(config(server.token_url, "okta-style", "private_key_jwt",
                                signing_alg=alg if alg == "PS256" else None))
    creds = Credentials(client_id="pk", private_key=private_pem(key))
    seen = []
    real = server._check_method

    def spy(client_id, client_record, params, headers):
        seen.append(params["client_assertion"])
        return real(client_id, client_record, params, headers)

    server._check_method = spy
    for _ in range(2):
        assert server.is_active(client.obtain("client_credentials", creds).access_token)
    header = jwt.get_unverified_header(seen[0])
    claims = [jwt.decode(a, options={"verify_signature": False}) for a in seen]
    assert header["alg"] == alg and header["kid"] == jwk_thumbprint(key.public_key())
    assert claims[0]["iss"] == claims[0]["sub"] == "pk" and claims[0]["aud"] == server.token_url
    assert claims[0]["exp"] - claims[0]["iat"] == 60
    assert claims[0]["jti"] != claims[1]["jti"]


def test_private_key_jwt_kid_and_issuer_audience_from_config(server):
    key = new_key("rsa")
    server.add_client("pk", "", auth="private_key_jwt", key=public_pem(key), audience=server.issuer)
    client = TokenClient(config(server.token_url, "kid", "private_key_jwt", key_id="key-2026",
                                assertion_audience="issuer", issuer=server.issuer))
    client.discovery = None  # the token_url is configured; only the audience comes from issuer
    token = client.obtain("client_credentials", Credentials(client_id="pk", private_key=private_pem(key)))
    assert server.is_active(token.access_token)


def test_wrong_key_is_a_clear_non_retryable_error(server):
    server.add_client("pk", "", auth="private_key_jwt", key=public_pem(new_key("rsa")))
    client = TokenClient(config(server.token_url, "wrong-key", "private_key_jwt"))
    expect_rejected(client, Credentials(client_id="pk", private_key=private_pem(new_key("rsa"))),
                    "signature does not verify")


def test_expired_assertion_is_refused(server):
    key = new_key("ec")
    server.add_client("pk", "", auth="private_key_jwt", key=public_pem(key))
    client = TokenClient(config(server.token_url, "slow-clock", "private_key_jwt"), clock=lambda: time.time() - 120)
    expect_rejected(client, Credentials(client_id="pk", private_key=private_pem(key)), "assertion expired")


def test_replayed_jti_is_refused(server, monkeypatch):
    key = new_key("ec")
    server.add_client("pk", "", auth="private_key_jwt", key=public_pem(key))
    client = TokenClient(config(server.token_url, "replay", "private_key_jwt"))
    creds = Credentials(client_id="pk", private_key=private_pem(key))
    monkeypatch.setattr(clientauth, "new_jti", lambda: "the-same-jti")
    client.obtain("client_credentials", creds)
    expect_rejected(client, creds, "replayed")


def test_unusable_private_key_in_the_source_is_named(server):
    client = TokenClient(config(server.token_url, "garbled", "private_key_jwt"))
    with pytest.raises(TokenEndpointError) as info:
        client.obtain("client_credentials", Credentials(client_id="pk", private_key="-----BEGIN nonsense"))
    assert "private_key_jwt client authentication" in str(info.value) and not info.value.retryable
    assert "nonsense" not in str(info.value)


def test_client_secret_jwt(server):
    server.add_client("cs", SECRET, auth="client_secret_jwt")
    client = TokenClient(config(server.token_url, "hmac", "client_secret_jwt"))
    assert server.is_active(client.obtain("client_credentials",
                                          Credentials(client_id="cs", client_secret=SECRET)).access_token)
    expect_rejected(client, Credentials(client_id="cs", client_secret=SECRET + "-old"), "signature")


def test_revocation_and_introspection_authenticate_the_same_way(server):
    key = new_key("ec")
    server.add_client("pk", "", auth="private_key_jwt", key=public_pem(key))
    client = TokenClient(config(server.token_url, "revoker", "private_key_jwt", revocation_url=server.revocation_url,
                                introspection_url=server.introspection_url))
    creds = Credentials(client_id="pk", private_key=private_pem(key))
    token = client.obtain("client_credentials", creds)
    assert client.introspect(token.access_token, creds) is True
    client.revoke(token.access_token, "access_token", creds)
    assert not server.is_active(token.access_token)


def test_tls_client_auth(tls_oauth, test_ca):
    cert, key, digest = test_ca.issue("mtls-client")
    tls_oauth.add_client("mtls", "", auth="tls_client_auth", key=digest)
    client = TokenClient(config(tls_oauth.token_url, "mtls", "tls_client_auth", ca_bundle=tls_oauth.ca_bundle))
    creds = Credentials(client_id="mtls", certificate=cert, private_key=key)
    assert tls_oauth.is_active(client.obtain("client_credentials", creds).access_token)
    other_cert, other_key, _ = test_ca.issue("someone-else")
    expect_rejected(client, Credentials(client_id="mtls", certificate=other_cert, private_key=other_key),
                    "certificate not registered")
    with pytest.raises(TokenEndpointError, match="cannot be used together") as info:
        client.obtain("client_credentials", Credentials(client_id="mtls", certificate=cert, private_key=other_key))
    assert not info.value.retryable


def test_ssl_context_and_signing_key_are_cached_by_material(tls_oauth, test_ca):
    cert, key, digest = test_ca.issue("cached")
    auth = clientauth.ClientAuth(config(tls_oauth.token_url, "cache", "tls_client_auth",
                                        ca_bundle=tls_oauth.ca_bundle), time.time)
    creds = Credentials(client_id="x", certificate=cert, private_key=key)
    assert auth.ssl_context(creds) is auth.ssl_context(Credentials(client_id="x", certificate=cert, private_key=key))
    cert2, key2, _ = test_ca.issue("cached-2")
    assert auth.ssl_context(Credentials(client_id="x", certificate=cert2, private_key=key2)) is not \
        auth.ssl_context(creds)
    pem = private_pem(new_key("ec"))
    assert auth._signing_key(pem)[0] is auth._signing_key(pem)[0]


def kube_token(key, audience, subject="system:serviceaccount:apps:billing", lifetime=3600):
    now = int(time.time())
    return jwt.encode({"iss": "https://kubernetes.default.svc", "sub": subject, "aud": audience, "iat": now,
                       "exp": now + lifetime, "jti": os.urandom(8).hex()}, key, algorithm="RS256")


def test_jwt_bearer_file_is_reread_when_it_changes(server, tmp_path):
    issuer_key = new_key("rsa")
    server.add_client("wi", "", auth="jwt_bearer", key=public_pem(issuer_key), audience="api://AzureADTokenExchange")
    path = tmp_path / "token"
    path.write_text(kube_token(issuer_key, "api://AzureADTokenExchange") + "\n")
    client = TokenClient(config(server.token_url, "entra-style", "jwt_bearer_file", assertion_file=path))
    creds = Credentials(client_id="wi")
    assert server.is_active(client.obtain("client_credentials", creds).access_token)
    assert server.is_active(client.obtain("client_credentials", creds).access_token)  # same file, sent again
    path.write_text(kube_token(new_key("rsa"), "api://AzureADTokenExchange"))  # replaced by another issuer
    expect_rejected(client, creds, "signature")
    path.write_text(kube_token(issuer_key, "api://AzureADTokenExchange", lifetime=-10))
    expect_rejected(client, creds, "expired")
    path.write_text(kube_token(issuer_key, "api://AzureADTokenExchange"))
    assert server.is_active(client.obtain("client_credentials", creds).access_token)


def test_rotated_key_and_certificate_in_the_source_are_used_by_the_next_request(server, tls_oauth, test_ca,
                                                                                 tmp_path):
    key = new_key("ec")
    server.add_client("pk", "", auth="private_key_jwt", key=public_pem(key))
    path = tmp_path / "creds.json"
    cfg = ClientConfig(name="rotating", token_url=server.token_url, auth_style="private_key_jwt",
                       source={"type": "file", "path": str(path)}, sinks=[{"type": "file", "path": "/run/t/r"}])

    def write(data):
        path.write_text(json.dumps(data))
        os.chmod(path, 0o600)

    write({"client_id": "pk", "private_key": private_pem(key)})
    source = FileSource(cfg, None)
    client = TokenClient(cfg, HttpPool())
    client.obtain("client_credentials", source.read())
    new = new_key("ec")
    server.set_client_key("pk", public_pem(new))
    write({"client_id": "pk", "private_key": private_pem(new), "padding": "x" * 10})
    assert server.is_active(client.obtain("client_credentials", source.read()).access_token)

    cert, ckey, digest = test_ca.issue("rotating-1")
    tls_oauth.add_client("mtls-r", "", auth="tls_client_auth", key=digest)
    mcfg = ClientConfig(name="mtls-rotating", token_url=tls_oauth.token_url, auth_style="tls_client_auth",
                        ca_bundle=tls_oauth.ca_bundle, source={"type": "file", "path": str(path)},
                        sinks=[{"type": "file", "path": "/run/t/m"}])
    write({"client_id": "mtls-r", "certificate": cert, "private_key": ckey})
    msource, mclient = FileSource(mcfg, None), TokenClient(mcfg, HttpPool())
    mclient.obtain("client_credentials", msource.read())
    cert2, ckey2, digest2 = test_ca.issue("rotating-2")
    tls_oauth.set_client_key("mtls-r", digest2)
    write({"client_id": "mtls-r", "certificate": cert2, "private_key": ckey2, "padding": "y" * 20})
    assert tls_oauth.is_active(mclient.obtain("client_credentials", msource.read()).access_token)


def test_rejected_assertion_is_an_alert_in_status(server, tmp_path):
    server.add_client("pk", "", auth="private_key_jwt", key=public_pem(new_key("rsa")))
    cfg = config(server.token_url, "alerting", "private_key_jwt")
    store = StateStore(tmp_path / "state")
    store.prepare()
    keeper = Keeper(cfg, StaticSource(client_id="pk", private_key=private_pem(new_key("rsa"))), [MemorySink()],
                    TokenClient(cfg), store, rng=random.Random(1))
    keeper.load()
    outcome = keeper.refresh(reason="test")
    assert outcome.error.error == "invalid_client" and not outcome.error.retryable
    alert = keeper.status()["alert"]
    assert "private_key_jwt" in alert and "signature" in alert and "BEGIN" not in str(keeper.status())


def test_enterprise_example_config_loads_with_one_client_per_method():
    from pathlib import Path

    from tokensmith.config import load_settings

    settings = load_settings(Path(__file__).parents[2] / "config" / "enterprise-auth.yaml", environ={})
    assert {c.auth_style for c in settings.clients} == {"jwt_bearer_file", "private_key_jwt", "tls_client_auth"}


def test_keeper_signs_with_the_rotated_key_from_its_file_source_without_restart(server, tmp_path):
    key = new_key("rsa")
    server.add_client("pk", "", auth="private_key_jwt", key=public_pem(key))
    path = tmp_path / "creds.json"
    path.write_text(json.dumps({"client_id": "pk", "private_key": private_pem(key)}))
    os.chmod(path, 0o600)
    cfg = ClientConfig(name="keeper-rotation", token_url=server.token_url, auth_style="private_key_jwt",
                       source={"type": "file", "path": str(path)}, sinks=[{"type": "file", "path": "/run/t/k"}],
                       refresh={"strategy": "reissue"})
    store = StateStore(tmp_path / "state")
    store.prepare()
    sink = MemorySink()
    keeper = Keeper(cfg, FileSource(cfg, None), [sink], TokenClient(cfg), store, rng=random.Random(1))
    keeper.load()
    assert keeper.refresh(reason="test").ok
    rotated = new_key("rsa")
    server.set_client_key("pk", public_pem(rotated))  # the provider now knows only the new key
    path.write_text(json.dumps({"client_id": "pk", "private_key": private_pem(rotated), "rotated": True}))
    os.chmod(path, 0o600)
    outcome = keeper.refresh(reason="test")
    assert outcome.ok, outcome.error
    assert server.is_active(sink.current.access_token)


def test_unusable_key_in_the_source_is_an_alert_in_status(server, tmp_path):
    cfg = config(server.token_url, "garbled-alert", "private_key_jwt")
    store = StateStore(tmp_path / "state")
    store.prepare()
    keeper = Keeper(cfg, StaticSource(client_id="pk", private_key="-----BEGIN PRIVATE KEY-----\nAAAA\n"),
                    [MemorySink()], TokenClient(cfg), store, rng=random.Random(1))
    keeper.load()
    outcome = keeper.refresh(reason="test")
    assert outcome.error.error == "invalid_client_material" and not outcome.error.retryable
    assert "private key cannot be used" in keeper.status()["alert"]

"""Discovery against the dev token server's RFC 8414 document (oidc-provider's OIDC document is covered in
test_idp.py): the refresh schedule, a refetch after invalid_client, a keep-the-old-document fallback, and
check-config --online doing discovery and one dry token request without writing any sink."""

from __future__ import annotations

import json
import os

import pytest

from fakes import FakeClock
from tokensmith.cli import main
from tokensmith.config import ClientConfig
from tokensmith.devserver import OAuthServer
from tokensmith.discovery import REFRESH_EVERY, RETRY_AFTER_FAILURE, well_known_urls
from tokensmith.errors import TokenEndpointError
from tokensmith.sources import Credentials
from tokensmith.tokenclient import TokenClient

SECRET = "discovery-Client-Secret-5Tz"


def test_well_known_urls_for_issuers_with_and_without_a_path():
    assert well_known_urls("https://idp.example.com") == [
        "https://idp.example.com/.well-known/oauth-authorization-server",
        "https://idp.example.com/.well-known/openid-configuration"]
    assert well_known_urls("https://idp.example.com/tenant/1") == [
        "https://idp.example.com/.well-known/oauth-authorization-server/tenant/1",
        "https://idp.example.com/tenant/1/.well-known/openid-configuration"]


def counting(server):
    calls = []
    real = server._metadata

    def metadata(*args):
        calls.append(1)
        return real(*args)

    server._routes["/.well-known/oauth-authorization-server"] = ("GET", metadata)
    return calls


def test_document_is_cached_refreshed_on_schedule_and_after_invalid_client():
    clock = FakeClock()
    with OAuthServer(clock=clock) as server:
        server.add_client("app", SECRET, dialect="basic")
        calls = counting(server)
        client = TokenClient(ClientConfig(name="disc", issuer=server.issuer, source={"type": "env"},
                                          sinks=[{"type": "file", "path": "/run/t/d"}], timeout=5), clock=clock)
        creds = Credentials(client_id="app", client_secret=SECRET)
        client.obtain("client_credentials", creds)
        client.obtain("client_credentials", creds)
        assert len(calls) == 1 and client.method == "basic"
        clock.advance(REFRESH_EVERY + 1)
        client.obtain("client_credentials", creds)
        assert len(calls) == 2
        with pytest.raises(TokenEndpointError):
            client.obtain("client_credentials", Credentials(client_id="app", client_secret="wrong"))
        clock.advance(RETRY_AFTER_FAILURE + 1)
        client.obtain("client_credentials", creds)
        assert len(calls) == 3
        # the provider's metadata endpoint failing later: the document it gave before is kept
        server._routes["/.well-known/oauth-authorization-server"] = ("POST", lambda *a: {})
        clock.advance(REFRESH_EVERY + 1)
        assert client.obtain("client_credentials", creds).access_token


def test_provider_without_a_secret_method_needs_auth_style():
    with OAuthServer() as server:
        server.auth_methods = ["private_key_jwt"]
        client = TokenClient(ClientConfig(name="nosecret", issuer=server.issuer, source={"type": "env"},
                                          sinks=[{"type": "file", "path": "/run/t/n"}], timeout=5))
        with pytest.raises(TokenEndpointError, match="set auth_style") as info:
            client.obtain("client_credentials", Credentials(client_id="app", client_secret=SECRET))
        assert not info.value.retryable


def test_check_config_online_discovers_and_tries_each_client_without_writing_sinks(tmp_path, capsys):
    with OAuthServer() as server:
        server.add_client("app", SECRET, dialect="basic")
        creds = tmp_path / "creds.json"
        creds.write_text(json.dumps({"client_id": "app", "client_secret": SECRET}))
        os.chmod(creds, 0o600)
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"client_id": "app", "client_secret": "not-it"}))
        os.chmod(bad, 0o600)
        config = tmp_path / "config.yaml"
        config.write_text(json.dumps({"state_dir": str(tmp_path / "state"), "clients": [
            {"name": "good", "issuer": server.issuer, "source": {"type": "file", "path": str(creds)},
             "sinks": [{"type": "file", "path": str(tmp_path / "good.token")}]},
            {"name": "bad", "token_url": server.token_url, "source": {"type": "file", "path": str(bad)},
             "sinks": [{"type": "file", "path": str(tmp_path / "bad.token")}]}]}))
        code = main(["check-config", "--config", str(config), "--online"])
        out = capsys.readouterr().out
        assert code == 7  # check-config found problems
        assert f"online ok: client good: discovered {server.issuer}/.well-known/oauth-authorization-server" in out
        assert f"token_url={server.token_url}" in out and "client_credentials ok with basic" in out
        assert "error: client bad:" in out and "invalid_client" in out and "not-it" not in out
        assert not (tmp_path / "good.token").exists() and not (tmp_path / "bad.token").exists()

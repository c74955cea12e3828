"""Vault/OpenBao through a forward proxy from the environment (as hvac's requests layer honoured it), through
Debian's tinyproxy on loopback, with NO_PROXY going direct."""

from __future__ import annotations

import pytest
from conftest import Tinyproxy

from test_vault_cert_auth import SECRET, cert_bao, lookup_self, source_for, write_pair  # noqa: F401 (a fixture)
from tokensmith.config import VaultConfig
from tokensmith.vault import VaultClient

PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy",
                   "NO_PROXY")


@pytest.fixture
def env(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def read(vault_kv) -> dict:
    vault = VaultClient(VaultConfig(**vault_kv.vault_config({"method": "token", "token": vault_kv.token()})))
    return vault.read_kv("secret", vault_kv.path("a"), 2, client="billing-api")


def test_vault_requests_go_through_the_proxy_from_the_environment(env, tinyproxy, vault_kv):
    vault_kv.put("a", {"client_id": "via-proxy"})
    env.setenv("HTTP_PROXY", tinyproxy.url)
    assert read(vault_kv) == {"client_id": "via-proxy"}
    assert tinyproxy.requests(f"GET {vault_kv.server.address}/v1/secret/data/{vault_kv.path('a')}") == 1


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "127.0.0.0/8", "*"])
def test_no_proxy_sends_vault_requests_direct(env, vault_kv, no_proxy):
    vault_kv.put("a", {"client_id": "direct"})
    env.setenv("HTTP_PROXY", "http://127.0.0.1:1")  # nothing listens there
    env.setenv("NO_PROXY", no_proxy)
    assert read(vault_kv) == {"client_id": "direct"}


def test_cert_auth_through_a_connect_tunnel_presents_the_client_certificate(env, proxy_dir, cert_bao, tmp_path):
    port = int(cert_bao.address.rsplit(":", 1)[1])
    proxy = Tinyproxy(proxy_dir, [port])
    try:
        env.setenv("HTTPS_PROXY", proxy.url)
        cert_path, key_path = write_pair(tmp_path, cert_bao.client_ca, "through-the-proxy")
        source, backends = source_for(tmp_path, cert_bao, cert_path, key_path)
        assert source.read().client_secret == SECRET
        assert lookup_self(backends.vault())["meta"]["common_name"] == "through-the-proxy"
        # the login, the read and the lookup went through one pooled tunnel, TLS end to end inside it
        assert proxy.requests(f"CONNECT 127.0.0.1:{port}") == 1
    finally:
        proxy.stop()

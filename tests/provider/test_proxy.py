"""Forward proxies: the NO_PROXY matcher, the environment rules, and real requests through Debian's
tinyproxy (its own log proves they went through it): CONNECT for https, absolute-form for http,
NO_PROXY and `proxy: none` going direct, and errors that name the proxy."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tokensmith.config import ClientConfig
from tokensmith.errors import TokenEndpointError
from tokensmith.proxy import Proxy, bypass, parse_proxy_url, proxy_for
from tokensmith.sources import Credentials
from tokensmith.tokenclient import TokenClient
from tokensmith.transport import HttpPool

SECRET = "proxy-test-Client-Secret-4Rk"
PROXY_PASSWORD = "proxy-pass-W7q"


@pytest.mark.parametrize("host, port, no_proxy, expected", [
    ("auth.example.com", 443, "example.com", True),
    ("example.com", 443, "example.com", True),
    ("badexample.com", 443, "example.com", False),
    ("auth.example.com", 443, ".example.com", True),
    ("example.com", 443, ".example.com", True),
    ("auth.example.com", 443, "*.example.com", True),
    ("AUTH.Example.COM.", 443, "example.com", True),
    ("auth.example.com", 443, "other.org, example.com", True),
    ("auth.example.com", 443, "other.org example.com", True),
    ("auth.example.com", 443, "other.org", False),
    ("anything.test", 8443, "*", True),
    ("10.1.2.3", 443, "10.0.0.0/8", True),
    ("11.1.2.3", 443, "10.0.0.0/8", False),
    ("192.168.4.5", 443, "192.168.4.0/24", True),
    ("fd00::1", 443, "fd00::/8", True),
    ("fe80::1", 443, "fd00::/8", False),
    ("10.1.2.3", 443, "fd00::/8", False),
    ("auth.example.com", 443, "10.0.0.0/8", False),
    ("127.0.0.1", 443, "127.0.0.1", True),
    ("127.0.0.2", 443, "127.0.0.1", False),
    ("::1", 443, "::1", True),
    ("::1", 443, "[::1]", True),
    ("::1", 8443, "[::1]:8443", True),
    ("::1", 443, "[::1]:8443", False),
    ("auth.example.com", 8443, "auth.example.com:8443", True),
    ("auth.example.com", 443, "auth.example.com:8443", False),
    ("127.0.0.1", 9000, "127.0.0.1:9000", True),
    ("127.0.0.1", 9001, "127.0.0.1:9000", False),
    ("auth.example.com", 443, "", False),
])
def test_no_proxy_matcher(host, port, no_proxy, expected):
    assert bypass(host, port, no_proxy) is expected


def test_environment_rules_follow_curl_and_requests():
    env = {"https_proxy": "http://lower:3128", "HTTPS_PROXY": "http://upper:3128", "HTTP_PROXY": "proxy.corp:8080"}
    assert proxy_for("https://idp.example.com/token", environ=env) == Proxy("lower", 3128)
    assert proxy_for("http://idp.example.com/token", environ=env) == Proxy("proxy.corp", 8080)
    assert proxy_for("https://idp.example.com/token", environ={"ALL_PROXY": "http://all:1"}) == Proxy("all", 1)
    assert proxy_for("https://idp.example.com/token", environ={}) is None
    assert proxy_for("https://idp.example.com/token", environ={**env, "NO_PROXY": ".example.com"}) is None
    # a client's setting wins over the environment; `none` goes direct
    assert proxy_for("https://idp.example.com/token", "http://mine:8000", environ=env) == Proxy("mine", 8000)
    assert proxy_for("https://idp.example.com/token", "none", environ=env) is None
    with_user = proxy_for("https://idp.example.com/token", environ={"HTTPS_PROXY": "http://u%40x:p%3Aw@p:1"})
    assert with_user.authorization == "Basic dUB4OnA6dw=="  # u@x:p:w
    assert "p:w" not in repr(with_user) and "dUB4" not in repr(with_user)
    with pytest.raises(ValueError, match="scheme"):
        parse_proxy_url("socks5://p:1080")


def test_config_checks_proxy_and_keeps_loopback_rule_for_the_endpoint():
    def config(**fields):
        return ClientConfig(name="c", source={"type": "env"}, sinks=[{"type": "file", "path": "/run/t/c"}], **fields)

    assert config(token_url="https://idp.example.com/t", proxy="http://10.0.0.5:3128").proxy
    assert config(token_url="http://127.0.0.1:8080/t", proxy="http://10.0.0.5:3128").proxy
    with pytest.raises(ValueError, match="plain http"):
        config(token_url="http://idp.example.com/t", proxy="http://127.0.0.1:3128")
    with pytest.raises(ValueError, match="credentials"):
        config(token_url="https://idp.example.com/t", proxy="http://u:p@127.0.0.1:3128")
    with pytest.raises(ValueError, match="scheme"):
        config(token_url="https://idp.example.com/t", proxy="socks5://127.0.0.1:1080")


def client_for(server, name, **fields) -> tuple[TokenClient, Credentials]:
    server.add_client(f"{name}-id", SECRET)
    config = ClientConfig(name=name, token_url=server.token_url, source={"type": "env"},
                          sinks=[{"type": "file", "path": f"/run/t/{name}"}], timeout=fields.pop("timeout", 5),
                          ca_bundle=getattr(server, "ca_bundle", None), **fields)
    return TokenClient(config, HttpPool()), Credentials(client_id=f"{name}-id", client_secret=SECRET)


def authority(server) -> str:
    return server.url.split("://", 1)[1]


@pytest.fixture
def env(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy",
                 "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_https_goes_through_connect_with_tls_to_the_endpoint_and_pools_the_tunnel(env, tinyproxy, tls_oauth):
    env.setenv("HTTPS_PROXY", tinyproxy.url)
    client, creds = client_for(tls_oauth, "via-connect")
    before = tinyproxy.requests(f"CONNECT {authority(tls_oauth)}")
    first = client.obtain("client_credentials", creds)
    second = client.obtain("client_credentials", creds)
    assert tls_oauth.is_active(first.access_token) and tls_oauth.is_active(second.access_token)
    # one tunnel carried both requests: the pool keeps it by (proxy, endpoint)
    assert tinyproxy.requests(f"CONNECT {authority(tls_oauth)}") == before + 1


def test_plain_http_uses_absolute_form_through_the_proxy(env, tinyproxy, oauth):
    env.setenv("http_proxy", tinyproxy.url)
    client, creds = client_for(oauth, "via-absolute")
    token = client.obtain("client_credentials", creds)
    assert oauth.is_active(token.access_token)
    assert tinyproxy.requests(f"POST {oauth.token_url} HTTP/1.1") == 1


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "127.0.0.0/8", "{port}", "*", "localhost,127.0.0.1"])
def test_no_proxy_goes_direct(env, tinyproxy, oauth, no_proxy):
    env.setenv("HTTP_PROXY", tinyproxy.url)
    env.setenv("NO_PROXY", no_proxy.replace("{port}", authority(oauth)))
    client, creds = client_for(oauth, "direct")
    assert oauth.is_active(client.obtain("client_credentials", creds).access_token)
    assert tinyproxy.requests(oauth.url) == 0


def test_no_proxy_for_another_port_still_proxies(env, tinyproxy, oauth):
    env.setenv("HTTP_PROXY", tinyproxy.url)
    env.setenv("NO_PROXY", "127.0.0.1:1")
    client, creds = client_for(oauth, "other-port")
    client.obtain("client_credentials", creds)
    assert tinyproxy.requests(oauth.url) == 1


def test_proxy_none_bypasses_the_environment(env, oauth):
    env.setenv("HTTP_PROXY", "http://127.0.0.1:1")  # nothing listens there
    client, creds = client_for(oauth, "no-proxy", proxy="none")
    assert oauth.is_active(client.obtain("client_credentials", creds).access_token)


def test_client_proxy_setting_overrides_the_environment(env, tinyproxy, tls_oauth):
    env.setenv("HTTPS_PROXY", "http://127.0.0.1:1")
    client, creds = client_for(tls_oauth, "own-proxy", proxy=tinyproxy.url)
    before = tinyproxy.requests(f"CONNECT {authority(tls_oauth)}")
    client.obtain("client_credentials", creds)
    assert tinyproxy.requests(f"CONNECT {authority(tls_oauth)}") == before + 1


def test_unreachable_proxy_is_named(env, tls_oauth):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client, creds = client_for(tls_oauth, "dead-proxy", proxy=f"http://127.0.0.1:{port}")
    with pytest.raises(TokenEndpointError) as info:
        client.obtain("client_credentials", creds)
    assert f"cannot reach proxy 127.0.0.1:{port}" in str(info.value)
    assert info.value.error == "proxy" and info.value.retryable


def test_proxy_refusing_connect_is_named_with_its_status(env, tinyproxy, oauth):
    # tinyproxy allows CONNECT only to the TLS server's port; the plain server's port is refused
    client, creds = client_for(oauth, "refused")
    env.setenv("HTTPS_PROXY", tinyproxy.url)
    pool = HttpPool()
    proxy = proxy_for("https://" + authority(oauth) + "/")
    from tokensmith.proxy import ProxyError

    with pytest.raises(ProxyError, match=rf"proxy 127.0.0.1:{tinyproxy.port} refused CONNECT with status 403"):
        pool.post("https://" + authority(oauth) + "/oauth2/token", b"", {}, timeout=5, ca_bundle=None,
                  max_body=1024, proxy=proxy)


def test_proxy_credentials_from_the_source(env, tinyproxy_auth, tls_oauth):
    env.setenv("HTTPS_PROXY", tinyproxy_auth.url)
    client, creds = client_for(tls_oauth, "proxy-auth")
    with pytest.raises(TokenEndpointError) as info:
        client.obtain("client_credentials", creds)
    error = info.value
    assert f"proxy {authority_of(tinyproxy_auth)} refused CONNECT with status 407" in str(error)
    assert error.status == 407 and not error.retryable
    wrong = Credentials(client_id=creds.client_id, client_secret=SECRET, proxy_username="proxyuser",
                        proxy_password="not-the-password")
    with pytest.raises(TokenEndpointError, match="refused CONNECT with status 40[17]") as info:
        client.obtain("client_credentials", wrong)
    assert not info.value.retryable
    right = Credentials(client_id=creds.client_id, client_secret=SECRET, proxy_username="proxyuser",
                        proxy_password=PROXY_PASSWORD)
    assert tls_oauth.is_active(client.obtain("client_credentials", right).access_token)
    assert all(PROXY_PASSWORD not in line for line in tinyproxy_auth.lines())


def test_proxy_credentials_from_the_environment_url(env, tinyproxy_auth, oauth):
    env.setenv("HTTP_PROXY", f"http://proxyuser:{PROXY_PASSWORD}@127.0.0.1:{tinyproxy_auth.port}")
    client, creds = client_for(oauth, "env-proxy-auth")
    assert oauth.is_active(client.obtain("client_credentials", creds).access_token)
    assert tinyproxy_auth.requests(f"POST {oauth.token_url}") == 1


def authority_of(proxy) -> str:
    return f"127.0.0.1:{proxy.port}"


def test_deadline_covers_a_proxy_that_never_answers_connect(env, tls_oauth):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    client, creds = client_for(tls_oauth, "stuck-proxy", proxy=f"http://127.0.0.1:{listener.getsockname()[1]}",
                               timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TokenEndpointError) as info:
        client.obtain("client_credentials", creds)
    assert time.monotonic() - started < 1.5
    assert info.value.error == "timeout"
    listener.close()


def test_verify_url_check_goes_through_the_proxy(env, tinyproxy, oauth):
    from tokensmith.compromise import verify_with_resource

    oauth.add_client("v", SECRET)
    client, creds = client_for(oauth, "verify")
    old = client.obtain("client_credentials", creds).access_token
    new = client.obtain("client_credentials", creds).access_token
    oauth._access.pop(old)
    env.setenv("HTTP_PROXY", tinyproxy.url)
    assert verify_with_resource(oauth.resource_url, old, new, timeout=5) == "verified"
    assert tinyproxy.requests(f"GET {oauth.resource_url}") == 2
    assert verify_with_resource(oauth.resource_url, old, new, timeout=5, proxy="http://127.0.0.1:1").startswith(
        "error: cannot reach proxy 127.0.0.1:1")


def test_http_endpoint_the_proxy_cannot_reach_is_told_apart_from_an_endpoint_error(env, tinyproxy, oauth):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = ClientConfig(name="gone", token_url=f"http://127.0.0.1:{port}/token", proxy=tinyproxy.url, timeout=5,
                          source={"type": "env"}, sinks=[{"type": "file", "path": "/run/t/g"}])
    with pytest.raises(TokenEndpointError) as info:
        TokenClient(config, HttpPool()).obtain("client_credentials", Credentials(client_id="x", client_secret=SECRET))
    assert f"proxy 127.0.0.1:{tinyproxy.port} answered HTTP" in str(info.value) and info.value.error == "proxy"
    # the endpoint's own OAuth error through the same proxy stays the endpoint's
    client, _ = client_for(oauth, "endpoint-error", proxy=tinyproxy.url)
    with pytest.raises(TokenEndpointError) as info:
        client.obtain("client_credentials", Credentials(client_id="endpoint-error-id", client_secret="wrong"))
    assert info.value.error == "invalid_client"


def test_mtls_client_certificate_goes_end_to_end_through_the_tunnel(env, tinyproxy, tls_oauth, test_ca):
    cert, key, digest = test_ca.issue("mtls-through-proxy")
    tls_oauth.add_client("mtls-proxy", "", auth="tls_client_auth", key=digest)
    config = ClientConfig(name="mtls-proxy", token_url=tls_oauth.token_url, auth_style="tls_client_auth",
                          ca_bundle=tls_oauth.ca_bundle, proxy=tinyproxy.url, timeout=5, source={"type": "env"},
                          sinks=[{"type": "file", "path": "/run/t/mp"}])
    before = tinyproxy.requests(f"CONNECT {authority(tls_oauth)}")
    token = TokenClient(config, HttpPool()).obtain("client_credentials", Credentials(
        client_id="mtls-proxy", certificate=cert, private_key=key))
    assert tls_oauth.is_active(token.access_token)
    assert tinyproxy.requests(f"CONNECT {authority(tls_oauth)}") == before + 1

"""A real third-party authorization server, panva's oidc-provider, which checks client assertions strictly:
private_key_jwt and client_secret_jwt with the client_credentials grant, and discovery of its issuer."""

from __future__ import annotations

import pytest

from conftest import IDP_SECRET
from pki import new_key, private_pem
from tokensmith.config import ClientConfig
from tokensmith.errors import TokenEndpointError
from tokensmith.sources import Credentials
from tokensmith.tokenclient import TokenClient


def config(idp, name, **fields):
    return ClientConfig(name=name, issuer=idp.issuer, source={"type": "env"},
                        sinks=[{"type": "file", "path": f"/run/t/{name}"}], timeout=5, **fields)


def test_private_key_jwt_against_oidc_provider_via_discovery(idp):
    client = TokenClient(config(idp, "okta-style", auth_style="private_key_jwt"))
    creds = Credentials(client_id="pkjwt", private_key=private_pem(idp.keys["pkjwt"]))
    first = client.obtain("client_credentials", creds)
    second = client.obtain("client_credentials", creds)  # a fresh jti: oidc-provider refuses a replayed one
    assert first.access_token != second.access_token
    assert client.endpoint("token_url") == idp.issuer + "/token"
    assert client.introspect(first.access_token, creds) is True
    client.revoke(first.access_token, "access_token", creds)
    assert client.introspect(first.access_token, creds) is False


def test_private_key_jwt_with_the_wrong_key_is_refused(idp):
    client = TokenClient(config(idp, "wrong-key", auth_style="private_key_jwt"))
    with pytest.raises(TokenEndpointError) as info:
        client.obtain("client_credentials", Credentials(client_id="pkjwt", private_key=private_pem(new_key("rsa"))))
    assert info.value.error == "invalid_client" and not info.value.retryable
    assert "(private_key_jwt)" in str(info.value)


def test_client_secret_jwt_against_oidc_provider(idp):
    client = TokenClient(config(idp, "hmac", auth_style="client_secret_jwt"))
    assert client.obtain("client_credentials", Credentials(client_id="csjwt", client_secret=IDP_SECRET)).access_token
    with pytest.raises(TokenEndpointError) as info:
        client.obtain("client_credentials", Credentials(client_id="csjwt", client_secret=IDP_SECRET[::-1]))
    assert info.value.error == "invalid_client"


def test_discovery_fills_endpoints_and_picks_a_supported_method(idp):
    client = TokenClient(config(idp, "discovered"))
    token = client.obtain("client_credentials", Credentials(client_id="basic", client_secret=IDP_SECRET))
    assert token.access_token and client.method == "basic"
    assert client.endpoint("revocation_url") == idp.issuer + "/token/revocation"
    assert client.endpoint("introspection_url") == idp.issuer + "/token/introspection"


def test_issuer_mismatch_is_refused(idp):
    other = idp.issuer.replace("127.0.0.1", "localhost")
    client = TokenClient(ClientConfig(name="mismatch", issuer=other, source={"type": "env"},
                                      sinks=[{"type": "file", "path": "/run/t/m"}], timeout=5))
    with pytest.raises(TokenEndpointError, match="issuer differs") as info:
        client.obtain("client_credentials", Credentials(client_id="basic", client_secret=IDP_SECRET))
    assert not info.value.retryable


def test_tls_client_auth_against_oidc_provider(idp_mtls, test_ca):
    client = TokenClient(ClientConfig(name="mtls", issuer=idp_mtls.issuer, auth_style="tls_client_auth",
                                      ca_bundle=idp_mtls.ca_bundle, source={"type": "env"},
                                      sinks=[{"type": "file", "path": "/run/t/mtls"}], timeout=5))
    cert, key, _ = test_ca.issue("mtls-client")
    assert client.obtain("client_credentials", Credentials(client_id="mtls", certificate=cert,
                                                           private_key=key)).access_token
    other_cert, other_key, _ = test_ca.issue("someone-else")
    with pytest.raises(TokenEndpointError) as info:
        client.obtain("client_credentials", Credentials(client_id="mtls", certificate=other_cert,
                                                        private_key=other_key))
    assert info.value.error == "invalid_client" and "(tls_client_auth)" in str(info.value)

"""VaultSource against a real OpenBao dev server, wired through Settings and Backends."""

import pytest

from fixtures_stores import store_settings
from tokensmith.backends import Backends
from tokensmith.errors import SourceError
from tokensmith.sources import build_source

SECRET = "s3cr3t-client-secret-value"


def source_for(tmp_path, vault_kv, auth=None, grant="client_credentials", **source):
    settings = store_settings(tmp_path, vault=vault_kv.vault_config(auth), grant=grant,
                              source={"type": "vault", **source})
    return build_source(settings.clients[0], Backends(settings))


def test_kv2_read_with_mapped_keys(tmp_path, vault_kv):
    path = vault_kv.put("billing", {"id": "billing-client", "secret": SECRET, "user": "svc", "pass": "pw-value"})
    source = source_for(tmp_path, vault_kv, grant="password", path=path,
                        keys={"client_id": "id", "client_secret": "secret", "username": "user", "password": "pass"})
    creds = source.read()
    assert (creds.client_id, creds.client_secret, creds.username, creds.password) == \
        ("billing-client", SECRET, "svc", "pw-value")
    assert SECRET not in repr(creds)


def test_kv1_read(tmp_path, vault_kv):
    mount = vault_kv.enable_kv1()
    path = vault_kv.put("billing", {"client_id": "v1-client", "client_secret": SECRET}, mount=mount, kv_version=1)
    source = source_for(tmp_path, vault_kv, mount=mount, path=path, kv_version=1)
    assert source.read().client_id == "v1-client"


def test_rotated_secret_is_picked_up_on_next_read(tmp_path, vault_kv):
    path = vault_kv.put("billing", {"client_id": "c", "client_secret": "old-secret"})
    source = source_for(tmp_path, vault_kv, path=path)
    assert source.read().client_secret == "old-secret"
    vault_kv.put("billing", {"client_id": "c", "client_secret": "new-secret"})
    assert source.read().client_secret == "new-secret"


def test_missing_path_is_not_retryable(tmp_path, vault_kv):
    source = source_for(tmp_path, vault_kv, path=vault_kv.path("absent"))
    with pytest.raises(SourceError) as caught:
        source.read()
    message = str(caught.value)
    assert not caught.value.retryable
    assert message.startswith("client billing-api: ") and f"secret/{vault_kv.path('absent')}" in message


@pytest.mark.security(threat="hostile secret store", claim="A Vault secret missing a key is refused naming the path "
                                                           "and the key, never the values it holds.")
def test_missing_key_is_not_retryable_and_shows_no_values(tmp_path, vault_kv):
    path = vault_kv.put("billing", {"client_id": "c", "client_secret": SECRET})
    source = source_for(tmp_path, vault_kv, grant="refresh_token", path=path)
    with pytest.raises(SourceError, match="missing key.*refresh_token") as caught:
        source.read()
    assert not caught.value.retryable
    assert SECRET not in str(caught.value) and path in str(caught.value)


def test_approle_reauthenticates_after_token_revocation(tmp_path, vault_kv):
    path = vault_kv.put("billing", {"client_id": "c", "client_secret": SECRET})
    auth = vault_kv.approle()
    source = source_for(tmp_path, vault_kv, auth=auth, path=path)
    assert source.read().client_id == "c"
    vault_kv.revoke_logins(auth["mount_point"])
    assert source.read().client_id == "c"


def test_stopped_server_is_retryable(tmp_path, openbao, vault_kv):
    path = vault_kv.put("billing", {"client_id": "c", "client_secret": SECRET})
    source = source_for(tmp_path, vault_kv, path=path)
    source.read()
    openbao.stop()
    try:
        with pytest.raises(SourceError) as caught:
            source.read()
        assert caught.value.retryable and "billing-api" in str(caught.value)
        assert SECRET not in str(caught.value) and openbao.root_token not in str(caught.value)
    finally:
        openbao.start()

"""VaultSink against a real OpenBao dev server: KV v2 with check-and-set."""

import pytest

from fixtures_stores import store_settings
from tokensmith.backends import Backends
from tokensmith.errors import SinkError
from tokensmith.sinks import build_sinks
from tokensmith.tokens import Token


def sink_for(tmp_path, vault_kv, auth=None, **sink):
    settings = store_settings(tmp_path, vault=vault_kv.vault_config(auth),
                              source={"type": "env", "prefix": "X_"}, sinks=[{"type": "vault", **sink}])
    return build_sinks(settings.clients[0], Backends(settings))[0]


def token(value: str, expires_at: float) -> Token:
    return Token(access_token=value, token_type="Bearer", obtained_at=expires_at - 3600, expires_at=expires_at)


def test_writes_json_document_with_cas(tmp_path, vault_kv):
    path = vault_kv.path("tokens/billing")
    sink = sink_for(tmp_path, vault_kv, path=path)
    assert (sink.name, sink.type) == (f"vault:secret/{path}", "vault")
    sink.check()  # nothing there yet: fine, the first write creates it
    sink.write(token("tok-1", 2_000_000_000))
    stored = vault_kv.get("tokens/billing")
    assert stored["data"] == {"access_token": "tok-1", "token_type": "Bearer", "expires_at": 2_000_000_000}
    assert stored["metadata"]["version"] == 1
    sink.write(token("tok-2", 2_000_003_600))
    assert vault_kv.get("tokens/billing")["data"]["access_token"] == "tok-2"
    sink.write(token("tok-2", 2_000_003_600))  # same document again: no new version
    assert vault_kv.get("tokens/billing")["metadata"]["version"] == 2


def test_older_token_never_overwrites_newer(tmp_path, vault_kv):
    path = vault_kv.path("tokens/billing")
    newer_writer = sink_for(tmp_path, vault_kv, path=path)
    stale_writer = sink_for(tmp_path, vault_kv, auth=vault_kv.approle(), path=path)
    newer_writer.write(token("tok-new", 2_000_007_200))
    stale_writer.write(token("tok-old", 2_000_003_600))
    stored = vault_kv.get("tokens/billing")
    assert stored["data"]["access_token"] == "tok-new" and stored["metadata"]["version"] == 1


def test_concurrent_writer_between_read_and_write_is_a_retryable_cas_conflict(tmp_path, vault_kv):
    path = vault_kv.path("tokens/billing")
    sink = sink_for(tmp_path, vault_kv, path=path)
    sink.write(token("tok-1", 2_000_000_000))
    vault = sink.backends.vault()
    read = vault.read_kv2_versioned

    def read_then_another_daemon_writes(*args, **kwargs):
        result = read(*args, **kwargs)
        vault_kv.put("tokens/billing", {"access_token": "tok-other", "token_type": "Bearer",
                                        "expires_at": 2_000_000_100})
        return result

    vault.read_kv2_versioned = read_then_another_daemon_writes
    with pytest.raises(SinkError, match="check-and-set") as caught:
        sink.write(token("tok-2", 2_000_003_600))
    assert caught.value.retryable and "tok-2" not in str(caught.value)
    assert vault_kv.get("tokens/billing")["data"]["access_token"] == "tok-other"


def test_check_fails_without_permission_or_mount(tmp_path, vault_kv):
    no_policy = {"method": "token", "token": vault_kv.token(policies=["default"])}
    with pytest.raises(SinkError, match="permission denied") as caught:
        sink_for(tmp_path, vault_kv, auth=no_policy, path=vault_kv.path("t")).check()
    assert not caught.value.retryable and "billing-api" in str(caught.value)
    with pytest.raises(SinkError, match="no such mount") as caught:
        sink_for(tmp_path, vault_kv, mount="nomount", path="t").check()
    assert not caught.value.retryable


@pytest.mark.security(threat="hostile secret store", claim="A Vault sink write refused by the store names the path, "
                                                           "never the token or the Vault token.")
def test_write_denied_names_path_not_token(tmp_path, vault_kv):
    read_only = vault_kv.token(policies=["default"])
    sink = sink_for(tmp_path, vault_kv, auth={"method": "token", "token": read_only}, path=vault_kv.path("t"))
    with pytest.raises(SinkError) as caught:
        sink.write(token("tok-secret-value", 2_000_000_000))
    message = str(caught.value)
    assert vault_kv.path("t") in message
    assert "tok-secret-value" not in message and read_only not in message

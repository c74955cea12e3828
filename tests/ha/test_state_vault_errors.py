"""The vault state backend's failures against a real OpenBao: every operation raises the typed
StateError, naming the client where there is one, and an audit record is never overwritten."""

from __future__ import annotations

import pytest

from fixtures_stores import store_settings
from tokensmith.config import VaultStateConfig
from tokensmith.errors import StateError
from tokensmith.state import ClientState, build_state_backend


def settings_for(tmp_path, vault_kv, **vault_extra):
    settings = store_settings(tmp_path, source={"type": "env"}, vault=vault_kv.vault_config(**vault_extra))
    return settings.model_copy(update={"state": VaultStateConfig(type="vault", mount="secret", prefix=vault_kv.prefix)})


def backend(tmp_path, vault_kv):
    store = build_state_backend(settings_for(tmp_path, vault_kv))
    store.prepare()
    return store


def state(n: int) -> ClientState:
    return ClientState(access_token=f"at-{n}", obtained_at=1000.0 + n, expires_at=2000.0 + n,
                       refresh_token=f"rt-{n}", refresh_token_obtained_at=1000.0 + n)


def test_every_operation_on_an_unreachable_vault_is_a_state_error_naming_the_client(tmp_path, vault_kv):
    dead = build_state_backend(settings_for(tmp_path, vault_kv, address="http://127.0.0.1:1",
                                            allow_insecure_http=True))
    for call, client in ((lambda: dead.load("billing"), "billing"), (lambda: dead.save("billing", state(1)), "billing"),
                         (dead.load_all, None), (lambda: dead.append_audit({"client": "billing"}), None),
                         (dead.audit_records, None), (dead.check, None)):
        with pytest.raises(StateError) as caught:
            call()
        assert type(caught.value) is StateError and caught.value.retryable
        assert caught.value.client == client


def test_an_audit_record_is_created_once_and_never_overwritten(tmp_path, vault_kv):
    store = backend(tmp_path, vault_kv)
    store._put_audit("20261202T000000-billing-00000000", {"client": "billing", "result": "rotated"})
    store._put_audit("20261202T000000-billing-00000000", {"client": "billing", "result": "forged"})  # CAS 0: refused
    assert [record["result"] for record in store.audit_records()] == ["rotated"]


def test_listing_clients_skips_folders_under_the_prefix(tmp_path, vault_kv):
    store = backend(tmp_path, vault_kv)
    store.save("billing", state(1))
    vault_kv.put("clients/archive/old", {"note": "an operator's folder"})
    assert store._list() == ["billing"]
    assert store.load_all() == {"billing": state(1)}

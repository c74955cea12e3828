"""The vault state backend against a real OpenBao dev server: one KV v2 record per client,
every write check-and-set on the version this backend object last saw."""

from __future__ import annotations

import logging

import pytest
from hvac.exceptions import InvalidPath

from fixtures_stores import store_settings
from tokensmith.config import VaultStateConfig
from tokensmith.errors import StateError
from tokensmith.state import ClientState, FencedError, StaleStateError, build_state_backend
from tokensmith.state.vault import VaultStateStore

SECRET_ACCESS = "at-very-secret-0123456789"
SECRET_REFRESH = "rt-very-secret-9876543210"


def settings_for(tmp_path, vault_kv, **vault_extra):
    settings = store_settings(tmp_path, source={"type": "env"}, vault=vault_kv.vault_config(**vault_extra))
    return settings.model_copy(update={"state": VaultStateConfig(type="vault", mount="secret", prefix=vault_kv.prefix)})


def backend(tmp_path, vault_kv, **vault_extra) -> VaultStateStore:
    store = build_state_backend(settings_for(tmp_path, vault_kv, **vault_extra))
    assert isinstance(store, VaultStateStore) and store.shared
    store.prepare()
    return store


def state(n: int) -> ClientState:
    return ClientState(access_token=f"{SECRET_ACCESS}-{n}", obtained_at=1000.0 + n, expires_at=2000.0 + n,
                       refresh_token=f"{SECRET_REFRESH}-{n}", refresh_token_obtained_at=1000.0 + n,
                       sinks_written={"file": "fp"}, last_grant="refresh_token")


def record(vault_kv, client: str) -> dict:
    return vault_kv.get(f"clients/{client}")


def test_a_saved_state_is_one_kv2_record_per_client_and_reads_back(tmp_path, vault_kv):
    store = backend(tmp_path, vault_kv)
    assert store.load("billing") is None
    store.epoch = 7
    store.save("billing", state(1))
    stored = record(vault_kv, "billing")
    assert stored["metadata"]["version"] == 1
    assert stored["data"]["epoch"] == 7 and stored["data"]["state"]["refresh_token"] == f"{SECRET_REFRESH}-1"
    other = backend(tmp_path / "b", vault_kv)
    loaded = other.load("billing")
    assert loaded == state(1)
    assert other.load_all() == {"billing": state(1)}


def test_a_stale_writer_fails_and_the_record_is_unchanged(tmp_path, vault_kv):
    first, second = backend(tmp_path / "a", vault_kv), backend(tmp_path / "b", vault_kv)
    first.save("billing", state(1))
    assert second.load("billing") == state(1)
    assert first.load("billing") == state(1)
    first.save("billing", state(2))  # version 2: second still holds version 1
    with pytest.raises(StaleStateError) as caught:
        second.save("billing", state(3))
    assert not caught.value.retryable
    assert "another writer moved client billing on (version 2" in str(caught.value)
    assert record(vault_kv, "billing")["data"]["state"]["access_token"] == f"{SECRET_ACCESS}-2"
    assert record(vault_kv, "billing")["metadata"]["version"] == 2
    assert SECRET_ACCESS not in str(caught.value) and SECRET_REFRESH not in str(caught.value)


def test_two_writers_creating_the_same_client_one_wins(tmp_path, vault_kv):
    first, second = backend(tmp_path / "a", vault_kv), backend(tmp_path / "b", vault_kv)
    assert first.load("new") is None and second.load("new") is None
    second.save("new", state(5))
    with pytest.raises(StaleStateError):
        first.save("new", state(6))
    assert backend(tmp_path / "c", vault_kv).load("new") == state(5)


def test_load_if_changed_sees_another_writers_change_and_then_writes_on_it(tmp_path, vault_kv):
    first, second = backend(tmp_path / "a", vault_kv), backend(tmp_path / "b", vault_kv)
    first.save("billing", state(1))
    assert first.load_if_changed("billing") is None  # its own write
    assert second.load_if_changed("billing") == state(1)
    assert second.load_if_changed("billing") is None
    second.save("billing", state(2))
    assert first.load_if_changed("billing") == state(2)
    first.save("billing", state(3))  # now on version 2: allowed
    assert second.load("billing") == state(3)


def test_a_fenced_replica_writes_nothing(tmp_path, vault_kv):
    store = backend(tmp_path, vault_kv)
    store.save("billing", state(1))

    def fence():
        raise FencedError("not the leader", client="billing")

    store.fence = fence
    with pytest.raises(FencedError):
        store.save("billing", state(2))
    assert record(vault_kv, "billing")["metadata"]["version"] == 1


def test_audit_records_are_stored_in_vault(tmp_path, vault_kv):
    store = backend(tmp_path, vault_kv)
    store.append_audit({"client": "billing", "old_token": "fp-old", "new_token": "fp-new", "result": "rotated"})
    store.append_audit({"client": "billing", "old_token": "fp-new", "new_token": "fp-3", "result": "rotated"})
    keys = vault_kv.root.secrets.kv.v2.list_secrets(f"{vault_kv.prefix}/audit", mount_point="secret")["data"]["keys"]
    assert len(keys) == 2 and all("-billing-" in key for key in keys)
    assert [r["new_token"] for r in backend(tmp_path / "b", vault_kv).audit_records()] in (
        ["fp-new", "fp-3"], ["fp-3", "fp-new"])


def test_a_damaged_record_is_reported_and_replaced_by_the_next_save(tmp_path, vault_kv):
    vault_kv.put("clients/billing", {"state": "not json"})
    store = backend(tmp_path, vault_kv)
    with pytest.raises(StateError, match="record for client billing .* unreadable"):
        store.load("billing")
    store.save("billing", state(1))
    assert backend(tmp_path / "b", vault_kv).load("billing") == state(1)


def test_denied_and_unreachable_errors_name_no_secret(tmp_path, vault_kv, caplog):
    caplog.set_level(logging.DEBUG, logger="tokensmith")
    vault_kv.root.sys.create_or_update_policy("state-" + vault_kv.prefix[-12:], f"""
        path "secret/data/{vault_kv.prefix}/*" {{ capabilities = ["create", "read", "update"] }}
        path "secret/metadata/{vault_kv.prefix}/*" {{ capabilities = ["read", "list"] }}
    """)  # what docs/config-schema.md asks of the state backend's identity, for this test's prefix only
    reader = vault_kv.token(["state-" + vault_kv.prefix[-12:]])
    store = backend(tmp_path, vault_kv, auth={"method": "token", "token": reader})
    store.save("billing", state(1))
    outsider = VaultStateStore(VaultStateConfig(type="vault", mount="secret", prefix="elsewhere"), store.vault,
                               tmp_path)
    with pytest.raises(StateError) as denied:
        outsider.save("billing", state(2))
    assert "permission denied" in str(denied.value)
    dead = settings_for(tmp_path, vault_kv, address="http://127.0.0.1:1", allow_insecure_http=True)
    with pytest.raises(StateError) as down:
        build_state_backend(dead).load("billing")
    assert down.value.retryable and "cannot connect" in str(down.value)
    for text in (str(denied.value), str(down.value), caplog.text):
        for secret in (SECRET_ACCESS, SECRET_REFRESH, reader, vault_kv.server.root_token):
            assert secret not in text


def test_prepare_rejects_a_mount_that_does_not_exist(tmp_path, vault_kv):
    settings = settings_for(tmp_path, vault_kv)
    settings = settings.model_copy(update={"state": VaultStateConfig(type="vault", mount="nosuchmount")})
    with pytest.raises(StateError, match="state backend vault at nosuchmount/tokensmith: .*no such mount"):
        build_state_backend(settings).prepare()


def test_racing_writers_lose_no_update(tmp_path, vault_kv):
    """Two replicas' backends increment one record from two threads: every conflict is a
    StaleStateError, the loser re-reads, and the final record holds every increment."""
    import threading

    stores = [backend(tmp_path / str(n), vault_kv) for n in range(2)]
    stores[0].save("counter", ClientState(last_refresh=0.0))

    def bump(store, times):
        done = 0
        while done < times:
            current = store.load("counter")
            try:
                store.save("counter", ClientState(last_refresh=current.last_refresh + 1))
                done += 1
            except StaleStateError:
                pass

    threads = [threading.Thread(target=bump, args=(store, 15)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    final = record(vault_kv, "counter")
    assert final["data"]["state"]["last_refresh"] == 30.0
    assert final["metadata"]["version"] == 31


def test_moving_a_host_from_the_file_backend_keeps_its_state(tmp_path, vault_kv):
    from tokensmith.state import StateStore

    files = StateStore(tmp_path)
    files.prepare()
    files.save("billing", state(1))
    store = backend(tmp_path, vault_kv)
    assert store.load("billing") == state(1)  # no record yet: the file is read
    with pytest.raises(InvalidPath):
        record(vault_kv, "billing")
    store.save("billing", state(2))
    assert record(vault_kv, "billing")["metadata"]["version"] == 1
    files.save("billing", state(9))  # from now on the record wins over the file
    assert store.load("billing") == state(2)


def test_a_record_an_operator_removed_is_created_again(tmp_path, vault_kv):
    store = backend(tmp_path, vault_kv)
    store.save("billing", state(1))
    store.save("billing", state(2))
    vault_kv.root.secrets.kv.v2.delete_metadata_and_all_versions(f"{vault_kv.prefix}/clients/billing",
                                                                 mount_point="secret")
    assert store.load_if_changed("billing") is None  # the keeper keeps what it holds ...
    store.save("billing", state(3))  # ... and its next save stores it again
    assert record(vault_kv, "billing")["metadata"]["version"] == 1
    assert backend(tmp_path / "b", vault_kv).load("billing") == state(3)

"""What every shared state backend inherits from SharedStateStore: the record codec, compare-and-set
on the version this object last saw, fencing, the import of a host's state files and audit keys.
The store here keeps its records in a dict with the same version rules as Vault's KV v2 CAS and
DynamoDB's conditional put, so these rules are checked in milliseconds; tests/ha/test_state_vault.py
and test_state_dynamodb.py check the same rules against real OpenBao and moto."""

from __future__ import annotations

import copy
import json
import logging
import re
import threading

import pytest

from tokensmith.errors import StateError
from tokensmith.state import ClientState, FencedError, StaleStateError, StateStore
from tokensmith.state.file import FORMAT_VERSION
from tokensmith.state.shared import MAX_CLIENTS, SharedStateStore, audit_key, decode, encode


class Records:
    """One store's records: client -> (record, version); a write succeeds only on the current version."""

    def __init__(self):
        self.items: dict[str, tuple[dict, int]] = {}
        self.audit: dict[str, dict] = {}
        self.lose_next_ack = False


class MemoryStateStore(SharedStateStore):
    what = "memory state"

    def __init__(self, directory, records: Records):
        super().__init__(directory)
        self.records = records
        self.checked = 0

    def _read(self, client):
        record, version = self.records.items.get(client, (None, 0))
        return copy.deepcopy(record), version

    def _write(self, client, record, cas):
        if self.records.items.get(client, (None, 0))[1] != cas:
            return None
        self.records.items[client] = (copy.deepcopy(record), cas + 1)
        if self.records.lose_next_ack:  # committed, but the caller hears a conflict (a retried request)
            self.records.lose_next_ack = False
            return None
        return cas + 1

    def _list(self):
        return sorted(self.records.items)

    def _put_audit(self, key, record):
        self.records.audit[key] = record

    def check(self):
        self.checked += 1


def state(n: int, **changes) -> ClientState:
    return ClientState(**{"access_token": f"at-{n}", "obtained_at": 1000.0 + n, "expires_at": 2000.0 + n,
                          "refresh_token": f"rt-{n}", "refresh_token_obtained_at": 1000.0 + n,
                          "sinks_written": {"file": f"fp-{n}"}, "last_grant": "refresh_token", **changes})


@pytest.fixture
def records():
    return Records()


def store(tmp_path, records, name="a") -> MemoryStateStore:
    return MemoryStateStore(tmp_path / name, records)


def test_encode_stores_every_field_the_format_and_the_epoch():
    original = state(1, client_id="cid", last_error="boom", last_error_at=3.0, alert="compromised")
    record = encode(original, 9)
    assert record["format"] == FORMAT_VERSION and record["epoch"] == 9
    assert record["state"]["sinks_written"] == {"file": "fp-1"}
    assert record["state"]["sinks_written"] is not original.sinks_written
    assert set(record["state"]) == {"access_token", "token_type", "obtained_at", "expires_at", "refresh_token",
                                    "refresh_token_obtained_at", "client_id", "sinks_written", "last_refresh",
                                    "last_grant", "last_error", "last_error_at", "alert", "spent_seed"}
    assert decode(record) == original
    assert decode({**record, "state": json.dumps(record["state"])}) == original  # DynamoDB stores it as a string


def test_decode_ignores_unknown_fields_and_refuses_damaged_records():
    assert decode({"state": {"access_token": "at", "future_field": 1}}) == ClientState(access_token="at")
    for damaged in ({}, {"state": None}, {"state": [1]}, {"state": "[1]"}, {"state": {"obtained_at": "x"}},
                    {"state": {"access_token": 5}}, {"state": "{not json"}):
        with pytest.raises((ValueError, TypeError)):
            decode(damaged)


def test_a_new_store_starts_at_epoch_zero_with_no_fence_and_a_random_writer(tmp_path, records):
    first, second = store(tmp_path, records, "a"), store(tmp_path, records, "b")
    assert first.shared and first.epoch == 0 and first.fence is None and first.versions == {}
    assert first.directory == tmp_path / "a" and first.local.directory == tmp_path / "a"
    assert re.fullmatch(r"[0-9a-f]{16}", first.writer) and first.writer != second.writer


def test_prepare_makes_the_local_directory_and_checks_the_store(tmp_path, records):
    shared = store(tmp_path, records, "fresh")
    shared.prepare()
    assert (tmp_path / "fresh").is_dir() and shared.checked == 1
    assert shared.try_daemon_lock() is not None  # daemon.lock stays on this host, in state_dir
    assert shared.try_daemon_lock() is None
    shared.remove_stale_temps()  # nothing to remove: a shared store writes no temp files


def test_save_creates_then_updates_on_the_version_last_seen(tmp_path, records):
    shared = store(tmp_path, records)
    shared.epoch = 4
    assert shared.load("billing") is None and shared.versions == {"billing": 0}
    shared.save("billing", state(1))
    record, version = records.items["billing"]
    assert version == 1 and shared.versions["billing"] == 1
    assert record["epoch"] == 4 and record["writer"] == shared.writer and record["format"] == FORMAT_VERSION
    shared.save("billing", state(2))
    assert records.items["billing"][1] == 2 and shared.versions["billing"] == 2
    assert store(tmp_path, records, "b").load("billing") == state(2)


def test_a_first_save_without_a_load_creates_the_record(tmp_path, records):
    shared = store(tmp_path, records)
    shared.save("billing", state(1))
    assert records.items["billing"][1] == 1 and shared.load("billing") == state(1)


def test_a_stale_writer_fails_names_the_client_and_writes_nothing(tmp_path, records):
    first, second = store(tmp_path, records, "a"), store(tmp_path, records, "b")
    first.save("billing", state(1))
    assert second.load("billing") == state(1)
    first.save("billing", state(2))
    with pytest.raises(StaleStateError) as caught:
        second.save("billing", state(3))
    error = caught.value
    assert error.client == "billing" and not error.retryable
    assert "version 2" in error.message and "last saw version 1" in error.message and "nothing was written" in error.message
    assert records.items["billing"][1] == 2 and first.load("billing") == state(2)
    assert second.versions["billing"] == 1  # not moved on: only a reload lets it write again
    assert second.load_if_changed("billing") == state(2)
    second.save("billing", state(3))
    assert records.items["billing"][1] == 3


def test_creating_a_client_another_writer_created_first_is_a_conflict(tmp_path, records):
    first, second = store(tmp_path, records, "a"), store(tmp_path, records, "b")
    first.save("billing", state(1))
    with pytest.raises(StaleStateError, match="version 1.*last saw version 0"):
        second.save("billing", state(2))
    assert store(tmp_path, records, "c").load("billing") == state(1)


def test_a_committed_write_whose_acknowledgement_was_lost_is_success(tmp_path, records):
    shared = store(tmp_path, records)
    shared.save("billing", state(1))
    records.lose_next_ack = True
    shared.save("billing", state(2))
    assert shared.versions["billing"] == 2
    shared.save("billing", state(3))  # and it goes on writing on the version it committed
    assert records.items["billing"][1] == 3


def test_an_equal_write_by_another_writer_or_epoch_is_still_a_conflict(tmp_path, records):
    first, second = store(tmp_path, records, "a"), store(tmp_path, records, "b")
    first.save("billing", state(1))
    second.load("billing")
    first.save("billing", state(2))
    with pytest.raises(StaleStateError):  # the same state, written by someone else
        second.save("billing", state(2))
    second.load("billing")
    second.epoch = first.epoch + 1
    second.writer = first.writer
    first.save("billing", state(3))
    with pytest.raises(StaleStateError):  # the same writer id at another epoch is not this write
        second.save("billing", state(3))
    second.load("billing")
    second.epoch = first.epoch
    first.save("billing", state(4))
    with pytest.raises(StaleStateError):  # this writer and epoch, but other content
        second.save("billing", state(5))


def test_own_write_check_refuses_records_it_cannot_read(tmp_path, records):
    shared = store(tmp_path, records)
    own = {"epoch": 0, "writer": shared.writer}
    assert shared._is_own_write({**encode(state(1), 0), "writer": shared.writer}, state(1))
    assert not shared._is_own_write(None, state(1))
    assert not shared._is_own_write([own], state(1))
    assert not shared._is_own_write({**own, "state": "{damaged"}, state(1))
    assert not shared._is_own_write({**own, "state": {"obtained_at": "x"}}, state(1))
    assert not shared._is_own_write({**own, "state": "[]"}, state(1))


def test_a_write_two_versions_on_is_a_conflict_even_if_it_matches(tmp_path, records):
    shared = store(tmp_path, records)
    shared.save("billing", state(1))
    records.items["billing"] = ({**encode(state(2), 0), "writer": shared.writer}, 3)
    with pytest.raises(StaleStateError):
        shared.save("billing", state(2))


def test_a_fence_that_refuses_stops_the_write_before_it_is_made(tmp_path, records):
    shared = store(tmp_path, records)
    calls = []

    def fence():
        calls.append(1)
        if len(calls) > 1:
            raise FencedError("not the leader", client="billing")

    shared.fence = fence
    shared.save("billing", state(1))
    with pytest.raises(FencedError):
        shared.save("billing", state(2))
    assert calls == [1, 1] and records.items["billing"][1] == 1 and shared.load("billing") == state(1)


def test_load_if_changed_returns_only_news(tmp_path, records):
    first, second = store(tmp_path, records, "a"), store(tmp_path, records, "b")
    assert second.load_if_changed("billing") is None and second.versions["billing"] == 0
    first.save("billing", state(1))
    assert first.load_if_changed("billing") is None  # its own write
    assert second.load_if_changed("billing") == state(1) and second.versions["billing"] == 1
    assert second.load_if_changed("billing") is None
    first.save("billing", state(2))
    assert second.load_if_changed("billing") == state(2)
    # a replica behind the version this object has seen (a lagging standby) is not news either
    records.items["billing"] = (records.items["billing"][0], 1)
    assert second.load_if_changed("billing") is None and second.versions["billing"] == 2


def test_load_if_changed_on_a_client_never_read_returns_the_record(tmp_path, records):
    store(tmp_path, records, "a").save("billing", state(1))
    other = store(tmp_path, records, "b")
    assert other.load_if_changed("billing") == state(1) and other.versions["billing"] == 1


def test_a_record_an_operator_removed_is_created_again(tmp_path, records):
    shared = store(tmp_path, records)
    shared.save("billing", state(1))
    del records.items["billing"]
    assert shared.load_if_changed("billing") is None and shared.versions["billing"] == 0
    shared.save("billing", state(2))
    assert records.items["billing"][1] == 1


def test_a_damaged_record_is_reported_and_replaced_by_the_next_save(tmp_path, records):
    records.items["billing"] = ({"state": "{damaged", "epoch": 0}, 5)
    shared = store(tmp_path, records)
    with pytest.raises(StateError) as caught:
        shared.load("billing")
    error = caught.value
    assert error.client == "billing" and not error.retryable and error.__cause__ is None
    assert error.message == ("memory state record for client billing (version 5) is unreadable; a new token "
                             "will be obtained and the record replaced")
    assert shared.versions["billing"] == 5
    shared.save("billing", state(1))
    assert records.items["billing"][1] == 6
    records.items["billing"] = ({"state": {"access_token": 7}}, 7)
    with pytest.raises(StateError, match="version 7"):
        shared.load_if_changed("billing")


def test_a_host_moving_to_a_shared_store_keeps_its_state_files(tmp_path, records, caplog):
    StateStore(tmp_path / "a").prepare()
    StateStore(tmp_path / "a").save("billing", state(1))
    shared = store(tmp_path, records, "a")
    with caplog.at_level(logging.INFO, logger="tokensmith.state"):
        assert shared.load("billing") == state(1)
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "state_imported"]
    assert line.client == "billing" and line.levelno == logging.INFO
    assert line.getMessage() == (f"no memory state record yet: using the state file left in {tmp_path / 'a'}; "
                                 f"the next save stores it")
    assert shared.versions["billing"] == 0
    shared.save("billing", state(2))  # the first save creates the record
    assert records.items["billing"][1] == 1
    assert shared.load("billing") == state(2)


def test_a_state_file_is_not_imported_over_a_record(tmp_path, records):
    StateStore(tmp_path / "a").prepare()
    StateStore(tmp_path / "a").save("billing", state(1))
    records.items["billing"] = ({"state": "{damaged"}, 3)
    with pytest.raises(StateError, match="version 3"):
        store(tmp_path, records, "a").load("billing")
    records.items["billing"] = ({**encode(state(2), 0)}, 3)
    assert store(tmp_path, records, "a").load("billing") == state(2)


def test_an_unreadable_state_file_is_not_imported(tmp_path, records, caplog):
    (tmp_path / "a").mkdir(mode=0o700)
    (tmp_path / "a" / "billing.json").write_text("{damaged")
    with caplog.at_level(logging.INFO, logger="tokensmith.state"):
        assert store(tmp_path, records, "a").load("billing") is None
    assert not [r for r in caplog.records if getattr(r, "event", None) == "state_imported"]


def test_load_all_returns_every_readable_client_and_skips_damaged_ones(tmp_path, records):
    writer = store(tmp_path, records)
    writer.save("a", state(1))
    writer.save("c", state(2))
    records.items["b"] = ({"state": "{damaged"}, 4)
    reader = store(tmp_path, records, "b")
    assert reader.load_all() == {"a": state(1), "c": state(2)}
    assert reader.versions == {"a": 1, "b": 4, "c": 1}


def test_load_all_gives_up_when_the_store_fails_rather_than_return_part(tmp_path, records):
    writer = store(tmp_path, records)
    writer.save("a", state(1))
    writer.save("b", state(2))

    class Failing(MemoryStateStore):
        def _read(self, client):
            if client == "b":
                raise StateError("store unreachable", client=client, retryable=True)
            return super()._read(client)

    with pytest.raises(StateError, match="unreachable"):
        Failing(tmp_path / "b", records).load_all()


def test_load_all_reads_at_most_max_clients(tmp_path, records, monkeypatch):
    import tokensmith.state.shared as shared_module

    writer = store(tmp_path, records)
    for name in "abcd":
        writer.save(name, state(1))
    monkeypatch.setattr(shared_module, "MAX_CLIENTS", 3)
    assert sorted(store(tmp_path, records, "b").load_all()) == ["a", "b", "c"]
    assert MAX_CLIENTS == 100_000


def test_client_lock_serialises_one_client_not_all(tmp_path, records):
    shared = store(tmp_path, records)
    inside = threading.Event()
    release = threading.Event()
    order = []

    def hold():
        with shared.client_lock("billing"):
            inside.set()
            release.wait(5)
            order.append("first")

    thread = threading.Thread(target=hold)
    thread.start()
    assert inside.wait(5)
    with shared.client_lock("payroll"):  # another client is not blocked
        order.append("other")
    def second():
        with shared.client_lock("billing"):
            order.append("second")

    waiter = threading.Thread(target=second)
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and order == ["other"]
    release.set()
    thread.join(5)
    waiter.join(5)
    assert order == ["other", "first", "second"]


def test_audit_records_are_stored_under_a_time_ordered_unique_key(tmp_path, records):
    shared = store(tmp_path, records)
    shared.append_audit({"client": "billing", "event": "rotate"})
    shared.append_audit({"client": "billing", "event": "rotate"})
    shared.append_audit({"event": "startup"})
    keys = sorted(records.audit)
    assert len(keys) == 3
    assert all(re.fullmatch(r"\d{8}T\d{6}-(billing|unknown)-[0-9a-f]{8}", key) for key in keys), keys
    assert [records.audit[key]["event"] for key in keys if "-unknown-" in key] == ["startup"]
    assert re.fullmatch(r"\d{8}T\d{6}-unknown-[0-9a-f]{8}", audit_key({"client": None}))
    assert re.fullmatch(r"\d{8}T\d{6}-unknown-[0-9a-f]{8}", audit_key({"client": ""}))


def test_the_subclass_hooks_must_be_provided(tmp_path):
    bare = SharedStateStore(tmp_path)
    for call in (lambda: bare._read("a"), lambda: bare._write("a", {}, 0), bare._list,
                 lambda: bare._put_audit("k", {}), bare.check):
        with pytest.raises(NotImplementedError):
            call()


def test_audit_keys_are_stamped_in_utc_whatever_the_local_zone(monkeypatch):
    import time

    monkeypatch.setenv("TZ", "Asia/Kolkata")  # UTC+05:30: no hour of it matches UTC's
    time.tzset()
    try:
        for _ in range(3):
            before = time.strftime("%Y%m%dT%H%M", time.gmtime())
            key = audit_key({"client": "billing"})
            if time.strftime("%Y%m%dT%H%M", time.gmtime()) == before:
                break
        assert key[:13] == before
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_deleted_version_in_the_store_is_not_replaced_by_a_state_file(tmp_path, records):
    """A KV v2 record whose latest version was deleted reads as no data at version N: that is the
    store's answer, not a host that never wrote there, so the old state file is not imported."""
    StateStore(tmp_path / "a").prepare()
    StateStore(tmp_path / "a").save("billing", state(1))
    records.items["billing"] = (None, 3)
    shared = store(tmp_path, records, "a")
    assert shared.load("billing") is None and shared.versions["billing"] == 3

"""The dynamodb state backend against moto's DynamoDB over real HTTP: one item per client, every
write conditional on the version attribute this backend object last saw."""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from fixtures_stores import fake_aws_env, store_settings
from tokensmith.config import DynamoStateConfig
from tokensmith.errors import StateError
from tokensmith.state import ClientState, StaleStateError, build_state_backend
from tokensmith.state.dynamodb import DynamoStateStore

SECRET_ACCESS = "at-dynamo-secret-0123456789"
SECRET_REFRESH = "rt-dynamo-secret-9876543210"


@pytest.fixture
def table(moto_server, monkeypatch, tmp_path):
    import boto3

    fake_aws_env(monkeypatch, tmp_path)
    name = "tokensmith-" + uuid.uuid4().hex[:10]
    db = boto3.session.Session().client("dynamodb", region_name="us-east-1", endpoint_url=moto_server)
    db.create_table(TableName=name, KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                    AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                    BillingMode="PAY_PER_REQUEST")
    return {"name": name, "db": db, "endpoint": moto_server}


def backend(tmp_path, table, name: str | None = None) -> DynamoStateStore:
    settings = store_settings(tmp_path, source={"type": "env"}, aws={"region": "us-east-1",
                                                                      "endpoint_url": table["endpoint"]})
    settings = settings.model_copy(update={"state": DynamoStateConfig(type="dynamodb", table=name or table["name"])})
    store = build_state_backend(settings)
    assert isinstance(store, DynamoStateStore) and store.shared
    return store


def state(n: int) -> ClientState:
    return ClientState(access_token=f"{SECRET_ACCESS}-{n}", obtained_at=1000.0 + n, expires_at=2000.0 + n,
                       refresh_token=f"{SECRET_REFRESH}-{n}", refresh_token_obtained_at=1000.0 + n,
                       sinks_written={"vault": "fp"}, last_grant="client_credentials")


def item(table, client: str) -> dict:
    return table["db"].get_item(TableName=table["name"], Key={"pk": {"S": f"client#{client}"}},
                                ConsistentRead=True)["Item"]


def test_one_item_per_client_with_version_and_epoch(tmp_path, table):
    store = backend(tmp_path, table)
    store.prepare()
    assert store.load("billing") is None
    store.epoch = 3
    store.save("billing", state(1))
    store.save("billing", state(2))
    stored = item(table, "billing")
    assert stored["version"]["N"] == "2" and stored["epoch"]["N"] == "3"
    assert json.loads(stored["state"]["S"])["refresh_token"] == f"{SECRET_REFRESH}-2"
    assert backend(tmp_path / "b", table).load("billing") == state(2)


def test_a_stale_writer_fails_and_the_item_is_unchanged(tmp_path, table):
    first, second = backend(tmp_path / "a", table), backend(tmp_path / "b", table)
    first.save("billing", state(1))
    assert second.load("billing") == state(1)
    first.save("billing", state(2))
    with pytest.raises(StaleStateError) as caught:
        second.save("billing", state(3))
    assert "another writer moved client billing on (version 2" in str(caught.value)
    assert SECRET_ACCESS not in str(caught.value) and SECRET_REFRESH not in str(caught.value)
    stored = item(table, "billing")
    assert stored["version"]["N"] == "2" and json.loads(stored["state"]["S"])["access_token"] == f"{SECRET_ACCESS}-2"


def test_creating_a_client_twice_one_writer_wins(tmp_path, table):
    first, second = backend(tmp_path / "a", table), backend(tmp_path / "b", table)
    assert first.load("new") is None and second.load("new") is None
    first.save("new", state(1))
    with pytest.raises(StaleStateError):
        second.save("new", state(2))
    assert backend(tmp_path / "c", table).load("new") == state(1)


def test_load_if_changed_follows_another_writer(tmp_path, table):
    first, second = backend(tmp_path / "a", table), backend(tmp_path / "b", table)
    first.save("billing", state(1))
    assert first.load_if_changed("billing") is None
    assert second.load_if_changed("billing") == state(1)
    second.save("billing", state(2))
    assert first.load_if_changed("billing") == state(2)
    first.save("billing", state(3))
    assert second.load("billing") == state(3)


def test_load_all_pages_through_every_client_and_skips_audit_items(tmp_path, table):
    store = backend(tmp_path, table)
    for n in range(30):
        store.save(f"client-{n:02d}", state(n))
    store.append_audit({"client": "client-01", "result": "rotated"})
    everything = backend(tmp_path / "b", table)
    calls = []
    real_scan = everything.db.scan

    def small_pages(**kwargs):  # moto's real scan, in pages of 7 items, so paging is exercised
        calls.append(1)
        return real_scan(Limit=7, **kwargs)

    everything.db.scan = small_pages
    loaded = everything.load_all()
    assert sorted(loaded) == [f"client-{n:02d}" for n in range(30)]
    assert loaded["client-07"] == state(7) and len(calls) > 4


def test_audit_records_are_items(tmp_path, table):
    store = backend(tmp_path, table)
    store.append_audit({"client": "billing", "old_token": "fp1", "new_token": "fp2", "result": "rotated"})
    store.append_audit({"client": "other-api", "old_token": "fp3", "new_token": "fp4", "result": "unrevoked"})
    keys = [i["pk"]["S"] for i in table["db"].scan(TableName=table["name"])["Items"]]
    assert len(keys) == 2 and all(key.startswith("audit#") for key in keys)
    assert any("#other-api#" in key for key in keys)
    records = backend(tmp_path / "b", table).audit_records()
    assert sorted(r["new_token"] for r in records) == ["fp2", "fp4"]


def test_a_missing_table_is_a_clear_error(tmp_path, table, caplog):
    caplog.set_level(logging.DEBUG, logger="tokensmith")  # logs.py keeps botocore at WARNING
    store = backend(tmp_path, table, name="no-such-table")
    with pytest.raises(StateError, match="table no-such-table does not exist .*tokensmith does not create it"):
        store.prepare()
    with pytest.raises(StateError) as caught:
        store.save("billing", state(1))
    assert "ResourceNotFoundException" in str(caught.value)
    assert SECRET_REFRESH not in caplog.text and SECRET_ACCESS not in caplog.text


def test_a_table_with_the_wrong_key_is_refused(tmp_path, table):
    other = "wrong-" + uuid.uuid4().hex[:8]
    table["db"].create_table(TableName=other, KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
                             AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
                             BillingMode="PAY_PER_REQUEST")
    with pytest.raises(StateError, match="must have the string partition key pk"):
        backend(tmp_path, table, name=other).prepare()


def test_with_a_lease_condition_a_replica_that_lost_the_lease_writes_nothing(tmp_path, table):
    from tokensmith.state import FencedError

    db = table["db"]
    db.put_item(TableName=table["name"], Item={"pk": {"S": "lease"}, "holder": {"S": "pod-a"}, "epoch": {"N": "4"}})
    leader, usurped = backend(tmp_path / "a", table), backend(tmp_path / "b", table)
    for store, holder in ((leader, "pod-a"), (usurped, "pod-b")):
        store.lease_condition = {"Key": {"pk": {"S": "lease"}},
                                 "ConditionExpression": "holder = :h AND epoch = :e",
                                 "ExpressionAttributeValues": {":h": {"S": holder}, ":e": {"N": "4"}}}
    leader.save("billing", state(1))
    assert usurped.load("billing") == state(1)
    with pytest.raises(FencedError, match="no longer holds the leader lease"):
        usurped.save("billing", state(2))  # its CAS version is current: only the lease check stops it
    assert item(table, "billing")["version"]["N"] == "1"
    other = backend(tmp_path / "c", table)
    other.lease_condition = leader.lease_condition
    assert other.load("billing") == state(1)
    leader.save("billing", state(3))
    with pytest.raises(StaleStateError):
        other.save("billing", state(4))  # holds the lease, but read an old version
    assert json.loads(item(table, "billing")["state"]["S"])["access_token"] == f"{SECRET_ACCESS}-3"


# No threaded race here, unlike tests/ha/test_state_vault.py: moto does not serialise conditional
# writes between threads, so two concurrent puts on one version can both succeed there, which would
# test moto rather than tokensmith. test_a_stale_writer_fails_and_the_item_is_unchanged covers the
# condition DynamoDB itself enforces atomically.


def test_run_without_an_aws_region_is_a_config_error(tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "runtime_dir": str(tmp_path / "run"), "health": {"enabled": False},
        "state": {"type": "dynamodb", "table": "tokensmith-state"},
        "clients": [{"name": "a", "token_url": "http://127.0.0.1:1/t", "source": {"type": "env"},
                     "sinks": [{"type": "file", "path": str(tmp_path / "a.token")}]}]}))
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    result = subprocess.run([sys.executable, "-m", "tokensmith", "run", "--config", str(config)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 78, result.stderr
    assert "no AWS region: set aws.region or AWS_REGION" in result.stderr and "Traceback" not in result.stderr

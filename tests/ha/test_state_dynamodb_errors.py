"""The dynamodb state backend's set-up and store failures against moto over real HTTP: a table the
operator must fix is a permanent error, an unreachable endpoint a retryable one, and each names what
failed."""

from __future__ import annotations

import uuid

import pytest

from fixtures_stores import fake_aws_env, store_settings
from tokensmith.config import DynamoStateConfig
from tokensmith.errors import StateError
from tokensmith.state import build_state_backend


@pytest.fixture
def endpoint(moto_server, monkeypatch, tmp_path):
    fake_aws_env(monkeypatch, tmp_path)
    return moto_server


def backend(tmp_path, endpoint, name):
    settings = store_settings(tmp_path, source={"type": "env"}, aws={"region": "us-east-1", "endpoint_url": endpoint})
    return build_state_backend(settings.model_copy(update={"state": DynamoStateConfig(type="dynamodb", table=name)}))


def test_a_missing_table_or_one_with_the_wrong_key_is_not_retried(tmp_path, endpoint):
    with pytest.raises(StateError) as missing:
        backend(tmp_path, endpoint, "no-such-" + uuid.uuid4().hex[:8]).prepare()
    assert missing.value.retryable is False
    import boto3

    other = "wrong-" + uuid.uuid4().hex[:8]
    boto3.session.Session().client("dynamodb", region_name="us-east-1", endpoint_url=endpoint).create_table(
        TableName=other, KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST")
    with pytest.raises(StateError) as wrong:
        backend(tmp_path, endpoint, other).prepare()
    assert wrong.value.retryable is False


def test_an_unreachable_endpoint_is_retryable_and_names_the_table_and_the_operation(tmp_path, endpoint):
    dead = backend(tmp_path, "http://127.0.0.1:1", "tokensmith-state")
    with pytest.raises(StateError) as checked:
        dead.check()
    assert type(checked.value) is StateError and checked.value.retryable
    assert checked.value.message == "dynamodb table tokensmith-state: cannot reach the AWS endpoint"
    with pytest.raises(StateError) as listed:
        dead.load_all()
    assert listed.value.retryable
    assert listed.value.message == "dynamodb table tokensmith-state: scan: cannot reach the AWS endpoint"


def test_a_failed_read_or_write_names_the_client_and_the_operation(tmp_path, endpoint):
    from tokensmith.state import ClientState

    dead = backend(tmp_path, "http://127.0.0.1:1", "tokensmith-state")
    with pytest.raises(StateError) as read:
        dead.load("billing")
    assert type(read.value) is StateError and read.value.retryable and read.value.client == "billing"
    assert read.value.message == "dynamodb table tokensmith-state: read: cannot reach the AWS endpoint"
    with pytest.raises(StateError) as written:
        dead.save("billing", ClientState(access_token="at-never-stored"))
    assert type(written.value) is StateError and written.value.retryable and written.value.client == "billing"
    assert written.value.message == "dynamodb table tokensmith-state: write: cannot reach the AWS endpoint"


def make_table(endpoint) -> tuple[str, object]:
    import boto3

    name = "tokensmith-" + uuid.uuid4().hex[:10]
    db = boto3.session.Session().client("dynamodb", region_name="us-east-1", endpoint_url=endpoint)
    db.create_table(TableName=name, KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                    AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                    BillingMode="PAY_PER_REQUEST")
    return name, db


@pytest.mark.parametrize("damage", [{}, {"state": {"S": "{not json"}}, {"state": {"N": "5"}}])
def test_a_damaged_item_is_unreadable_and_the_next_save_replaces_it(tmp_path, endpoint, damage):
    import json

    from tokensmith.state import ClientState

    name, db = make_table(endpoint)
    db.put_item(TableName=name, Item={"pk": {"S": "client#billing"}, "version": {"N": "3"}, **damage})
    store = backend(tmp_path, endpoint, name)
    with pytest.raises(StateError) as caught:
        store.load("billing")
    assert caught.value.client == "billing" and "(version 3) is unreadable" in caught.value.message
    assert store.load_all() == {}
    store.save("billing", ClientState(access_token="at-replacement"))
    stored = db.get_item(TableName=name, Key={"pk": {"S": "client#billing"}}, ConsistentRead=True)["Item"]
    assert stored["version"]["N"] == "4" and json.loads(stored["state"]["S"])["access_token"] == "at-replacement"
    assert backend(tmp_path / "b", endpoint, name).load("billing").access_token == "at-replacement"


def test_an_item_without_epoch_or_writer_is_read_as_epoch_0(tmp_path, endpoint):
    import json

    from tokensmith.state import ClientState

    name, db = make_table(endpoint)
    db.put_item(TableName=name, Item={"pk": {"S": "client#billing"}, "version": {"N": "2"},
                                      "state": {"S": json.dumps({"access_token": "at-older-writer"})}})
    store = backend(tmp_path, endpoint, name)
    assert store.load("billing") == ClientState(access_token="at-older-writer")
    assert store.load_all() == {"billing": ClientState(access_token="at-older-writer")}
    assert store._read("billing") == ({"state": json.dumps({"access_token": "at-older-writer"}), "epoch": 0,
                                       "writer": None}, 2)
    store.save("billing", ClientState(access_token="at-next"))
    stored = db.get_item(TableName=name, Key={"pk": {"S": "client#billing"}}, ConsistentRead=True)["Item"]
    assert stored["version"]["N"] == "3" and stored["epoch"]["N"] == "0" and stored["format"]["N"] == "1"
    assert stored["writer"]["S"] == store.writer


def test_a_failed_audit_write_names_the_client_and_the_operation(tmp_path, endpoint):
    dead = backend(tmp_path, "http://127.0.0.1:1", "tokensmith-state")
    with pytest.raises(StateError) as caught:
        dead.append_audit({"client": "billing", "result": "rotated"})
    assert type(caught.value) is StateError and caught.value.retryable and caught.value.client == "billing"
    assert caught.value.message == "dynamodb table tokensmith-state: audit write: cannot reach the AWS endpoint"


def test_an_audit_record_is_created_once_and_never_overwritten(tmp_path, endpoint):
    name, db = make_table(endpoint)
    store = backend(tmp_path, endpoint, name)
    store._put_audit("20261202T010000-billing-0a0b0c0d", {"client": "billing", "result": "rotated"})
    with pytest.raises(StateError) as caught:
        store._put_audit("20261202T010000-billing-0a0b0c0d", {"client": "billing", "result": "forged"})
    assert caught.value.client == "billing" and "ConditionalCheckFailed" in caught.value.message
    assert store.audit_records() == [{"client": "billing", "result": "rotated"}]


def test_every_read_is_strongly_consistent(tmp_path, endpoint):
    # moto has no eventually consistent reads, so the requests themselves are checked
    from tokensmith.state import ClientState

    name, db = make_table(endpoint)
    store = backend(tmp_path, endpoint, name)
    store.save("billing", ClientState(access_token="at-1"))
    store.append_audit({"client": "billing", "result": "rotated"})
    sent = []
    for operation in ("get_item", "scan"):
        real = getattr(store.db, operation)
        setattr(store.db, operation, lambda real=real, operation=operation, **kwargs: (
            sent.append((operation, kwargs.get("ConsistentRead"))), real(**kwargs))[1])
    fresh = backend(tmp_path / "b", endpoint, name)
    fresh._db = store.db
    assert fresh.load("billing") == ClientState(access_token="at-1")
    assert fresh.load_all() == {"billing": ClientState(access_token="at-1")}
    assert len(fresh.audit_records()) == 1
    assert sorted(set(sent)) == [("get_item", True), ("scan", True)]


def test_the_client_list_leaves_out_audit_and_lease_items(tmp_path, endpoint):
    from tokensmith.state import ClientState

    name, db = make_table(endpoint)
    store = backend(tmp_path, endpoint, name)
    for client in ("b-api", "a-api"):
        store.save(client, ClientState(access_token=f"at-{client}"))
    store.append_audit({"client": "a-api", "result": "rotated"})
    db.put_item(TableName=name, Item={"pk": {"S": "lease"}, "holder": {"S": "pod-a"}})
    assert sorted(store.load_all()) == ["a-api", "b-api"]  # one scan of client items, nothing else


def test_a_write_whose_answer_was_lost_is_recognised_as_its_own_on_the_retry(tmp_path, endpoint):
    from botocore.exceptions import EndpointConnectionError

    from tokensmith.state import ClientState, StaleStateError

    name, db = make_table(endpoint)
    store = backend(tmp_path, endpoint, name)
    store.epoch = 3
    store.save("billing", ClientState(access_token="at-1"))
    real_put = store.db.put_item

    def committed_but_unanswered(**kwargs):
        real_put(**kwargs)
        raise EndpointConnectionError(endpoint_url=endpoint)

    store.db.put_item = committed_but_unanswered
    with pytest.raises(StateError) as lost:
        store.save("billing", ClientState(access_token="at-2"))
    assert lost.value.retryable
    store.db.put_item = real_put
    assert store._read("billing")[0]["epoch"] == 3 and store._read("billing")[0]["writer"] == store.writer
    store.save("billing", ClientState(access_token="at-2"))  # its own write, found on the retry: success
    assert store.load("billing") == ClientState(access_token="at-2")
    other = backend(tmp_path / "b", endpoint, name)
    other.epoch = 3
    other.versions["billing"] = 1
    with pytest.raises(StaleStateError):  # the same state from another writer is not taken as its own
        other.save("billing", ClientState(access_token="at-2"))


def test_an_item_without_a_version_is_read_as_version_0(tmp_path, endpoint):
    name, db = make_table(endpoint)
    db.put_item(TableName=name, Item={"pk": {"S": "client#billing"}})
    with pytest.raises(StateError) as caught:
        backend(tmp_path, endpoint, name).load("billing")
    assert "record for client billing (version 0) is unreadable" in caught.value.message


def test_an_item_without_a_version_is_replaced_by_the_next_save_and_only_once(tmp_path, endpoint):
    import json

    from tokensmith.state import ClientState, StaleStateError

    name, db = make_table(endpoint)
    db.put_item(TableName=name, Item={"pk": {"S": "client#billing"}, "state": {"S": "{}"}})  # written by hand
    first, second = backend(tmp_path, endpoint, name), backend(tmp_path / "b", endpoint, name)
    assert first.load_all() == {} and second.load_all() == {}  # unreadable: each starts afresh at version 0
    first.save("billing", ClientState(access_token="at-first"))
    stored = db.get_item(TableName=name, Key={"pk": {"S": "client#billing"}}, ConsistentRead=True)["Item"]
    assert stored["version"]["N"] == "1" and json.loads(stored["state"]["S"])["access_token"] == "at-first"
    with pytest.raises(StaleStateError):  # both read version 0: the second writer is stale
        second.save("billing", ClientState(access_token="at-second"))


def test_a_fenced_write_names_the_client_and_says_nothing_was_written(tmp_path, endpoint):
    from tokensmith.state import ClientState, FencedError

    name, db = make_table(endpoint)
    db.put_item(TableName=name, Item={"pk": {"S": "lease"}, "holder": {"S": "pod-a"}})
    store = backend(tmp_path, endpoint, name)
    store.lease_condition = {"Key": {"pk": {"S": "lease"}}, "ConditionExpression": "holder = :h",
                             "ExpressionAttributeValues": {":h": {"S": "pod-b"}}}
    with pytest.raises(FencedError) as caught:
        store.save("billing", ClientState(access_token="at-never-stored"))
    assert caught.value.client == "billing"
    assert caught.value.message == "this replica no longer holds the leader lease; nothing was written"
    assert "Item" not in db.get_item(TableName=name, Key={"pk": {"S": "client#billing"}}, ConsistentRead=True)

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

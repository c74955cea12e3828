"""AwsSink against moto's Secrets Manager."""

import json

import pytest

from fixtures_stores import store_settings
from tokensmith.backends import Backends
from tokensmith.errors import SinkError
from tokensmith.sinks import build_sinks
from tokensmith.tokens import Token


def sink_for(tmp_path, aws=None, **sink):
    settings = store_settings(tmp_path, aws=aws or {}, source={"type": "env", "prefix": "X_"},
                              sinks=[{"type": "aws", **sink}])
    return build_sinks(settings.clients[0], Backends(settings))[0]


def token(value: str, expires_at: float = 2_000_000_000) -> Token:
    return Token(access_token=value, token_type="Bearer", obtained_at=expires_at - 3600, expires_at=expires_at)


def test_creates_on_first_write_then_puts(tmp_path, aws_env):
    sink = sink_for(tmp_path, secret_id="tokens/billing")
    assert (sink.name, sink.type) == ("aws:tokens/billing", "aws")
    sink.check()  # absent is fine: created on the first write
    sink.write(token("tok-1"))
    secrets = aws_env.secretsmanager()
    stored = json.loads(secrets.get_secret_value(SecretId="tokens/billing")["SecretString"])
    assert stored == {"access_token": "tok-1", "token_type": "Bearer", "expires_at": 2_000_000_000}
    sink.write(token("tok-2"))
    assert json.loads(secrets.get_secret_value(SecretId="tokens/billing")["SecretString"])["access_token"] == "tok-2"
    versions = secrets.list_secret_version_ids(SecretId="tokens/billing")["Versions"]
    assert len(versions) == 2
    sink.check()


def test_create_uses_kms_key(tmp_path, aws_env):
    sink_for(tmp_path, secret_id="tokens/billing", kms_key_id="alias/tokens").write(token("tok-1"))
    assert aws_env.secretsmanager().describe_secret(SecretId="tokens/billing")["KmsKeyId"] == "alias/tokens"


def test_access_denied_is_not_retryable(tmp_path, aws_env, monkeypatch):
    """moto evaluates a real IAM policy here: the user may only describe secrets."""
    import boto3
    from moto.core import set_initial_no_auth_action_count

    iam = boto3.client("iam")
    iam.create_user(UserName="tokensmith")
    iam.put_user_policy(UserName="tokensmith", PolicyName="describe-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "secretsmanager:DescribeSecret", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="tokensmith")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    sink = sink_for(tmp_path, secret_id="tokens/billing")

    @set_initial_no_auth_action_count(0)
    def write():
        sink.check()
        sink.write(token("tok-secret-value"))

    with pytest.raises(SinkError) as caught:
        write()
    assert not caught.value.retryable and "HTTP 403" in str(caught.value)
    assert "aws secret tokens/billing" in str(caught.value) and "tok-secret-value" not in str(caught.value)


def test_check_maps_service_errors(tmp_path, aws_fault_server):
    aws = {"endpoint_url": aws_fault_server.url, "region": "us-east-1"}
    aws_fault_server.respond(400, "AccessDeniedException")
    with pytest.raises(SinkError, match="AccessDeniedException") as caught:
        sink_for(tmp_path, aws=aws, secret_id="tokens/billing").check()
    assert not caught.value.retryable
    aws_fault_server.respond(500, "InternalServiceError")
    with pytest.raises(SinkError, match="InternalServiceError") as caught:
        sink_for(tmp_path, aws=aws, secret_id="tokens/billing").write(token("tok-1"))
    assert caught.value.retryable


def test_create_race_is_retryable(tmp_path, aws_env):
    sink = sink_for(tmp_path, secret_id="tokens/billing")
    secrets = sink.backends.aws("secretsmanager")

    def another_daemon_creates_it(**kwargs):
        aws_env.secretsmanager().create_secret(Name="tokens/billing", SecretString="{}")

    secrets.meta.events.register("before-call.secrets-manager.CreateSecret", another_daemon_creates_it)
    with pytest.raises(SinkError, match="ResourceExistsException") as caught:
        sink.write(token("tok-1"))
    assert caught.value.retryable

"""AwsSource against moto's Secrets Manager (in-process and over HTTP) and a canned-error endpoint."""

import json
import time

import pytest

from fixtures_stores import free_port, store_settings
from tokensmith.backends import Backends
from tokensmith.errors import SourceError
from tokensmith.sources import build_source

SECRET = "s3cr3t-client-secret-value"


def source_for(tmp_path, secret_id, aws=None, **client):
    settings = store_settings(tmp_path, aws=aws or {}, source={"type": "aws", "secret_id": secret_id, **client})
    return build_source(settings.clients[0], Backends(settings))


def test_reads_json_secret_string_with_mapped_keys(tmp_path, aws_env):
    aws_env.secretsmanager().create_secret(Name="prod/billing", SecretString=json.dumps(
        {"id": "billing-client", "secret": SECRET}))
    source = source_for(tmp_path, "prod/billing", keys={"client_id": "id", "client_secret": "secret"})
    creds = source.read()
    assert (creds.client_id, creds.client_secret) == ("billing-client", SECRET)


def test_rotated_secret_is_picked_up_on_next_read(tmp_path, aws_env):
    secrets = aws_env.secretsmanager()
    secrets.create_secret(Name="prod/billing", SecretString=json.dumps({"client_id": "c", "client_secret": "old"}))
    source = source_for(tmp_path, "prod/billing")
    assert source.read().client_secret == "old"
    secrets.put_secret_value(SecretId="prod/billing", SecretString=json.dumps({"client_id": "c", "client_secret": "new"}))
    assert source.read().client_secret == "new"


@pytest.mark.parametrize("content, reason", [
    (f"client_secret={SECRET}", "not a JSON object"),
    (json.dumps([SECRET]), "not a JSON object"),
    (None, "no SecretString"),
])
@pytest.mark.security(threat="hostile secret store", claim="An AWS secret that is not a JSON object, or is binary, "
                                                           "is refused without echoing its value.")
def test_unusable_secret_is_not_retryable_and_not_echoed(tmp_path, aws_env, content, reason):
    value = {"SecretString": content} if content is not None else {"SecretBinary": SECRET.encode()}
    aws_env.secretsmanager().create_secret(Name="prod/billing", **value)
    with pytest.raises(SourceError, match=reason) as caught:
        source_for(tmp_path, "prod/billing").read()
    assert not caught.value.retryable and "aws secret prod/billing" in str(caught.value)
    assert SECRET not in str(caught.value) and caught.value.__cause__ is None


def test_missing_secret_and_missing_key(tmp_path, aws_env):
    with pytest.raises(SourceError, match="ResourceNotFoundException") as caught:
        source_for(tmp_path, "prod/absent").read()
    assert not caught.value.retryable and "prod/absent" in str(caught.value)
    aws_env.secretsmanager().create_secret(Name="prod/billing", SecretString=json.dumps({"client_secret": SECRET}))
    with pytest.raises(SourceError, match="missing key.*client_id") as caught:
        source_for(tmp_path, "prod/billing").read()
    assert not caught.value.retryable and SECRET not in str(caught.value)


def test_throttling_answer_is_retryable(tmp_path, aws_env):
    aws_env.secretsmanager().create_secret(Name="prod/billing", SecretString="{}")
    source = source_for(tmp_path, "prod/billing")
    calls = []

    def throttled(model, params, request_signer, **kwargs):
        # a before-call handler's return value stands in for the service's HTTP answer
        calls.append(model.name)
        return (type("Response", (), {"status_code": 400})(),
                {"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"},
                 "ResponseMetadata": {"HTTPStatusCode": 400}})

    source.backends.aws("secretsmanager").meta.events.register("before-call.secrets-manager.GetSecretValue",
                                                              throttled)
    with pytest.raises(SourceError, match="ThrottlingException") as caught:
        source.read()
    assert caught.value.retryable and calls == ["GetSecretValue"]


@pytest.mark.parametrize("status, code, retryable", [
    (400, "ThrottlingException", True),
    (500, "InternalServiceError", True),
    (503, "ServiceUnavailable", True),
    (400, "AccessDeniedException", False),
    (400, "DecryptionFailure", False),
    (400, "ResourceNotFoundException", False),
])
def test_service_errors_over_http_are_mapped_after_one_attempt(tmp_path, aws_fault_server, status, code, retryable):
    aws_fault_server.respond(status, code, message=f"echo {SECRET}")
    source = source_for(tmp_path, "prod/billing", aws={"endpoint_url": aws_fault_server.url, "region": "us-east-1"})
    with pytest.raises(SourceError, match=code) as caught:
        source.read()
    assert caught.value.retryable is retryable
    assert aws_fault_server.requests == 1  # botocore's own retries are off: the keeper retries
    assert SECRET not in str(caught.value)


def test_unreachable_endpoint_is_retryable(tmp_path, aws_env):
    source = source_for(tmp_path, "prod/billing", aws={"endpoint_url": f"http://127.0.0.1:{free_port()}",
                                                       "timeout": 2})
    started = time.monotonic()
    with pytest.raises(SourceError, match="cannot reach") as caught:
        source.read()
    assert caught.value.retryable and time.monotonic() - started < 2


def test_reads_over_http_from_moto_server(tmp_path, moto_server, monkeypatch):
    from fixtures_stores import AWS_ENV

    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    aws = {"endpoint_url": moto_server, "region": "us-east-1"}
    source = source_for(tmp_path, "http/billing", aws=aws)
    source.backends.aws("secretsmanager").create_secret(
        Name="http/billing", SecretString=json.dumps({"client_id": "over-http", "client_secret": SECRET}))
    assert source.read().client_id == "over-http"

"""AWS Secrets Manager sink hygiene against moto: no put for an unchanged value, an idempotent
ClientRequestToken for a retried write, and the start-up warning for a client that would refresh more
often than AWS advises for PutSecretValue."""

from __future__ import annotations

import logging

from tokensmith.backends import Backends
from tokensmith.sinks import build_sinks
from tokensmith.sinks.aws import request_token
from tokensmith.tokens import Token


def sink_for(tmp_path, refresh=None, **sink):
    from tokensmith.config import Settings

    client = {"name": "billing-api", "token_url": "http://127.0.0.1:1/t", "source": {"type": "env", "prefix": "X_"},
              "sinks": [{"type": "aws", **sink}], "refresh": refresh or {}}
    settings = Settings(aws={}, clients=[client], state_dir=tmp_path, runtime_dir=tmp_path)
    return build_sinks(settings.clients[0], Backends(settings))[0]


def token(value: str) -> Token:
    return Token(access_token=value, token_type="Bearer", obtained_at=1_999_996_400, expires_at=2_000_000_000)


def versions(aws_env, secret_id):
    return aws_env.secretsmanager().list_secret_version_ids(SecretId=secret_id)["Versions"]


def test_unchanged_value_is_not_put_again(tmp_path, aws_env):
    sink = sink_for(tmp_path, secret_id="tokens/same")
    sink.write(token("tok-1"))
    calls = []
    real = sink.backends.aws
    sink.backends.aws = lambda service: calls.append(service) or real(service)
    sink.write(token("tok-1"))
    assert calls == [] and len(versions(aws_env, "tokens/same")) == 1
    sink.write(token("tok-2"))
    assert len(versions(aws_env, "tokens/same")) == 2


def test_a_retried_write_reuses_its_client_request_token(tmp_path, aws_env):
    first = sink_for(tmp_path, secret_id="tokens/retry")
    first.write(token("tok-1"))
    first.write(token("tok-2"))
    # a second writer (a retry after a lost answer, or the process restarted) sends the same value again
    again = sink_for(tmp_path, secret_id="tokens/retry")
    again.write(token("tok-2"))
    ids = {v["VersionId"] for v in versions(aws_env, "tokens/retry")}
    assert len(ids) == 2 and request_token('{"access_token": "tok-2", "token_type": "Bearer", '
                                           '"expires_at": 2000000000}') in ids


def test_start_up_warns_when_refreshes_outpace_put_secret_value_advice(tmp_path, aws_env, caplog):
    caplog.set_level(logging.WARNING, logger="tokensmith.sinks.aws")
    sink_for(tmp_path, secret_id="tokens/often", refresh={"default_lifetime": 300}).check()
    assert any("more often than AWS advises" in r.getMessage() for r in caplog.records)
    caplog.clear()
    sink_for(tmp_path / "b", secret_id="tokens/rarely", refresh={"default_lifetime": 3600}).check()
    assert not caplog.records

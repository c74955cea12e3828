"""`tokensmith run` with `state: {type: vault}` (and dynamodb): a pod loses its local state_dir (an emptyDir) and
comes back. Fresh tokens are kept without a refresh, and a `grant: refresh_token` client whose
refresh token was seeded once continues its single-use chain from the record in OpenBao."""

from __future__ import annotations

import json
import shutil
import uuid

import boto3
import pytest
import requests

from daemon_harness import Project, wait_for, write_private
from fixtures_stores import AWS_ENV
from tokensmith.devserver import OAuthServer


@pytest.fixture
def server():
    with OAuthServer(access_lifetime=300) as server:
        yield server


def seed_refresh_token(server, name: str) -> str:
    """What an operator does once: log in with a password, keep the refresh token."""
    server.add_client(name, f"{name}-secret", users={"alice": "alice-pw"}, access_lifetime=2)
    reply = requests.post(server.token_url, data={"grant_type": "password", "client_id": name,
                                                  "client_secret": f"{name}-secret", "username": "alice",
                                                  "password": "alice-pw"}, timeout=5)
    reply.raise_for_status()
    return reply.json()["refresh_token"]


def chain_project(tmp_path, server, state: dict, **settings) -> Project:
    project = Project(tmp_path, server, state=state, **settings)
    project.add_client("fresh", lifetime=300)
    seed = seed_refresh_token(server, "chain")
    write_private(project.root / "creds" / "chain.json",
                  {"client_id": "chain", "client_secret": "chain-secret", "refresh_token": seed})
    project.clients.append({
        "name": "chain", "token_url": server.token_url, "grant": "refresh_token",
        "source": {"type": "file", "path": str(project.root / "creds" / "chain.json")},
        "refresh": {"min_lead": 0, "backoff_initial": 0.05, "backoff_max": 0.5},
        "sinks": [{"type": "file", "path": str(project.token_path("chain"))}]})
    return project


def lose_the_pod(project: Project) -> None:
    shutil.rmtree(project.root / "state")
    shutil.rmtree(project.root / "run", ignore_errors=True)


def test_state_in_vault_survives_losing_the_state_dir(tmp_path, server, vault_kv):
    project = chain_project(tmp_path, server, {"type": "vault", "mount": "secret", "prefix": vault_kv.prefix},
                            vault=vault_kv.vault_config())
    daemon = project.start()
    try:
        daemon.wait_ready()
        # the chain moves on at least once with the daemon's own refresh token
        wait_for(lambda: server.stats["refresh_exchanges"] >= 2, timeout=15)
    finally:
        assert daemon.stop() == 0
    fresh_token = project.token("fresh")
    fresh_issued = len(server.issued_tokens("fresh"))
    exchanges = server.stats["refresh_exchanges"]
    stored = vault_kv.get("clients/chain")["data"]
    assert stored["state"]["refresh_token"] == server.issued_refresh_tokens("chain")[-1]

    lose_the_pod(project)
    daemon = project.start()
    try:
        wait_for(lambda: server.stats["refresh_exchanges"] >= exchanges + 2, timeout=15)
        wait_for(lambda: server.is_active(project.token("chain") or ""), timeout=5)
    finally:
        assert daemon.stop() == 0
    assert "kept token" in daemon.log and "client=fresh" in daemon.log
    assert project.token("fresh") == fresh_token and len(server.issued_tokens("fresh")) == fresh_issued
    assert server.stats["refresh_reuse"] == 0
    assert "invalid_grant" not in daemon.log and "refresh token rejected" not in daemon.log
    text = daemon.log + "".join(path.read_text() for path in tmp_path.glob("daemon-*.log"))
    for token in server.issued_refresh_tokens("chain") + server.issued_tokens("chain"):
        assert token not in text


def test_state_in_dynamodb_survives_losing_the_state_dir(tmp_path, server, moto_server):
    table = "tokensmith-" + uuid.uuid4().hex[:10]
    db = boto3.client("dynamodb", region_name=AWS_ENV["AWS_REGION"], endpoint_url=moto_server,
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    db.create_table(TableName=table, KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                    AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}], BillingMode="PAY_PER_REQUEST")
    env = {**AWS_ENV, "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    project = chain_project(tmp_path, server, {"type": "dynamodb", "table": table},
                            aws={"region": AWS_ENV["AWS_REGION"], "endpoint_url": moto_server})
    daemon = project.start(env=env)
    try:
        daemon.wait_ready()
        wait_for(lambda: server.stats["refresh_exchanges"] >= 2, timeout=15)
    finally:
        assert daemon.stop() == 0
    fresh_token = project.token("fresh")
    exchanges = server.stats["refresh_exchanges"]
    lose_the_pod(project)
    daemon = project.start(env=env)
    try:
        wait_for(lambda: server.stats["refresh_exchanges"] >= exchanges + 2, timeout=15)
    finally:
        assert daemon.stop() == 0
    assert project.token("fresh") == fresh_token and server.stats["refresh_reuse"] == 0
    item = db.get_item(TableName=table, Key={"pk": {"S": "client#chain"}}, ConsistentRead=True)["Item"]
    assert json.loads(item["state"]["S"])["refresh_token"] == server.issued_refresh_tokens("chain")[-1]


def test_with_the_file_backend_the_same_pod_loss_breaks_the_chain(tmp_path, server):
    """The failure the vault backend removes: the seeded refresh token was spent long ago."""
    project = chain_project(tmp_path, server, {"type": "file"})
    daemon = project.start()
    try:
        daemon.wait_ready()
        wait_for(lambda: server.stats["refresh_exchanges"] >= 2, timeout=15)
    finally:
        daemon.stop()
    lose_the_pod(project)
    daemon = project.start()
    try:
        wait_for(lambda: server.stats["refresh_reuse"] >= 1, timeout=15)
    finally:
        daemon.stop()
    assert "refresh token has already been used" in daemon.log or "invalid_grant" in daemon.log


def test_status_without_a_daemon_reads_the_vault_backend(tmp_path, server, vault_kv):
    project = Project(tmp_path, server, vault=vault_kv.vault_config(),
                      state={"type": "vault", "mount": "secret", "prefix": vault_kv.prefix})
    project.add_client("fresh", lifetime=300)
    project.write()
    assert project.cli("once").returncode == 0
    lose_the_pod(project)
    result = project.cli("status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    [status] = json.loads(result.stdout)["clients"]
    assert status["client"] == "fresh" and status["valid"] and status["token"]
